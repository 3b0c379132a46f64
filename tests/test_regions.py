"""Masks <-> Label Studio regions: known answers for every conversion, and every bad region refused."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from backend.errors import RequestError
from backend.labelstudio.label_config import LabelConfig
from backend.labelstudio.regions import (PolygonOptions, answer_results, mask_to_polygons, primary_regions, rasterize_polygons,
                             region_mask, region_shown_mask)

CONFIG = """<View><Image name="image" value="$image"/>
<KeyPointLabels name="tag" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>
<BrushLabels name="brush" toName="image"><Label value="Car"/></BrushLabels>
<PolygonLabels name="poly" toName="image"><Label value="Car"/></PolygonLabels>
<BitmaskLabels name="bits" toName="image"><Label value="Car"/></BitmaskLabels>
<RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels></View>"""


def iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


def test_square_ring_and_blobs_give_their_known_polygons():
    sq = np.zeros((80, 100), bool)
    sq[10:50, 20:70] = True
    [p] = mask_to_polygons(sq)
    assert len(p) == 4 and iou(rasterize_polygons([p], sq.shape), sq) == 1.0
    yy, xx = np.mgrid[:120, :120]
    r = np.hypot(yy - 60, xx - 60)
    ring = (r < 50) & (r > 25)
    [outer] = mask_to_polygons(ring)  # Label Studio polygons have no holes: the outer polygon
    filled = rasterize_polygons([outer], ring.shape)
    assert iou(filled, r < 50) >= 0.95 and filled[60, 60]
    two = np.zeros((100, 100), bool)
    two[5:25, 5:25] = True
    two[40:95, 40:95] = True
    parts = mask_to_polygons(two)
    assert len(parts) == 2 and len(parts[0]) == 4 and parts[0][:, 0].min() == 40  # largest first
    assert len(mask_to_polygons(two, PolygonOptions(parts="largest"))) == 1
    assert len(mask_to_polygons(two, PolygonOptions(min_area=401))) == 1  # the 20x20 blob is 400 px


def test_polygons_of_real_masks_keep_the_target_iou(datasets):
    from smartsam.eval.datasets import load_dataset, load_gt

    for s in load_dataset(datasets / "COCO_MVal-dev")[:12]:
        gt = load_gt(s)[0] > 0
        polys = mask_to_polygons(gt, PolygonOptions(min_area=1))
        for p in polys:
            assert len(p) >= 3
        assert iou(rasterize_polygons(polys, gt.shape), gt) >= 0.9  # holes and slivers cost the rest


def test_every_answer_tag_round_trips():
    cfg = LabelConfig.parse(CONFIG)
    m = np.zeros((60, 90), bool)
    m[10:40, 30:80] = True
    m[45:50, 5:10] = True  # a second, 25-pixel part
    regions, shown = answer_results(m, cfg, "Car", 0.9)
    kinds = [r["type"] for r in regions]
    assert kinds == ["brushlabels", "polygonlabels", "polygonlabels", "bitmasklabels", "rectanglelabels"]
    assert len({r["id"] for r in regions}) == len(regions)
    by = {r["type"]: r for r in regions}
    assert np.array_equal(region_shown_mask(by["brushlabels"]), m)
    assert np.array_equal(region_shown_mask(by["bitmasklabels"]), m)  # pixel exact
    assert by["polygonlabels"]["value"]["closed"] is True and by["polygonlabels"]["value"]["polygonlabels"] == ["Car"]
    polys = [r for r in regions if r["type"] == "polygonlabels"]
    assert iou(np.logical_or.reduce([region_shown_mask(p) for p in polys]), m) == 1.0  # rectangles: exact
    box = by["rectanglelabels"]["value"]
    assert (box["x"], box["width"]) == pytest.approx((5 / 90 * 100, 75 / 90 * 100))
    assert region_shown_mask(by["rectanglelabels"]).sum() == 75 * 40
    # at the displayed size Label Studio says, and read back at the image's
    regions, shown = answer_results(m, cfg, "Car", 0.9, shown=(180, 120))
    assert shown.shape == (120, 180) and all(r["original_width"] == 180 for r in regions)
    assert iou(region_mask([r for r in regions if r["type"] == "polygonlabels"][0], (60, 90)), m & ~(np.arange(60)[:, None] >= 45)) > 0.95
    # an annotation holding all of them is one object per region of its first answer tag
    assert [k for k, _, _ in primary_regions(regions, cfg)] == [0]
    assert len(primary_regions([r for r in regions if r["type"] != "brushlabels"], cfg)) == 2  # the polygons


def _png_url(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def _poly(points, w=100, h=100):
    return {"type": "polygonlabels", "original_width": w, "original_height": h, "value": {"points": points, "polygonlabels": ["Car"]}}


@pytest.mark.parametrize("region, words", [
    (_poly([[10, 10], [50, 10]]), "at least 3 points"),
    (_poly([[10, 10], [150, 10], [50, 50]]), "from 0 to 100"),
    (_poly([[10, 10], [-5, 10], [50, 50]]), "from 0 to 100"),
    (_poly([[10, 10], [float("nan"), 10], [50, 50]]), "from 0 to 100"),
    (_poly([[10, 10], ["x", 10], [50, 50]]), "from 0 to 100"),
    (_poly([[10, 10], [60, 60], [60, 10], [10, 60]]), "self-intersecting"),
    (_poly([10, 20, 30]), "[x %, y %]"),
    ({"type": "bitmasklabels", "original_width": 10, "original_height": 10,
      "value": {"imageDataURL": "data:image/jpeg;base64,/9j/4AAQ"}}, "data:image/png"),
    ({"type": "bitmasklabels", "original_width": 10, "original_height": 10,
      "value": {"imageDataURL": "data:image/png;base64," + base64.b64encode(b"GIF89a....").decode()}}, "not a PNG"),
    ({"type": "bitmasklabels", "original_width": 10, "original_height": 10,
      "value": {"imageDataURL": _png_url(np.zeros((12, 10), np.uint8))}}, "does not match"),
    ({"type": "bitmasklabels", "original_width": 10, "original_height": 10,
      "value": {"imageDataURL": "data:image/png;base64,%%%"}}, "not base64"),
    ({"type": "bitmasklabels", "original_width": 100000, "original_height": 100000,
      "value": {"imageDataURL": _png_url(np.zeros((10, 10), np.uint8))}}, "SMARTSAM_MAX_PIXELS"),
    ({"type": "rectanglelabels", "original_width": 10, "original_height": 10, "value": {"x": 1, "y": 2, "width": "w", "height": 3}},
     "width"),
    ({"type": "choices", "value": {}}, "not a mask"),
])
def test_bad_regions_are_refused_with_a_clear_error(region, words):
    with pytest.raises(RequestError, match=words.replace("[", r"\[").replace("%", "%")):
        region_mask(region, (100, 100))


def test_a_bitmask_over_the_pixel_cap_is_refused_before_decoding():
    big = io.BytesIO()
    Image.new("1", (5000, 5000)).save(big, format="PNG")
    region = {"type": "bitmasklabels", "original_width": 5000, "original_height": 5000,
              "value": {"imageDataURL": "data:image/png;base64," + base64.b64encode(big.getvalue()).decode()}}
    with pytest.raises(RequestError, match="SMARTSAM_MAX_PIXELS"):
        region_mask(region, (100, 100), max_pixels=1_000_000)


def test_every_polygon_we_make_reads_back(rng):
    """Polygons of irregular masks, through Label Studio's 4-decimal percent points and back: none
    is refused (OpenCV contours touch themselves at pixel corners; that is not a crossing)."""
    import cv2

    from backend.labelstudio.regions import polygon_points_pct

    n = 0
    for _ in range(10):
        m = cv2.GaussianBlur(rng.normal(size=(321, 481)).astype(np.float32), (0, 0), 3) > 0.1
        for p in mask_to_polygons(m):
            region = _poly(polygon_points_pct(p, (481, 321)), 481, 321)
            assert region_mask(region, (321, 481)).any()
            n += 1
    assert n > 1000
