"""References from every answer region type, through the real reference rules and stores: a
polygon or bitmask becomes an image + mask reference, a box an image reference of its crop, and a
region that cannot be read changes nothing."""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """<View><Image name="image" value="$image"/>
<KeyPointLabels name="tag" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>
<PolygonLabels name="poly" toName="image"><Label value="Car"/></PolygonLabels>
<BitmaskLabels name="bits" toName="image"><Label value="Car"/></BitmaskLabels>
<RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels></View>"""


@pytest.fixture(scope="module")
def services(tmp_path_factory, datasets):
    from backend.config import Settings
    from backend.server import Services

    s = Settings(backbone="disk-test", data_dir=tmp_path_factory.mktemp("refs"), allow_data_urls=True)
    sv = Services(s, load=False)
    sv.models.load()
    yield sv
    sv.close()


def _task(datasets, tid=1):
    data = (datasets / "GrabCut" / "img" / "106024.jpg").read_bytes()
    return {"id": tid, "data": {"image": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}


@pytest.mark.parametrize("kind", ["polygonlabels", "bitmasklabels", "rectanglelabels"])
def test_each_region_type_becomes_the_reference(services, datasets, kind):
    from backend.labelstudio.label_config import LabelConfig
    from backend.labelstudio.regions import answer_results

    cfg = LabelConfig.parse(CONFIG)
    m = np.zeros((321, 481), bool)
    m[100:220, 150:300] = True
    regions, _ = answer_results(m, cfg, "Car", 0.9)
    region = next(r for r in regions if r["type"] == kind)
    project = {"polygonlabels": "1", "bitmasklabels": "2", "rectanglelabels": "3"}[kind]
    ann = {"id": 10 + int(project), "result": [region], "completed_by": 1}
    out = services.rules.apply(ann, _task(datasets), project, "ANNOTATION_CREATED", cfg)
    assert out["reference"] == ["Car"], out
    meta = services.store.meta(project, "Car")
    if kind == "rectanglelabels":  # a box says where, not which pixels: an image reference of its crop
        assert meta.kind == "image" and not meta.public()["has_mask"]
    else:
        assert meta.kind == "mask"
        png = services.store.mask_png(project, "Car")
        stored = np.asarray(Image.open(io.BytesIO(png))) > 0
        assert (stored == m).mean() > 0.99


def test_an_unreadable_region_changes_no_reference(services, datasets):
    from backend.errors import RequestError
    from backend.labelstudio.label_config import LabelConfig

    from backend.labelstudio.regions import answer_results

    cfg = LabelConfig.parse(CONFIG)
    store = services.store
    m = np.zeros((321, 481), bool)
    m[50:150, 50:150] = True
    good = next(r for r in answer_results(m, cfg, "Car", 0.9)[0] if r["type"] == "polygonlabels")
    services.rules.apply({"id": 98, "result": [good]}, _task(datasets), "9", "ANNOTATION_CREATED", cfg)
    before = [v.id for v in store.history("9", "Car")]
    assert before
    bad = {"type": "bitmasklabels", "from_name": "bits", "to_name": "image", "original_width": 481, "original_height": 321,
           "value": {"imageDataURL": "data:image/png;base64," + base64.b64encode(b"not a png").decode(), "bitmasklabels": ["Car"]}}
    tick = {"type": "choices", "from_name": "r", "to_name": "image", "value": {"choices": ["Use as reference"]}}
    with pytest.raises(RequestError, match="not a PNG"):
        services.rules.apply({"id": 99, "result": [bad, tick]}, _task(datasets), "9", "ANNOTATION_CREATED", cfg)
    assert [v.id for v in store.history("9", "Car")] == before
