"""Masks <-> Label Studio regions, percent <-> pixels: small pure functions.

Label Studio gives positions in percent of the image as the annotator sees it and brush masks as
RLE at the displayed size (``original_width/height``); SmartSAM works in pixels of the image as
decoded here. Every conversion is in this module, and every bad value raises RequestError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import RequestError
from .label_config import LabelConfig

DEFAULT_MAX_PIXELS = 40_000_000


def pct_to_px(v: float, size: int) -> float:
    """Label Studio's percent of the displayed image -> our pixel coordinate. 100 % (the right or
    bottom edge, which Label Studio allows) is the last pixel; beyond it stays outside."""
    px = float(v) / 100.0 * size
    return min(px, size - 1) if size - 1 < px <= size else px


def far_edge(pct: float, size: int) -> float:
    """A rectangle's far edge in pixels, kept on the image (Label Studio allows 100 %)."""
    return min(pct_to_px(pct, size), size - 1)


def positive_size(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) <= 0:
        raise RequestError(f"{what} must be a positive whole number, got {v!r}")
    return int(v)


def _is_byte(b) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255


def mask_to_rle(mask: np.ndarray) -> List[int]:
    """``(H, W)`` bool -> Label Studio's brush RLE."""
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(np.where(mask, 255, 0).astype(np.uint8))


