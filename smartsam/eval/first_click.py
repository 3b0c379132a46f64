"""Where the first click goes: the protocols of the paper's robustness and ambiguity experiments.

* ``center``: the object's point farthest from its boundary (the standard protocol, RITM).
* ``inside-random``: a seeded random pixel of the object at least ``min_distance`` pixels from
  its boundary (an imperfect but plausible annotator; paper Table 10).
* ``inside-worst``: of ``n`` such seeded positions, the one where the *plain backbone's* first
  answer is worst; every method is then clicked there (a TETRIS-style adversarial first click,
  Moskalenko et al. 2024).
* ``area``: the middle of a given click-area mask (a smaller object lying on the target), the
  enclosing object being the target: the Amb-Occ protocol (paper section 4.2).

After the first click every protocol goes on with the standard one (the larger error region).
Positions are ``(row, column)`` as the click simulator's.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .clicker import _padded_dt  # the simulator's distance: the image border counts as boundary

PROTOCOLS = ("center", "inside-random", "inside-worst", "area")


def center_position(mask: np.ndarray) -> Tuple[int, int]:
    """``(row, col)`` of the pixel of ``mask`` farthest from its boundary (the first one in
    row-major order among ties, as the click simulator picks)."""
    dt = _padded_dt(mask)
    ys, xs = np.nonzero(dt == dt.max())
    return int(ys[0]), int(xs[0])


def inside_positions(mask: np.ndarray, rng: np.random.Generator, n: int, min_distance: float) -> List[Tuple[int, int]]:
    """``n`` seeded ``(row, col)`` pixels of ``mask`` at least ``min_distance`` px from its boundary
    (with replacement). An object too thin for that distance uses its deepest pixels instead."""
    dt = _padded_dt(mask)
    ok = dt >= float(min_distance)
    if not ok.any():
        ok = dt >= dt.max()
    ys, xs = np.nonzero(ok)
    idx = rng.integers(len(ys), size=int(n))
    return [(int(ys[i]), int(xs[i])) for i in idx]


def worst_position(positions: Sequence[Tuple[int, int]], iou_at: Callable[[Tuple[int, int]], float]) -> Tuple[int, int]:
    """The position whose first-click IoU (``iou_at``, the plain backbone's) is lowest; the first
    such one among ties."""
    ious = [float(iou_at(p)) for p in positions]
    return positions[int(np.argmin(ious))]


def area_position(area: Optional[np.ndarray]) -> Tuple[int, int]:
    """The middle of a click-area mask (its point farthest from the area's boundary)."""
    if area is None or not np.asarray(area).any():
        raise ValueError("the area protocol needs a non-empty click area per sample (an area/ folder: Amb-Occ)")
    return center_position(np.asarray(area, bool))


def sample_seed(name: str, trial: int, seed: int) -> List[int]:
    """A seed per (sample, trial): positions do not depend on the order samples run in."""
    return [int(seed), int(trial), *np.frombuffer(name.encode()[:64].ljust(64, b"\0"), np.uint8).tolist()]
