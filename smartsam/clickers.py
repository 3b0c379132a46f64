"""Next Chain Clickers: refine each initial mask the way an annotator would, three times.

A chain starts from one initial mask. At each step the annotator-like agent decides whether the
mask is too big or too small: with probability equal to the mask's IoU-head score it "Cuts"
(a negative click inside the mask), otherwise it "Adds" (a positive click outside it). The click
goes to the middle of the largest *uncertain* region on that side of the mask: the place where
the decoder itself hesitated, so the click tests the decision the model was least sure about.

Uncertain means ``|logit| < band``, with the band derived per image from the logits of its own
initial masks (:func:`smartsam.masks.uncertainty_band`): a fraction of the confident logit
scale, so it adapts to the backbone and checkpoint instead of being a fixed constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .masks import LowResFrame, largest_component_center, uncertainty_band

CUT = 0  # negative click inside the mask
ADD = 1  # positive click outside the mask
PLACEMENTS = ("ncc", "random", "none")


def action_name(labels) -> str:
    """The paper's Table 7 class of a chain's inner clicks (labels 1 Add, 0 Cut): "no action",
    "Add", "Cut" or "Add&Cut"."""
    kinds = set(int(v) for v in labels)
    if not kinds:
        return "no action"
    if kinds == {ADD}:
        return "Add"
    if kinds == {CUT}:
        return "Cut"
    return "Add&Cut"


@dataclass
class ChainClick:
    """One simulated click: ``xy`` in image pixels ``(x, y)``, ``label`` 1 = Add, 0 = Cut."""

    xy: Tuple[float, float]
    label: int


class NextChainClicker:
    """Places the next click of a chain on low-resolution logits.

    Args:
        chain_length: clicks per chain (paper: 3).
        band_fraction: the uncertain band is ``band_fraction * percentile(|logits|)`` (our
            choice, 0.25: the paper gives no number).
        band_percentile: which percentile of ``|logits|`` (over the image's initial masks) is the
            "confident" logit scale (our choice, 90).
        placement: where a chain's click goes (ablation, paper Table 6): "ncc" (the middle of the
            largest uncertain region on the chosen side: the paper), "random" (a random pixel on
            the chosen side) or "none" (no chains: the initial masks only).
    """

    def __init__(self, chain_length: int = 3, band_fraction: float = 0.25, band_percentile: float = 90.0,
                 placement: str = "ncc") -> None:
        if chain_length < 0:
            raise ValueError("chain_length must be >= 0")
        if not 0 < band_fraction <= 1 or not 0 < band_percentile <= 100:
            raise ValueError("band_fraction must be in (0, 1] and band_percentile in (0, 100]")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
        self.placement = placement
        self.chain_length = 0 if placement == "none" else int(chain_length)
        self.band_fraction = float(band_fraction)
        self.band_percentile = float(band_percentile)

    def band(self, initial_logits: np.ndarray, frame: LowResFrame) -> float:
        """Uncertain half-width for one image from its initial ``(K, g, g)`` logits."""
        return uncertainty_band(frame.crop(initial_logits), self.band_fraction, self.band_percentile)

    def place(self, logits: np.ndarray, label: int, band: float, frame: LowResFrame,
              rng: Optional[np.random.Generator] = None) -> Optional[Tuple[float, float]]:
        """Where a click of ``label`` goes on one ``(g, g)`` logit map, in image pixels.

        Cut: inside the mask (logit > 0); Add: outside (logit <= 0); both restricted to the
        uncertain band, at the distance-transform peak of the largest such region. None when
        that side has no uncertain pixel (the chain then stops: nothing left to doubt). With
        ``placement="random"``: a random pixel of that side (``rng``), band or not.
        """
        lr = frame.crop(logits)
        side = lr > 0 if label == CUT else lr <= 0
        if self.placement == "random":
            ys, xs = np.nonzero(side)
            if len(ys) == 0:
                return None
            k = int((rng or np.random.default_rng(0)).integers(len(ys)))
            x, y = frame.to_image(np.asarray([[xs[k], ys[k]]], np.float64))[0]
            return float(x), float(y)
        center = largest_component_center(side & (np.abs(lr) < band))
        if center is None:
            return None
        x, y = frame.to_image(np.asarray([center], np.float64))[0]
        return float(x), float(y)

    def next_click(
        self, logits: np.ndarray, score: float, band: float, frame: LowResFrame, rng: np.random.Generator
    ) -> Optional[ChainClick]:
        """Draw the sign from Bernoulli(score) and place the click (None: the chain ends)."""
        label = _draw_sign(score, rng)
        xy = self.place(logits, label, band, frame, rng)
        return None if xy is None else ChainClick(xy, label)

    def next_clicks(self, logits: Sequence[np.ndarray], scores: Sequence[float], band: float, frame: LowResFrame,
                    rngs: Sequence[np.random.Generator], device=None) -> List[Optional[ChainClick]]:
        """:meth:`next_click` for one step of N chains (``(g, g)`` logits, score and stream each;
        the logits may be tensors on ``device``).

        ``device`` (a torch device) places every chain's click in one batch of tensor work there
        (:mod:`smartsam.chain_clicks`: the same clicks, exactly); None, or a placement other than
        "ncc", places them one chain at a time with OpenCV, the faster on a CPU. The signs are
        drawn from each chain's stream in the same order either way.
        """
        if device is None or self.placement != "ncc" or not len(logits):
            return [self.next_click(lg, sc, band, frame, r) for lg, sc, r in zip(logits, scores, rngs)]
        import torch

        from .chain_clicks import place_clicks

        labels = [_draw_sign(sc, r) for sc, r in zip(scores, rngs)]
        if isinstance(logits[0], torch.Tensor):  # already where the decoder left them
            lg = torch.stack(list(logits)).to(device)
        else:
            lg = torch.as_tensor(np.stack(logits), device=device)
        cut = torch.as_tensor([lab == CUT for lab in labels], device=device)
        xy, ok, exact = place_clicks(lg, cut, band, frame.valid_hw)
        # N points, flags and whether the bounded placement was exact: the step's one copy back
        host = torch.cat([xy.reshape(-1), ok.long(), exact.long().reshape(1)]).cpu().numpy()
        if not host[-1]:  # rare (see chain_clicks): place again without the bounds
            xy, ok, _ = place_clicks(lg, cut, band, frame.valid_hw, bounded=False)
            host = torch.cat([xy.reshape(-1), ok.long()]).cpu().numpy()
        n = len(labels)
        xy, ok = host[:2 * n].reshape(n, 2), host[2 * n:3 * n] > 0
        pts = frame.to_image(xy.astype(np.float64))
        return [ChainClick((float(pts[k, 0]), float(pts[k, 1])), label) if ok[k] else None
                for k, label in enumerate(labels)]


def _draw_sign(score: float, rng: np.random.Generator) -> int:
    """Cut with probability ``score`` (the mask's IoU prediction, clipped to [0, 1]), else Add:
    one draw from the chain's stream."""
    return CUT if rng.random() < float(np.clip(score, 0.0, 1.0)) else ADD