def resize_mask(mask: np.ndarray, wh: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``(width, height)``."""
    import cv2

    return cv2.resize(mask.astype(np.uint8), tuple(wh), interpolation=cv2.INTER_NEAREST) > 0


def brush_mask(region: Dict, image_hw: Tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The ``(H, W)`` bool mask of a Label Studio brush region, at the size of our image.

    The RLE is at the size Label Studio saw (``original_width/height``); it is resized (nearest)
    when that differs from the image as we decoded it. Nothing is decoded before the RLE's header
    agrees with that size and the size is within ``max_pixels`` (SMARTSAM_MAX_PIXELS): a small
    body cannot ask for a large allocation. Bad input raises RequestError.
    """
    from label_studio_sdk.converter.brush import decode_rle

    h, w = image_hw
    value = region.get("value") if isinstance(region, dict) else None
    rle = value.get("rle") if isinstance(value, dict) else None
    if not isinstance(rle, list) or len(rle) < 5:
        raise RequestError("a brush region has no RLE list")
    oh = positive_size(region.get("original_height") or h, "original_height")
    ow = positive_size(region.get("original_width") or w, "original_width")
    if ow * oh > max_pixels:
        raise RequestError(f"a brush region of {ow}x{oh} is over the limit of {max_pixels} pixels (SMARTSAM_MAX_PIXELS)")
    if not all(map(_is_byte, rle[:4])):
        raise RequestError("a brush RLE must be a list of bytes (0-255)")
    claimed = int.from_bytes(bytes(rle[:4]), "big")  # the header's element count (RGBA values)
    if claimed != ow * oh * 4:
        raise RequestError(f"a brush RLE claims {claimed} values, not the {ow}x{oh}x4 of its region")
    if not all(map(_is_byte, rle)):  # the header first: a bad size is refused before this pass
        raise RequestError("a brush RLE must be a list of bytes (0-255)")
    try:
        mask = decode_rle(rle).reshape(oh, ow, 4)[:, :, 3] > 0
    except (ValueError, IndexError, TypeError) as e:
        raise RequestError(f"a brush RLE is malformed ({type(e).__name__})") from None
    if mask.shape != (h, w):
        mask = resize_mask(mask, (w, h))
    return mask


def region_shown_mask(region: Dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A brush region's mask at the size Label Studio displayed it (its ``original_*`` size)."""
    hw = (positive_size(region.get("original_height"), "original_height"),
          positive_size(region.get("original_width"), "original_width"))
    return brush_mask(region, hw, max_pixels)


def brush_regions(results: List[Dict]) -> List[Tuple[int, str, Dict]]:
    """``(index in result, label, region)`` of each brush region with an RLE and a label, in Label
    Studio's order: what every reader of an annotation (references, statistics, evaluation) counts."""
    out = []
    for k, r in enumerate(results if isinstance(results, list) else []):
        if not isinstance(r, dict):
            continue
        v = r.get("value") if isinstance(r.get("value"), dict) else {}
        labels = v.get("brushlabels") if isinstance(v.get("brushlabels"), list) else []
        if r.get("type") == "brushlabels" and v.get("rle") and labels and isinstance(labels[0], str):
            out.append((k, labels[0], r))
    return out


def first_regions(results: List[Dict]) -> Dict[str, Dict]:
    """Label -> its first brush region in an annotation's result (Label Studio's order). One rule
    for several regions of one label, on every path (webhooks, the admin's "from task")."""
    first: Dict[str, Dict] = {}
    for _, label, r in brush_regions(results):
        first.setdefault(label, r)
    return first


def ticks_reference(results: List[Dict], choice: str) -> bool:
    """Whether an annotation's result ticks the "Use as reference" choice."""
    return any(isinstance(r, dict) and r.get("type") == "choices" and
               choice in (((r.get("value") or {}).get("choices")) or []) for r in (results or []))


@dataclass
class Prompt:
    """The annotator's prompt, in our image's pixels.

    Attributes:
        points: ``[(x, y), ...]`` every keypoint of the region, in Label Studio's order.
        labels: ``[1 | 0, ...]`` positive or negative (Alt-click) per point.
        box: ``(x0, y0, x1, y1)`` of a smart rectangle, or None.
        label: the label the answer gets.
        shown: ``(width, height)`` Label Studio displays the image at, when it said.
    """

    points: List[Tuple[float, float]]
    labels: List[int]
    box: Optional[Tuple[float, float, float, float]]
    label: str
    shown: Optional[Tuple[int, int]]

    @property
    def first_positive(self) -> Optional[int]:
        return self.labels.index(1) if 1 in self.labels else None


def parse_prompt(context_result, image_wh: Tuple[int, int], cfg: LabelConfig) -> Prompt:
    """Label Studio's ``context.result`` (every keypoint of the region, the newest with
    ``is_positive``; or a smart rectangle) -> a :class:`Prompt` on an image of ``(w, h)``."""
    if not isinstance(context_result, list):
        raise RequestError("context.result must be a list of regions")
    w, h = image_wh
    points: List[Tuple[float, float]] = []
    labels: List[int] = []
    box, label, shown = None, None, None
    for r in context_result:
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            raise RequestError("a context region has no value")
        v, kind = r["value"], r.get("type", "")
        if shown is None and r.get("original_width") and r.get("original_height"):
            shown = (positive_size(r["original_width"], "original_width"), positive_size(r["original_height"], "original_height"))
        try:
            # percentages of the image as the annotator sees it, scaled to our pixels
            x, y = pct_to_px(v["x"], w), pct_to_px(v["y"], h)
        except (KeyError, TypeError, ValueError):
            raise RequestError("a context region has no numeric x/y") from None
        if kind == "keypointlabels":
            points.append((x, y))
            positive = r.get("is_positive", True) is not False
            labels.append(1 if positive else 0)
            if v.get("keypointlabels") and (positive or label is None):
                label = v["keypointlabels"][0]  # the newest positive keypoint's label wins
        elif kind == "rectanglelabels":
            try:
                box = (x, y, far_edge(float(v["x"]) + float(v["width"]), w), far_edge(float(v["y"]) + float(v["height"]), h))
            except (KeyError, TypeError, ValueError):
                raise RequestError("a rectangle has no numeric width/height") from None
            if v.get("rectanglelabels"):
                label = v["rectanglelabels"][0]
        else:
            raise RequestError(f"unsupported prompt type {kind!r}: use the smart KeyPointLabels or RectangleLabels")
    if label is None:
        label = cfg.brush_labels[0] if len(cfg.brush_labels) == 1 else None
    if label is None:
        raise RequestError("the prompt carries no label: pick a keypoint label before clicking")
    if not isinstance(label, str) or label not in cfg.brush_labels:
        raise RequestError(f"label {label!r} is not among the BrushLabels {list(cfg.brush_labels)}: give both tags the same labels")
    if box is None and 1 not in labels:
        raise RequestError("only negative clicks: click the object once (without Alt) first")
    return Prompt(points, labels, box, label, shown)


def brush_result(mask: np.ndarray, cfg: LabelConfig, label: str, score: float,
                 shown: Optional[Tuple[int, int]] = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[Dict, np.ndarray]:
    """A brush region for ``mask`` (``(H, W)`` bool, our pixels), and the mask at the size Label
    Studio displays (``shown`` ``(w, h)``, default the mask's own): the RLE must be at that size,
    or the brush comes out garbled."""
    h, w = mask.shape
    if shown is not None and shown != (w, h):
        if shown[0] * shown[1] > max_pixels:
            raise RequestError(f"Label Studio's displayed size {shown[0]}x{shown[1]} is over SMARTSAM_MAX_PIXELS")
        mask = resize_mask(mask, shown)
        w, h = shown
    result = {
        "from_name": cfg.brush_name, "to_name": cfg.image_name, "type": "brushlabels",
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
        "score": round(float(score), 4),
    }
    return result, mask
