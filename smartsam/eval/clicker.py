"""Click simulator of the standard protocol (after RITM's ``isegm/inference/clicker.py``).

The first click goes to the point of the object farthest from its boundary; each next click to
the point farthest from the boundary of the larger error region (false negatives -> positive
click, false positives -> negative click). Distances use a padded mask so that the image border
counts as boundary. Pixels in the ignore band are neither error nor object. As in RITM, a pixel
already clicked is never clicked again (the not-clicked map): when a segmenter ignores a click,
the next one goes to the best pixel not yet tried instead of repeating it forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np


@dataclass(frozen=True)
class Click:
    """A simulated click: ``is_positive`` and ``coords`` as ``(y, x)`` (row, column), as in RITM."""

    is_positive: bool
    coords: Tuple[int, int]

    @property
    def xy(self) -> Tuple[float, float]:
        return float(self.coords[1]), float(self.coords[0])


def _padded_dt(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask.astype(np.uint8), 1, mode="constant")
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


class Clicker:
    """Places clicks for one ground-truth mask.

    Args:
        gt: ``(H, W)`` bool object mask.
        ignore: optional ``(H, W)`` bool mask of pixels that count for nothing.
    """

    def __init__(self, gt: np.ndarray, ignore: Optional[np.ndarray] = None) -> None:
        self.gt = gt.astype(bool)
        self.not_ignore = np.ones_like(self.gt) if ignore is None else ~ignore.astype(bool)
        self.not_clicked = np.ones(self.gt.shape, np.float32)
        self.clicks: List[Click] = []

    def make_next_click(self, pred: np.ndarray) -> Click:
        """The next click given the current prediction ``(H, W)`` bool (all False before click 1)."""
        pred = pred.astype(bool)
        fn = self.gt & ~pred & self.not_ignore
        fp = ~self.gt & pred & self.not_ignore
        fn_dt, fp_dt = _padded_dt(fn) * self.not_clicked, _padded_dt(fp) * self.not_clicked
        fn_max, fp_max = float(fn_dt.max()), float(fp_dt.max())
        positive = fn_max > fp_max
        dt = fn_dt if positive else fp_dt
        peak = fn_max if positive else fp_max
        ys, xs = np.nonzero(dt == peak)
        click = Click(bool(positive), (int(ys[0]), int(xs[0])))
        self.not_clicked[click.coords] = 0.0
        self.clicks.append(click)
        return click

    def add_click(self, coords, is_positive: bool = True) -> Click:
        """Place a click at ``coords`` ``(row, col)`` chosen elsewhere (a first-click protocol)."""
        click = Click(bool(is_positive), (int(coords[0]), int(coords[1])))
        self.not_clicked[click.coords] = 0.0
        self.clicks.append(click)
        return click

    @property
    def points_xy(self) -> np.ndarray:
        return np.asarray([c.xy for c in self.clicks], np.float32).reshape(-1, 2)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([int(c.is_positive) for c in self.clicks], np.int64)
