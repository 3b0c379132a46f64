"""Selection: exploit the explored candidates.

* Pure-IS (no reference): among the candidates that contain the user's click, the one with the
  highest IoU-head score (all candidates when none contains it).
* Reference (paper Eq. 2): the candidate whose masked-average-pooled feature is most cosine-
  similar to the reference's feature. References are an image + mask (DINOv2, masked pool), an
  image alone (DINOv2 CLS token) or a text (CLIP). ``require_click`` restricts the choice to
  candidates containing the click, as pure-IS does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np

from .masks import LowResFrame, sample_logits_at


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``(N, D)`` rows with one ``(D,)`` vector -> ``(N,)`` (0 for zero rows).

    ``b`` may also be ``(K, D)`` exemplars: each row's best similarity to any of them."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if b.ndim == 2 and b.shape[0] > 1:
        return np.max(np.stack([cosine(a, e) for e in b]), axis=0)
    b = b.reshape(-1)
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b)
    return np.where((na > 0) & (nb > 0), (a @ b) / np.maximum(na * nb, 1e-12), 0.0)


@dataclass
class Reference:
    """What the user meant, as a feature vector.

    Attributes:
        kind: "mask" (image + mask), "image" (image alone) or "text".
        feature: ``(D,)`` float32 feature, or ``(K, D)`` for K exemplars of one label (a candidate
            then scores its best similarity to any of them; K = 1 is the paper).
        extractor: name of the feature model that made it (features of different models are
            never compared).
        text: the text, for text references.
    """

    kind: str
    feature: np.ndarray
    extractor: str
    text: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in ("mask", "image", "text"):
            raise ValueError(f"unknown reference kind {self.kind!r}")
        f = np.asarray(self.feature, np.float32)
        f = f.reshape(f.shape[0], -1) if f.ndim > 1 and f.shape[0] > 1 else f.reshape(-1)
        self.feature = f
        rows = f.reshape(1, -1) if f.ndim == 1 else f
        if f.size == 0 or not np.all(np.isfinite(f)) or not rows.any(axis=1).all():
            raise ValueError("reference feature is empty or not finite (an empty mask?)")

    @property
    def exemplars(self) -> int:
        """How many exemplars this reference holds (K)."""
        return 1 if self.feature.ndim == 1 else int(self.feature.shape[0])


@dataclass
class Selection:
    """Index of the chosen candidate, with its similarity (None in pure-IS mode)."""

    index: int
    mode: str
    similarity: Optional[float] = None
    similarities: Optional[np.ndarray] = field(default=None, repr=False)


def contains_click(low_res: np.ndarray, frame: LowResFrame, click_xy: Tuple[float, float]) -> np.ndarray:
    """``(K,)`` bool: which of ``(K, 256, 256)`` logit maps are positive at the click."""
    return sample_logits_at(low_res, frame, click_xy) > 0


def select_by_score(scores: np.ndarray, allowed: np.ndarray) -> int:
    """Highest score among ``allowed`` candidates (among all when none is allowed)."""
    s = np.where(allowed, scores, -np.inf) if allowed.any() else np.asarray(scores, np.float64)
    return int(np.argmax(s))


def select_by_similarity(features: np.ndarray, reference: np.ndarray, allowed: np.ndarray) -> Tuple[int, np.ndarray]:
    """Most cosine-similar candidate among ``allowed`` (all when none is); returns (index, sims)."""
    sims = cosine(features, reference)
    s = np.where(allowed, sims, -np.inf) if allowed.any() else sims
    return int(np.argmax(s)), sims
