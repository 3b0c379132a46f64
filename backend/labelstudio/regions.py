"""Masks <-> Label Studio regions: small pure functions.

Label Studio gives brush masks as RLE at the displayed size (``original_width/height``) and
polygons, boxes in percent of it; SmartSAM works in pixels of the image as decoded here. Every
conversion between masks and regions is in this module (the prompt's, context -> points, is in
:mod:`backend.labelstudio.prompts`), and every bad value raises RequestError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from backend.errors import RequestError
from backend.labelstudio.label_config import LabelConfig
from backend.labelstudio.prompts import positive_size
from smartsam.masks import mask_box, mask_iou

DEFAULT_MAX_PIXELS = 40_000_000


def ls_score(v: float) -> float:
    """A score as Label Studio accepts it: in [0, 1] (it drops a prediction with any other),
    4 decimals. An IoU head's output or a cosine similarity can lie outside."""
    return round(min(1.0, max(0.0, float(v))), 4)


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


def answer_regions(results: List[Dict], cfg: LabelConfig) -> List[Tuple[int, str, Dict]]:
    """``(index in result, label, region)`` of each region of an answer tag of ``cfg`` (brush,
    polygon, bitmask, non-smart rectangle) with a label, in Label Studio's order: what every reader
    of an annotation (references, statistics, evaluation) counts."""
    out = []
    for k, r in enumerate(results if isinstance(results, list) else []):
        if not isinstance(r, dict):
            continue
        tag = cfg.answer_tag(r.get("from_name"))
        if tag is None or r.get("type") != tag.type:
            continue
        v = r.get("value") if isinstance(r.get("value"), dict) else {}
        labels = v.get(tag.type) if isinstance(v.get(tag.type), list) else []
        if labels and isinstance(labels[0], str):
            out.append((k, labels[0], r))
    return out


def primary_regions(results: List[Dict], cfg: LabelConfig) -> List[Tuple[int, str, Dict]]:
    """The answer regions of one tag only: the first answer tag of the config with regions in the
    annotation. One suggestion comes as a region per answer tag (a brush, its polygons, its box):
    counted once per object, in the tag the project labels with first."""
    regions = answer_regions(results, cfg)
    for tag in cfg.answers:
        mine = [x for x in regions if x[2].get("from_name") == tag.name]
        if mine:
            return mine
    return []


def first_regions(results: List[Dict], cfg: LabelConfig) -> Dict[str, Dict]:
    """Label -> its first answer region in an annotation's result (Label Studio's order). One rule
    for several regions of one label, on every path (webhooks, the admin's "from task")."""
    first: Dict[str, Dict] = {}
    for _, label, r in answer_regions(results, cfg):
        first.setdefault(label, r)
    return first


def ticks_reference(results: List[Dict], choice: str) -> bool:
    """Whether an annotation's result ticks the "Use as reference" choice."""
    return any(isinstance(r, dict) and r.get("type") == "choices" and
               choice in (((r.get("value") or {}).get("choices")) or []) for r in (results or []))


@dataclass(frozen=True)
class PolygonOptions:
    """How masks become polygons (``SMARTSAM_POLYGON_PARTS``, ``SMARTSAM_POLYGON_MIN_AREA``).

    Attributes:
        parts: "all" (one polygon per connected component of at least ``min_area`` pixels) or
            "largest" (only the largest component).
        min_area: components smaller than this many pixels are left out ("all").
        min_iou: each polygon's rasterisation keeps at least this IoU with its component (the
            tolerance is chosen per component: the fewest points that do).
    """

    parts: str = "all"
    min_area: int = 16
    min_iou: float = 0.95


def _fill(polygon: np.ndarray, shape: Tuple[int, int], offset=(0, 0)) -> np.ndarray:
    import cv2

    out = np.zeros(shape, np.uint8)
    pts = np.round(np.asarray(polygon, np.float64) - np.asarray(offset, np.float64)).astype(np.int32)
    cv2.fillPoly(out, [pts.reshape(-1, 1, 2)], 1)
    return out > 0


def rasterize_polygons(polygons: List[np.ndarray], hw: Tuple[int, int]) -> np.ndarray:
    """``(H, W)`` bool: the union of polygons given in pixels (``(N, 2)`` x, y at pixel centres)."""
    out = np.zeros(hw, bool)
    for p in polygons:
        out |= _fill(p, hw)
    return out


