"""Priori Initial Sampler: explore around the user's click before committing to a mask.

From one click it makes ``1 + num_points + len(box_aspects)`` prompts (10 by default):
the click itself, points at distance ``beta * Gamma(shape, 1)`` in a uniform direction (the
Gamma's mode ``beta * (shape - 1)`` is where an annotator's "nearby" click most likely lands),
and boxes of a few aspect ratios whose centres are drawn the same way (section 3.2: the geometric
centres of all the agent's prompts follow Eq. 1). With SAM's multimask output each prompt gives 3
masks: 30 initial masks that span the part / object / group granularities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from .backbones.base import Prompt

DISTRIBUTIONS = ("gamma", "normal", "uniform", "none")
# The paper's box aspects; ``--boxes N`` takes N of them in turn (0.67, 1, 1.5, 0.67, ...).
PAPER_ASPECTS = (0.67, 1.0, 1.5)


def box_aspects(n: int) -> Tuple[float, ...]:
    """``n`` box aspect ratios, cycling through the paper's three."""
    if n < 0:
        raise ValueError("the number of boxes must be 0 or more")
    return tuple(PAPER_ASPECTS[i % 3] for i in range(int(n)))


@dataclass
class InitialPrompt:
    """A sampled prompt and what it is: "click", "point" or "box"."""

    prompt: Prompt
    kind: str


class PrioriInitialSampler:
    """Samples the exploration prompts around a click.

    Args:
        num_points: extra single positive points (paper: 6).
        beta: scale in pixels of the distance ``beta * Gamma(gamma_shape, 1)`` (paper: 100 px,
            the Gamma(2, 1) peak, in the image's own pixels).
        gamma_shape: shape of that Gamma distribution (paper: 2).
        box_aspects: width / height of the boxes (paper: 0.67, 1, 1.5), one box each.
        box_side_range: range of the box's longest side, in pixels at SAM's 1024-px input scale
            (paper: 200-800); scaled by ``max(H, W) / 1024`` so a box covers the same share of
            any image.
        reference_size: the input scale the box sides are given at.
        distribution: how far the sampled prompts lie from the click (ablations, paper Tables 6
            and 12): "gamma" (the paper: ``beta * Gamma(gamma_shape, 1)``), "normal" (a normal
            with the Gamma's mode ``beta * (gamma_shape - 1)`` and standard deviation
            ``beta * sqrt(gamma_shape)``, truncated at 0 so the mode stays; Table 12's control),
            "uniform" (uniform over ``[0, 2 * beta * gamma_shape]``: the Gamma's mean) or "none"
            (the click alone: no sampled points or boxes).
    """

    def __init__(
        self,
        num_points: int = 6,
        beta: float = 100.0,
        gamma_shape: float = 2.0,
        box_aspects: Sequence[float] = (0.67, 1.0, 1.5),
        box_side_range: Tuple[float, float] = (200.0, 800.0),
        reference_size: float = 1024.0,
        distribution: str = "gamma",
    ) -> None:
        if num_points < 0 or beta <= 0 or gamma_shape <= 0:
            raise ValueError("num_points >= 0, beta > 0 and gamma_shape > 0 are required")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, not {distribution!r}")
        if not 0 < box_side_range[0] <= box_side_range[1]:
            raise ValueError("box_side_range must be (low, high) with 0 < low <= high")
        self.num_points = int(num_points)
        self.beta = float(beta)
        self.gamma_shape = float(gamma_shape)
        self.box_aspects = tuple(float(a) for a in box_aspects)
        self.box_side_range = (float(box_side_range[0]), float(box_side_range[1]))
        self.reference_size = float(reference_size)
        self.distribution = distribution
        if distribution == "none":
            self.num_points, self.box_aspects = 0, ()

    @property
    def num_prompts(self) -> int:
        return 1 + self.num_points + len(self.box_aspects)

    def distances(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(n,)`` distances from the click in pixels, drawn from ``distribution``."""
        k, b = self.gamma_shape, self.beta
        if self.distribution == "normal":
            out = np.empty(0)
            while out.size < n:  # truncated at 0 by rejection: the density's peak stays at the mode
                d = rng.normal(b * max(k - 1.0, 0.0), b * np.sqrt(k), size=2 * n + 4)
                out = np.concatenate([out, d[d >= 0]])
            return out[:n]
        if self.distribution == "uniform":
            return rng.uniform(0.0, 2.0 * b * k, size=n)
        return b * rng.gamma(k, 1.0, size=n)

    def _offsets(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Eq. 1: ``n`` offsets ``(dx, dy)`` at distance ``beta * Gamma(shape, 1)`` (or the ablation's
        distribution), uniform angle."""
        dist = self.distances(n, rng)
        angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
        return np.stack([dist * np.cos(angle), dist * np.sin(angle)], axis=1)

    def sample_points(self, click_xy: Tuple[float, float], image_hw: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """``(num_points, 2)`` points ``(x, y)`` around the click, clipped to the image."""
        h, w = image_hw
        pts = np.asarray(click_xy, np.float64)[None] + self._offsets(self.num_points, rng)
        return np.clip(pts, 0, [w - 1, h - 1]).astype(np.float32)

    def sample_boxes(self, click_xy: Tuple[float, float], image_hw: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """``(len(box_aspects), 4)`` boxes ``(x0, y0, x1, y1)``, clipped to the image.

        Each box's centre is drawn by Eq. 1 like the points. Clipping: the centre is first moved
        into the image (as a point is), then the box's sides are cut at the image's edges, so every
        box covers part of the image around a centre inside it (near an edge it is smaller).
        """
        h, w = image_hw
        scale = max(h, w) / self.reference_size
        centres = np.clip(np.asarray(click_xy, np.float64)[None] + self._offsets(len(self.box_aspects), rng), 0, [w - 1, h - 1])
        boxes = []
        for aspect, (cx, cy) in zip(self.box_aspects, centres):
            side = rng.uniform(*self.box_side_range) * scale
            bw, bh = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
            boxes.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, w - 1)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, h - 1)
        return b

    def sample(self, click_xy: Tuple[float, float], image_hw: Tuple[int, int], rng: np.random.Generator) -> List[InitialPrompt]:
        """All initial prompts: the click, the sampled points, the boxes (in that order)."""
        click = np.asarray([click_xy], np.float32)
        out = [InitialPrompt(Prompt(click, [1]), "click")]
        for p in self.sample_points(click_xy, image_hw, rng):
            out.append(InitialPrompt(Prompt(p[None], [1]), "point"))
        for b in self.sample_boxes(click_xy, image_hw, rng):
            out.append(InitialPrompt(Prompt(box=b), "box"))
        return out
