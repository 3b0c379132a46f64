"""Small pure functions for mask maths (the `utils/amg.py` of SmartSAM).

Conventions used across the package:
  * Points are ``(x, y)`` in pixels of the original image (column, row), floats.
  * Masks are boolean arrays of shape ``(H, W)``; batches are ``(N, H, W)``.
  * Low-resolution logits are SAM's ``(256, 256)`` decoder output; a :class:`LowResFrame`
    says which part of that grid covers the image and how to map coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np


@dataclass(frozen=True)
class LowResFrame:
    """Geometry of a backbone's low-resolution logit grid relative to the image.

    Low-res pixel ``(r, c)`` with ``r < valid_hw[0]`` and ``c < valid_hw[1]`` covers image pixels
    ``[r * scale_y, (r + 1) * scale_y) x [c * scale_x, (c + 1) * scale_x)``. SAM pads the resized
    image at the bottom/right (valid part smaller than 256), SAM 2 stretches it (all 256 valid).
    """

    image_hw: Tuple[int, int]
    valid_hw: Tuple[int, int]
    scale_xy: Tuple[float, float]
    grid: int = 256

    def to_image(self, xy_low: np.ndarray) -> np.ndarray:
        """Centres of low-res pixels ``(N, 2)`` (x, y) -> image pixel coordinates ``(N, 2)``."""
        xy_low = np.asarray(xy_low, dtype=np.float64).reshape(-1, 2)
        out = (xy_low + 0.5) * np.asarray(self.scale_xy) - 0.5
        h, w = self.image_hw
        return np.clip(out, 0, [w - 1, h - 1])

    def from_image(self, xy: np.ndarray) -> np.ndarray:
        """Image pixel coordinates ``(N, 2)`` -> continuous low-res coordinates ``(N, 2)``."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return (xy + 0.5) / np.asarray(self.scale_xy) - 0.5

    def crop(self, low_res: np.ndarray) -> np.ndarray:
        """Keep the part of ``(..., 256, 256)`` logits that covers the image."""
        return low_res[..., : self.valid_hw[0], : self.valid_hw[1]]