def mask_to_polygons(mask: np.ndarray, options: PolygonOptions = PolygonOptions()) -> List[np.ndarray]:
    """The outer contours of ``mask`` (``(H, W)`` bool) as polygons, ``[(N, 2) float x, y]`` in
    pixels, largest first.

    Each connected component's outer contour (OpenCV) is simplified (Douglas-Peucker) with the
    largest tolerance whose rasterisation keeps ``options.min_iou`` with the component filled
    (Label Studio polygons have no holes: a component's holes are filled; the polygons benchmark
    measures what that costs). A component that small simplification cannot keep is left as its
    full contour.
    """
    import cv2

    m = np.ascontiguousarray(mask, np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    found = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        pts = c.reshape(-1, 2).astype(np.float64)
        # the component filled (its holes too), in its own box: the polygon's target
        target = _fill(pts, (h, w), (x, y))
        area = int(target.sum())
        if len(pts) < 3:  # a line or a point: give it the area it covers
            pts = np.array([[x, y], [x + w - 1, y], [x + w - 1, y + h - 1], [x, y + h - 1]], np.float64)
        found.append((area, pts, target, (x, y)))
    found.sort(key=lambda f: -f[0])
    if options.parts == "largest":
        found = found[:1]
    else:
        found = [f for f in found if f[0] >= options.min_area] or found[:1]
    out = []
    for area, pts, target, (x, y) in found:
        out.append(_simplify(pts, target, (x, y), options.min_iou))
    return out


def _simplify(pts: np.ndarray, target: np.ndarray, offset, min_iou: float) -> np.ndarray:
    """The fewest-points Douglas-Peucker simplification of a contour that keeps ``min_iou`` and does
    not cross itself (a binary search on the tolerance: larger = fewer points)."""
    import cv2

    contour = pts.astype(np.float32).reshape(-1, 1, 2)
    best = cv2.approxPolyDP(contour, 0.0, True).reshape(-1, 2).astype(np.float64)  # collinear points out
    if len(best) < 3:
        best = pts
    lo, hi = 0.0, float(max(target.shape)) / 2
    for _ in range(14):
        eps = (lo + hi) / 2
        cand = cv2.approxPolyDP(contour, eps, True).reshape(-1, 2).astype(np.float64)
        if len(cand) >= 3 and not _segments_cross(cand) and mask_iou(_fill(cand, target.shape, offset), target) >= min_iou:
            if len(cand) <= len(best):
                best = cand
            lo = eps
        else:
            hi = eps
    return best


def polygon_points_pct(polygon: np.ndarray, wh: Tuple[int, int]) -> List[List[float]]:
    """Pixel points -> Label Studio's ``[[x %, y %], ...]`` of an image of ``(w, h)``."""
    w, h = wh
    return [[round(float(x) / w * 100.0, 4), round(float(y) / h * 100.0, 4)] for x, y in polygon]


def mask_to_png_data_url(mask: np.ndarray) -> str:
    """A bitmask as Label Studio's ``imageDataURL``: an RGBA PNG, opaque white on the object,
    transparent elsewhere (pixel exact)."""
    import base64
    import io

    from PIL import Image

    a = np.where(mask, 255, 0).astype(np.uint8)
    rgba = np.dstack([a, a, a, a])
    b = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(b, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def _region_id(label: str, tag: str, k) -> str:
    import hashlib

    return "ss" + hashlib.sha1(f"{label}\0{tag}\0{k}".encode()).hexdigest()[:8]


def answer_results(mask: np.ndarray, cfg: LabelConfig, label: str, score: float, shown: Optional[Tuple[int, int]] = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS, polygons: PolygonOptions = PolygonOptions(),
                   instance: int = 0) -> Tuple[List[Dict], np.ndarray]:
    """The regions of one answer in every answer tag of ``label`` (brush RLE, polygons, a PNG
    bitmask, the box), and the mask at the size Label Studio displays (``shown`` ``(w, h)``,
    default the mask's own): positions and pixels must be at that size, or they come out shifted.
    ``instance`` tells the instances of one answer apart (their regions' ids)."""
    h, w = mask.shape
    if shown is not None and shown != (w, h):
        if shown[0] * shown[1] > max_pixels:
            raise RequestError(f"Label Studio's displayed size {shown[0]}x{shown[1]} is over SMARTSAM_MAX_PIXELS")
        mask = resize_mask(mask, shown)
        w, h = shown
    base = {"to_name": cfg.image_name, "original_width": w, "original_height": h, "image_rotation": 0,
            "score": ls_score(score)}
    out: List[Dict] = []
    for tag in cfg.answers_for(label):
        if tag.tag == "BrushLabels":
            values = [{"format": "rle", "rle": mask_to_rle(mask)}]
        elif tag.tag == "PolygonLabels":
            values = [{"points": polygon_points_pct(p, (w, h)), "closed": True} for p in mask_to_polygons(mask, polygons)]
        elif tag.tag == "BitmaskLabels":
            values = [{"imageDataURL": mask_to_png_data_url(mask)}]
        else:  # a non-smart RectangleLabels: the answer's box
            box = mask_box(mask)
            values = [] if box is None else [{"x": box[0] / w * 100.0, "y": box[1] / h * 100.0,
                                              "width": (box[2] - box[0]) / w * 100.0,
                                              "height": (box[3] - box[1]) / h * 100.0, "rotation": 0}]
        for k, v in enumerate(values):
            v[tag.type] = [label]
            out.append(dict(base, id=_region_id(label, tag.name, f"{instance}-{k}"), from_name=tag.name, type=tag.type, value=v))
    return out, mask


# -- reading regions back ---------------------------------------------------------------------
def _finite_pct(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or not -1e-6 <= float(v) <= 100 + 1e-6:
        raise RequestError(f"{what} must be a number from 0 to 100 (percent of the image), got {v!r}")
    return float(v)


def _segments_cross(p: np.ndarray, tol: float = 0.05) -> bool:
    """Whether a closed polygon's edges properly cross (not counting neighbours sharing a vertex,
    nor edges that only touch: orientations within ``tol`` pixels squared count as collinear, so
    a contour touching itself at a pixel corner, as OpenCV's do, survives Label Studio's 4-decimal
    percent rounding)."""
    n = len(p)
    a, b = p, np.roll(p, -1, axis=0)
    for i in range(n):
        j = np.arange(i + 2, n) if i > 0 else np.arange(2, n - 1)
        if not len(j):
            continue
        # orientation tests of segment i against segments j, and j against i
        def cross(o, u, v):
            return (u[..., 0] - o[..., 0]) * (v[..., 1] - o[..., 1]) - (u[..., 1] - o[..., 1]) * (v[..., 0] - o[..., 0])
        o1 = cross(a[i], b[i], a[j])
        o2 = cross(a[i], b[i], b[j])
        o3 = cross(a[j], b[j], np.broadcast_to(a[i], a[j].shape))
        o4 = cross(a[j], b[j], np.broadcast_to(b[i], a[j].shape))
        strict = (np.abs(o1) > tol) & (np.abs(o2) > tol) & (np.abs(o3) > tol) & (np.abs(o4) > tol)
        if np.any((o1 * o2 < 0) & (o3 * o4 < 0) & strict):
            return True
    return False


def polygon_mask(region: Dict, hw: Tuple[int, int]) -> np.ndarray:
    """A polygon region -> ``(H, W)`` bool at ``hw`` (points in percent). RequestError for fewer
    than 3 points, points outside 0-100 or not numbers, and self-intersecting polygons."""
    v = region.get("value") if isinstance(region.get("value"), dict) else {}
    points = v.get("points")
    if not isinstance(points, list) or len(points) < 3:
        raise RequestError("a polygon needs at least 3 points")
    if len(points) > 100_000:
        raise RequestError("a polygon of more than 100000 points is refused")
    h, w = hw
    px = []
    for pt in points:
        if not isinstance(pt, (list, tuple)) or len(pt) < 2:
            raise RequestError("a polygon point is [x %, y %]")
        px.append((_finite_pct(pt[0], "a polygon point's x") / 100.0 * w, _finite_pct(pt[1], "a polygon point's y") / 100.0 * h))
    arr = np.asarray(px, np.float64)
    if len(arr) <= 2000 and _segments_cross(arr):
        raise RequestError("a self-intersecting polygon cannot be read as a mask: redraw it")
    return _fill(arr, (h, w))


def bitmask_mask(region: Dict, hw: Tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A bitmask region (``imageDataURL``, a PNG) -> ``(H, W)`` bool; the PNG must be ``hw``."""
    import base64
    import binascii
    import io
    import warnings

    from PIL import Image

    v = region.get("value") if isinstance(region.get("value"), dict) else {}
    url = v.get("imageDataURL")
    if not isinstance(url, str) or not url.startswith("data:image/png;base64,"):
        raise RequestError("a bitmask region's imageDataURL must be a data:image/png;base64 URL")
    try:
        data = base64.b64decode(url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("a bitmask region's PNG is not base64") from None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise RequestError("a bitmask region's imageDataURL is not a PNG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise RequestError(f"a bitmask of {w}x{h} is over the limit of {max_pixels} pixels (SMARTSAM_MAX_PIXELS)")
        if (h, w) != tuple(hw):
            raise RequestError(f"a bitmask of {w}x{h} does not match its image's {hw[1]}x{hw[0]}")
        a = np.asarray(img.convert("RGBA") if img.mode in ("P", "PA", "LA") else img)
    except RequestError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"a bitmask region's PNG cannot be read ({e})") from None
    if a.ndim == 3 and a.shape[2] == 4:
        return a[..., 3] > 0
    return (a[..., 0] if a.ndim == 3 else a) > 0


def box_mask(region: Dict, hw: Tuple[int, int]) -> np.ndarray:
    """A rectangle region -> ``(H, W)`` bool: the pixels inside it (rotation about its top-left
    corner, as Label Studio draws it)."""
    v = region.get("value") if isinstance(region.get("value"), dict) else {}
    h, w = hw
    x, y = _finite_pct(v.get("x"), "a rectangle's x"), _finite_pct(v.get("y"), "a rectangle's y")
    bw, bh = _finite_pct(v.get("width"), "a rectangle's width"), _finite_pct(v.get("height"), "a rectangle's height")
    rot = v.get("rotation") or 0
    if isinstance(rot, bool) or not isinstance(rot, (int, float)) or not np.isfinite(rot):
        raise RequestError("a rectangle's rotation must be a number of degrees")
    out = np.zeros(hw, bool)
    if not rot:
        x0, y0 = int(round(x / 100 * w)), int(round(y / 100 * h))
        x1, y1 = int(round((x + bw) / 100 * w)), int(round((y + bh) / 100 * h))
        out[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] = True
        return out
    t = np.deg2rad(float(rot))
    ox, oy = x / 100 * w, y / 100 * h
    corners = np.array([[0, 0], [bw / 100 * w, 0], [bw / 100 * w, bh / 100 * h], [0, bh / 100 * h]])
    rotm = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return _fill(corners @ rotm.T + [ox, oy], hw)


def region_mask(region: Dict, hw: Tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any answer region (brush, polygon, bitmask, rectangle) -> ``(H, W)`` bool at ``hw``,
    through the size Label Studio displayed it at (``original_width/height``). RequestError for
    anything that cannot be read."""
    kind = region.get("type")
    if kind == "brushlabels":
        return brush_mask(region, hw, max_pixels)
    oh = positive_size(region.get("original_height") or hw[0], "original_height")
    ow = positive_size(region.get("original_width") or hw[1], "original_width")
    if ow * oh > max_pixels:
        raise RequestError(f"a region of {ow}x{oh} is over the limit of {max_pixels} pixels (SMARTSAM_MAX_PIXELS)")
    if kind == "polygonlabels":
        m = polygon_mask(region, (oh, ow))
    elif kind == "bitmasklabels":
        m = bitmask_mask(region, (oh, ow), max_pixels)
    elif kind == "rectanglelabels":
        m = box_mask(region, (oh, ow))
    else:
        raise RequestError(f"a region of type {kind!r} is not a mask SmartSAM reads")
    return m if m.shape == tuple(hw) else resize_mask(m, (hw[1], hw[0]))


def region_shown_mask(region: Dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A region's mask at the size Label Studio displayed it (its ``original_*`` size)."""
    hw = (positive_size(region.get("original_height"), "original_height"),
          positive_size(region.get("original_width"), "original_width"))
    return region_mask(region, hw, max_pixels)
