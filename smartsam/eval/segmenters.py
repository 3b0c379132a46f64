"""What the evaluation runs: anything that turns the clicks so far into a mask.

A segmenter sees the image once (``start``) and then every click in order (``click``); it
returns the mask after that click and, after the first click, optionally all of its candidate
masks (for IoU_best: what the selector could have picked).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

from ..agent import SmartSAMAgent
from ..backbones.base import Backbone, Prompt
from ..masks import best_of_three
from ..selector import Reference


class Segmenter:
    """Protocol of the harness. ``name`` labels the outputs."""

    name = "segmenter"
    random_weights = False

    def start(self, image: np.ndarray, sample) -> None:
        raise NotImplementedError

    def click(self, points_xy: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``points_xy`` ``(N, 2)`` and ``labels`` ``(N,)`` so far -> (mask, candidates or None)."""
        raise NotImplementedError


class OracleSegmenter(Segmenter):
    """Returns the ground truth: the harness must report mIoU@1 = 100 and NoC = 1."""

    name = "oracle"

    def __init__(self, gt_for: Callable[[object], np.ndarray]) -> None:
        self.gt_for = gt_for

    def start(self, image, sample):
        self._gt = self.gt_for(sample)

    def click(self, points_xy, labels):
        return self._gt.copy(), self._gt[None].copy()


class EmptySegmenter(Segmenter):
    """Returns nothing: mIoU 0 and NoC = max clicks."""

    name = "empty"

    def start(self, image, sample):
        self._hw = image.shape[:2]

    def click(self, points_xy, labels):
        m = np.zeros(self._hw, bool)
        return m, m[None]


class BackboneSegmenter(Segmenter):
    """Plain SAM / SAM 2.1: best-scored of 3 masks at click 1, then one mask per click with all
    clicks and the previous low-res logits."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.name = f"backbone:{backbone.name}"
        self.random_weights = backbone.random_weights

    def start(self, image, sample):
        self.backbone.set_image(image)
        self._prev = None

    def click(self, points_xy, labels):
        bb = self.backbone
        multimask = self._prev is None
        res = bb.predict([Prompt(points_xy, labels, mask_input=self._prev)], multimask=multimask)
        best = best_of_three(res.scores[0])
        self._prev = res.low_res_logits[0, best]
        if multimask:
            ups = bb.upsample(res.low_res_logits[0]) > 0
            return ups[best], ups
        return bb.upsample(self._prev[None])[0] > 0, None


class AgentSegmenter(Segmenter):
    """SmartSAM: the agent at click 1 (pure-IS or with a reference), outer refinement after."""

    def __init__(self, agent: SmartSAMAgent, reference_for: Optional[Callable[[object], Optional[Reference]]] = None) -> None:
        self.agent = agent
        self.reference_for = reference_for
        mode = "reference" if reference_for else "pure-is"
        self.name = f"{mode}:{agent.backbone.name}"
        self.random_weights = agent.backbone.random_weights

    def start(self, image, sample):
        self._ref = self.reference_for(sample) if self.reference_for else None
        self.agent.set_image(image)
        self._prev = None
        self.winner = None

    def click(self, points_xy, labels):
        if self._prev is None:
            res = self.agent.predict(points_xy[0], self._ref, return_candidates=True)
            self._prev = res
            self.winner = res.candidate.describe()  # where the answer came from (Table 7)
            import cv2

            h, w = self.agent.backbone.image_hw
            lr = res.frame.crop(res.candidate_logits)
            cands = np.stack([cv2.resize(l, (w, h), interpolation=cv2.INTER_LINEAR) > 0 for l in lr])
            return res.mask, cands
        res = self.agent.refine(points_xy, labels, self._prev)
        self._prev = res
        return res.mask, None