def mask_iou(a: np.ndarray, b: np.ndarray, ignore: Optional[np.ndarray] = None) -> float:
    """IoU of two boolean masks ``(H, W)``; pixels where ``ignore`` is True count for neither."""
    a = a.astype(bool)
    b = b.astype(bool)
    if ignore is not None:
        keep = ~ignore.astype(bool)
        a = a & keep
        b = b & keep
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def batch_iou(masks: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Pairwise IoU between ``(N, H, W)`` and ``(M, H, W)`` boolean masks -> ``(N, M)``."""
    a = masks.reshape(masks.shape[0], -1).astype(np.float32)
    b = other.reshape(other.shape[0], -1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 1.0)


def _largest_label(region: np.ndarray):
    """OpenCV's 8-connected labels and stats of ``region`` and the label of its largest component
    (equal areas: the one OpenCV numbers first), or None for an empty region."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    return labels, stats, 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def largest_component(region: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean ``(H, W)`` region (empty stays empty)."""
    found = _largest_label(region)
    if found is None:
        return np.zeros(region.shape, dtype=bool)
    labels, _, best = found
    return labels == best


def largest_component_center(region: np.ndarray) -> Optional[Tuple[int, int]]:
    """``region_center(largest_component(region))``, the distance transform taken over the
    component's bounding box only (padded with background, as the image border is): the same
    point, since every pixel beyond the box is background and no farther than the pad next to it,
    and row-major order within the box is the image's. A chain click places on a band that
    covers a part of the map; the transform of the whole map was a third of the host's work in a
    click."""
    found = _largest_label(region)
    if found is None:
        return None
    labels, stats, best = found
    x0, y0, w, h = (int(v) for v in stats[best, :4])
    x, y = region_center(labels[y0:y0 + h, x0:x0 + w] == best)
    return x0 + x, y0 + y


def region_center(region: np.ndarray, border_is_boundary: bool = True) -> Optional[Tuple[int, int]]:
    """The point of ``region`` farthest from its boundary, as ``(x, y)`` integer pixels.

    This is the "middle" used by the standard click protocol (RITM's clicker): the maximum of the
    distance transform. With ``border_is_boundary`` the image border counts as boundary (the
    region is padded with background before the transform). Ties go to the first pixel in
    row-major order, so the answer is deterministic. Returns None for an empty region.
    """
    region = region.astype(np.uint8)
    if not region.any():
        return None
    if border_is_boundary:
        padded = np.pad(region, 1, mode="constant")
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    else:
        dist = cv2.distanceTransform(region, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # The precise transform's values are square roots of integers, but OpenCV's (IPP in the
    # opencv-python wheels) are sometimes one float32 step off, which pixels depending on the
    # transforms before it: equal distances would then break their tie by that noise. Squared and
    # rounded they are the exact integers again (one step at sqrt(131072) moves the square by 0.02).
    exact = np.rint(dist.astype(np.float64) ** 2)
    y, x = np.unravel_index(int(np.argmax(exact)), exact.shape)
    return int(x), int(y)


def uncertainty_band(logits: np.ndarray, band_fraction: float = 0.25, percentile: float = 90.0) -> float:
    """Half-width of the "uncertain" logit band, derived from the image's own confident logits.

    SAM's logit scale differs between images, backbones and checkpoints, so a fixed constant would
    be wrong somewhere. The confident scale is the ``percentile``-th percentile of ``|logit|`` over
    the given logit maps (all initial masks of one image); a pixel is uncertain when its
    ``|logit|`` is below ``band_fraction`` of that scale.
    """
    mags = np.abs(np.asarray(logits, dtype=np.float32)).ravel()
    if mags.size == 0:
        return 0.0
    return float(band_fraction * np.percentile(mags, percentile))


def sample_logits_at(low_res: np.ndarray, frame: LowResFrame, xy: Tuple[float, float]) -> np.ndarray:
    """Bilinear value of ``(N, 256, 256)`` logits at one image point ``(x, y)`` -> ``(N,)``."""
    lx, ly = frame.from_image(np.asarray(xy))[0]
    h, w = frame.valid_hw
    lx = float(np.clip(lx, 0, w - 1))
    ly = float(np.clip(ly, 0, h - 1))
    x0, y0 = int(np.floor(lx)), int(np.floor(ly))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = lx - x0, ly - y0
    top = low_res[:, y0, x0] * (1 - fx) + low_res[:, y0, x1] * fx
    bottom = low_res[:, y1, x0] * (1 - fx) + low_res[:, y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def mask_box(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """Tight box ``(x0, y0, x1, y1)`` of a boolean mask in pixel edges (``x1``, ``y1`` one past the
    last pixel: the box's width is ``x1 - x0``), or None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def best_of_three(scores: np.ndarray) -> int:
    """Which of SAM's multimask outputs for one prompt is the plain answer: the best-scored of
    ``scores`` ``(M,)``."""
    return int(np.argmax(scores))


# How image + mask references are prepared before pooling: the paper's section 4.1, or not at all.
REFERENCE_PREPS = ("paper", "none")

# ImageNet mean in RGB: a background filled with it becomes ~0 after the feature models' normalisation
BACKGROUND_FILL = (124, 116, 104)


def prepare_reference(image: np.ndarray, mask: np.ndarray, occupancy: float = 0.7,
                      fill: Tuple[int, int, int] = BACKGROUND_FILL) -> Tuple[np.ndarray, np.ndarray]:
    """The paper's reference preparation (section 4.1): background removed and the object cropped
    so that it occupies about ``occupancy`` of the reference image.

    The crop keeps the object's bounding-box aspect and scales each side by ``1 / sqrt(occupancy)``,
    so the box covers ``occupancy`` of the crop's area; where the crop leaves the image it is
    padded with ``fill``, like the removed background.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool, the object (not empty).
    Returns:
        ``(image, mask)`` of the crop: ``(h, w, 3)`` uint8 with the background set to ``fill``,
        and its ``(h, w)`` bool mask.
    """
    if not 0 < occupancy <= 1:
        raise ValueError("occupancy must be in (0, 1]")
    box = mask_box(mask)
    if box is None:
        raise ValueError("reference mask is empty")
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = 1 / np.sqrt(occupancy)
    w, h = (x1 - x0) * scale, (y1 - y0) * scale
    X0, Y0 = int(np.floor(cx - w / 2)), int(np.floor(cy - h / 2))
    X1, Y1 = max(X0 + 1, int(np.ceil(cx + w / 2))), max(Y0 + 1, int(np.ceil(cy + h / 2)))
    out = np.empty((Y1 - Y0, X1 - X0, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    out_mask = np.zeros(out.shape[:2], bool)
    H, W = mask.shape
    sx0, sy0, sx1, sy1 = max(X0, 0), max(Y0, 0), min(X1, W), min(Y1, H)
    m = np.asarray(mask[sy0:sy1, sx0:sx1], bool)
    region = out[sy0 - Y0:sy1 - Y0, sx0 - X0:sx1 - X0]
    region[m] = image[sy0:sy1, sx0:sx1, :3][m]
    out_mask[sy0 - Y0:sy1 - Y0, sx0 - X0:sx1 - X0] = m
    return out, out_mask
