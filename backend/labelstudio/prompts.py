"""Label Studio's interactive context -> the one :class:`Prompt` type, in our image's pixels.

The first step of a click's data path (context -> prompt -> job -> batch engine -> regions ->
answer): Label Studio gives positions in percent of the image as the annotator sees it; every
bad value raises RequestError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from backend.errors import RequestError
from backend.labelstudio.label_config import LabelConfig
from backend.labelstudio.schemas import ContextRegion, parse


def pct_to_px(v: float, size: int) -> float:
    """Label Studio's percent of the displayed image -> our pixel coordinate. 100 % (the right or
    bottom edge, which Label Studio allows) is the last pixel; beyond it stays outside."""
    px = float(v) / 100.0 * size
    return min(px, size - 1) if size - 1 < px <= size else px


def far_edge(pct: float, size: int) -> float:
    """A rectangle's far edge in pixels, kept on the image (Label Studio allows 100 %)."""
    return min(pct_to_px(pct, size), size - 1)


def positive_size(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or not 0 < v <= 1e6:
        raise RequestError(f"{what} must be a positive whole number of pixels, got {v!r}")
    return int(v)



@dataclass
class Prompt:
    """The annotator's prompt, in our image's pixels.

    Attributes:
        points: ``[(x, y), ...]`` every keypoint of the region, in Label Studio's order.
        labels: ``[1 | 0, ...]`` positive or negative (Alt-click) per point.
        box: ``(x0, y0, x1, y1)`` of a smart rectangle, or None.
        label: the label the answer gets.
        shown: ``(width, height)`` Label Studio displays the image at, when it said.
        tool: the ``from_name`` of the first positive keypoint (which smart tool was used).
    """

    points: List[Tuple[float, float]]
    labels: List[int]
    box: Optional[Tuple[float, float, float, float]]
    label: str
    shown: Optional[Tuple[int, int]]
    tool: Optional[str] = None

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
    box, label, shown, tool = None, None, None, None
    for i, r in enumerate(context_result):
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            raise RequestError("a context region has no value")
        parse(ContextRegion, r, f"context.result[{i}]")  # every field we read, of its type
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
            if positive and tool is None:
                tool = r.get("from_name") if isinstance(r.get("from_name"), str) else None
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
        label = cfg.labels[0] if len(cfg.labels) == 1 else None
    if label is None:
        raise RequestError("the prompt carries no label: pick a keypoint label before clicking")
    if not isinstance(label, str) or label not in cfg.labels:
        raise RequestError(f"label {label!r} is not among the answer tags' labels {list(cfg.labels)}: give the prompt "
                           f"and answer tags the same labels")
    if box is None and 1 not in labels:
        raise RequestError("only negative clicks: click the object once (without Alt) first")
    return Prompt(points, labels, box, label, shown, tool)
