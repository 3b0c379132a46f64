""""All like this one": known answers on synthetic scenes with the deterministic test models (the
disk-test backbone draws a disk at the prompt; colour-test features are each patch's mean colour),
through the library and through the backend's pre-labeling path, and the threshold that learns
from the annotators' decisions."""

import base64
import io

import cv2
import numpy as np
import pytest
from PIL import Image

RED = [(80, 80), (240, 270), (400, 100)]
BLUE = [(300, 60), (120, 250)]


def scene(red=RED, blue=BLUE):
    img = np.full((360, 480, 3), 128, np.uint8)
    for c in red:
        cv2.circle(img, c, 22, (255, 0, 0), -1)
    for x, y in blue:
        img[y:y + 60, x:x + 60] = (0, 0, 255)
    return img


def disk(img_shape, c, r=22):
    m = np.zeros(img_shape[:2], np.uint8)
    cv2.circle(m, c, r, 1, -1)
    return m > 0


@pytest.fixture(scope="module")
def agent():
    from smartsam.agent import SmartSAMAgent
    from smartsam.features import FeatureSet
    from smartsam.models import load_backbone, load_features

    return SmartSAMAgent(load_backbone("disk-test"), features=FeatureSet(load_features("colour-test")), reference_prep="none")


def red_reference(agent):
    img = scene()
    return agent.reference_from_mask(img, disk(img.shape, RED[0]))


def on_red_disks(instances):
    """Which red disk each instance lies on (its mask's centre within the disk's radius)."""
    out = []
    for inst in instances:
        ys, xs = np.nonzero(inst.mask)
        c = (xs.mean(), ys.mean())
        out.append(next((k for k, r in enumerate(RED) if np.hypot(c[0] - r[0], c[1] - r[1]) < 22), None))
    return out


def test_three_red_disks_are_found_and_the_blue_squares_are_not(agent):
    from smartsam.instances import InstanceFinder

    img = scene()
    ref = red_reference(agent)
    agent.set_image(img)
    found = InstanceFinder(agent, threshold=0.9).find(img, ref)
    assert sorted(on_red_disks(found)) == [0, 1, 2]
    assert all(i.similarity >= 0.9 for i in found)
    assert [i.similarity for i in found] == sorted((i.similarity for i in found), reverse=True) or len(found) == 3
    two = InstanceFinder(agent, max_instances=2, threshold=0.9).find(img, ref)
    assert len(two) == 2 and None not in on_red_disks(two)
    # the clicked object excluded: the other two
    rest = InstanceFinder(agent, threshold=0.9).find(img, ref, exclude=[disk(img.shape, RED[1], 30)])
    assert sorted(on_red_disks(rest)) == [0, 2]
    # an image without red: nothing, after a bounded number of agent runs
    blue_only = scene(red=[])
    agent.set_image(blue_only)
    calls = agent.backbone.decoder_calls
    assert InstanceFinder(agent, threshold=0.9).find(blue_only, ref) == []
    assert agent.backbone.decoder_calls - calls <= 3 * 4  # patience: 3 misses, each one agent run


def test_bad_instance_settings_are_refused(agent):
    from backend.config import Settings
    from backend.errors import SettingsError
    from smartsam.instances import InstanceFinder
    from smartsam.models import load_features
    from smartsam.reference import ReferenceBuilder
    from smartsam.features import FeatureSet

    for kw in ({"max_instances": 0}, {"max_instances": 10 ** 6}, {"threshold": 1.5}, {"threshold": -2}):
        with pytest.raises(ValueError):
            InstanceFinder(agent, **kw)
    for env in ({"SMARTSAM_MAX_INSTANCES": "0"}, {"SMARTSAM_MAX_INSTANCES": "1000000"}, {"SMARTSAM_INSTANCE_THRESHOLD": "1.5"},
                {"SMARTSAM_INSTANCE_THRESHOLD": "high"}, {"SMARTSAM_INSTANCE_PRECISION": "0"}):
        with pytest.raises(SettingsError):
            Settings.from_env(env)
    # a reference from another feature model: a clear error, not a wrong answer
    other = ReferenceBuilder(FeatureSet(load_features("dinov2-tiny-random")), "none").from_image(scene())
    img = scene()
    agent.set_image(img)
    with pytest.raises(ValueError, match="set the reference again"):
        InstanceFinder(agent).find(img, other)


def test_the_threshold_learns_the_known_answer_from_decisions():
    from backend.store.field_stats import calibrate_threshold

    decisions = [(0.5, False)] * 10 + [(0.6, True), (0.6, False)] * 5 + [(0.8, True)] * 15
    cal = calibrate_threshold(decisions, precision=0.9)
    # 0.6 keeps all 20 kept at precision 0.8; 0.8 keeps 15 of them at precision 1: the 0.9 target
    assert cal["threshold"] == 0.8 and cal["decisions"] == 35 and cal["kept"] == 20
    assert [c["threshold"] for c in cal["curve"]] == [0.5, 0.6, 0.8]
    assert calibrate_threshold(decisions, precision=0.8)["threshold"] == 0.6  # the most recall at 0.8
    assert calibrate_threshold(decisions[:29], precision=0.9)["threshold"] is None  # fewer than 30: the default


def _data_url(img):
    b = io.BytesIO()
    Image.fromarray(img).save(b, format="PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def test_prelabel_holds_every_instance_and_learns_from_the_decisions(tmp_path):
    """Through the backend's pre-labeling path (a real reference store and statistics): one
    prediction with a region per red disk, scores = similarities, the prediction's the lowest;
    keep / delete decisions on submitted annotations move the threshold and the model version."""
    from backend.config import Settings
    from backend.server import Services

    s = Settings(backbone="disk-test", features="colour-test", data_dir=tmp_path, allow_data_urls=True, reference_prep="none",
                 instance_threshold="0.9")
    sv = Services(s, load=False)
    sv.models.load()
    img = scene()
    ref = sv.models.make_reference(img, disk(img.shape, RED[0]))
    sv.store.put("1", "Car", ref, {"admin": "test"}, how="admin")
    model = sv.backend(_config())
    [pred] = model.predict([{"id": 1, "data": {"image": _data_url(img)}}], project="1.1")
    assert pred["mode"] == "prelabel" and pred["instances"] == {"Car": 3}, pred
    boxes = [r for r in pred["result"] if r["type"] == "rectanglelabels"]
    assert len(boxes) == 3 and pred["score"] == min(r["score"] for r in boxes)
    assert len({r["id"] for r in pred["result"]}) == len(pred["result"])
    [none] = model.predict([{"id": 2, "data": {"image": _data_url(scene(red=[]))}}], project="1.1")
    assert none == [] and any("no instance like the reference" in e for e in model.errors)  # no empty prediction
    sv.close()
    # with SMARTSAM_INSTANCE_THRESHOLD=auto: the default until 30 decisions, then the learned one
    auto = Services(s.replace(instance_threshold="auto"), load=False)
    assert auto.versions.instance_threshold("1", "Car") == (0.6, "default")
    v_default = auto.versions.model_version("1")
    assert "-adz3-c0.05-k0.5" in v_default  # the adaptive rule, named
    # before any decision, on a background fairly like the reference: exactly the disks
    reddish = painted(BACKGROUNDS["reddish (cos 0.87)"], RED)
    auto.models.load()
    [pred] = auto.backend(_config()).predict([{"id": 3, "data": {"image": _data_url(reddish)}}], project="1.1")
    assert pred["instances"] == {"Car": 3} and pred["rules"] == {"Car": "adaptive-z3-c0.05-k0.5"}, pred
    with auto.stats._write() as c:  # 40 decided instances: the annotators kept the similar ones
        for k in range(40):
            sim = 0.5 + 0.01 * k
            c.execute("INSERT INTO decisions VALUES (?,?,?,?,?,?)", (1000 + k, 5000 + k, "1", "Car", sim, int(sim >= 0.795)))
    auto.stats.on_decisions("1")  # written by hand here; FieldStats.observe says so itself
    t, how = auto.versions.instance_threshold("1", "Car")
    assert how == "learned" and t == pytest.approx(0.8, abs=1e-6)
    assert auto.versions.model_version("1") != v_default and "-thr" in auto.versions.model_version("1")
    assert "-adz" not in auto.versions.model_version("1")  # the learned threshold replaces the rule
    auto.close()


def _config():
    return """<View><Image name="image" value="$image"/>
<KeyPointLabels name="tag" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>
<RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels></View>"""


def test_one_click_with_the_all_like_this_tool(tmp_path):
    """A click with the ``all_like_this`` keypoint tool on one red disk: that disk (the agent) and
    the two others like it; an Alt-click on one of them removes it."""
    from backend.config import Settings
    from backend.server import Services

    s = Settings(backbone="disk-test", features="colour-test", data_dir=tmp_path, allow_data_urls=True, reference_prep="none",
                 instance_threshold="0.9")
    sv = Services(s, load=False)
    sv.models.load()
    cfg = _config().replace('<RectangleLabels name="box"', '<KeyPointLabels name="all_like_this" toName="image" smart="true">'
                            '<Label value="Car"/></KeyPointLabels><RectangleLabels name="box"')
    model = sv.backend(cfg)
    img = scene()
    task = {"id": 1, "data": {"image": _data_url(img)}}

    def kp(x, y, positive=True, tool="all_like_this"):
        return {"type": "keypointlabels", "from_name": tool, "to_name": "image", "original_width": 480, "original_height": 360,
                "is_positive": positive, "value": {"x": x / 480 * 100, "y": y / 360 * 100, "keypointlabels": ["Car"]}}

    [pred] = model.predict([task], context={"result": [kp(*RED[1])]}, project="1.1")
    assert pred["mode"] == "all-like-this" and pred["instances"] == 2, pred
    boxes = [r["value"] for r in pred["result"] if r["type"] == "rectanglelabels"]
    centres = [((b["x"] + b["width"] / 2) * 4.8, (b["y"] + b["height"] / 2) * 3.6) for b in boxes]
    assert len(boxes) == 3
    assert sorted(next(k for k, r in enumerate(RED) if np.hypot(c[0] - r[0], c[1] - r[1]) < 22) for c in centres) == [0, 1, 2]
    # an Alt-click on the disk at RED[2] takes that instance out
    [pred] = model.predict([task], context={"result": [kp(*RED[1]), kp(*RED[2], positive=False)]}, project="1.1")
    assert pred["mode"] == "all-like-this" and pred["instances"] == 1
    # the ordinary keypoint tool answers the one object
    [pred] = model.predict([task], context={"result": [kp(*RED[1], tool="tag")]}, project="1.1")
    assert pred["mode"] == "pure-is" and len([r for r in pred["result"] if r["type"] == "rectanglelabels"]) == 1
    sv.close()


def test_instance_matching_has_known_answers():
    from backend.cli.evaluate import match_instances

    a, b, c = (np.zeros((20, 20), bool) for _ in range(3))
    a[:10, :10] = True
    b[:10, 2:10] = True  # IoU 0.8 with a
    c[12:, 12:] = True
    assert match_instances([a, c], [b]) == [(0, 0, 0.8)]  # c matches nothing
    assert match_instances([b, a], [a]) == [(1, 0, 1.0)]  # one-to-one, best first
    assert match_instances([a], [c]) == []


def test_one_model_version_per_request(tmp_path, monkeypatch):
    """A /predict of several tasks computes the model version (a read of the reference store and
    the learned thresholds) once, whatever the number of tasks and labels."""
    from backend.config import Settings
    from backend.serving.versions import Versions
    from backend.server import Services

    s = Settings(backbone="disk-test", features="colour-test", data_dir=tmp_path, allow_data_urls=True, reference_prep="none",
                 instance_threshold="0.9")
    sv = Services(s, load=False)
    sv.models.load()
    img = scene()
    sv.store.put("1", "Car", sv.models.make_reference(img, disk(img.shape, RED[0])), {"admin": "test"}, how="admin")
    calls = []
    real = Versions.state  # what names the version: the project read at once
    monkeypatch.setattr(Versions, "state", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    tasks = [{"id": k, "data": {"image": _data_url(img)}} for k in range(3)]
    out = sv.backend(_config()).predict(tasks, project="1.1")
    assert len(out) == 3 and all(p and p["instances"] == {"Car": 3} for p in out)
    assert len(calls) == 1 and len({p["model_version"] for p in out}) == 1
    sv.close()


def test_concept_proposals_find_the_same_known_answers(agent):
    """The SAM 3 proposal path (exemplar boxes on this image -> detections -> one agent run each)
    on the same scenes, with the deterministic colour detector standing in for SAM 3's: the same
    three red disks, the clicked one excluded, nothing on a scene without red."""
    from smartsam.concepts import ColourConcepts
    from smartsam.instances import InstanceFinder

    img = scene()
    ref = red_reference(agent)
    agent.set_image(img)
    det = ColourConcepts()
    found = InstanceFinder(agent, threshold=0.9, concepts=det).find(img, ref)
    assert sorted(on_red_disks(found)) == [0, 1, 2] and {i.source for i in found} == {"sam3"}
    assert det.detector_calls == 1  # prompted once, with the best similarity peak's answer as the exemplar
    rest = InstanceFinder(agent, threshold=0.9, concepts=det).find(img, ref, exclude=[disk(img.shape, RED[1], 30)])
    assert sorted(on_red_disks(rest)) == [0, 2] and det.detector_calls == 2  # the clicked object is the exemplar
    blue_only = scene(red=[])
    agent.set_image(blue_only)
    assert InstanceFinder(agent, threshold=0.9, concepts=det).find(blue_only, ref) == []
    assert det.detector_calls == 2  # no exemplar passed the threshold: the detector is not asked


def test_backend_proposals_setting_reaches_every_answer(tmp_path):
    """SMARTSAM_PROPOSALS=sam3 through the backend (its test detector beside disk-test): the same
    known answers for a click with the all_like_this tool and for pre-labeling; every answer and
    the model version name the proposals; a backbone without a detector is refused at once."""
    from backend.config import Settings
    from backend.errors import SettingsError
    from backend.server import Services

    with pytest.raises(SettingsError, match="SMARTSAM_BACKBONE=sam3"):
        Settings.from_env({"SMARTSAM_PROPOSALS": "sam3", "SMARTSAM_BACKBONE": "sam2.1_hiera_tiny-random"})
    with pytest.raises(SettingsError, match="similarity or sam3"):
        Settings.from_env({"SMARTSAM_PROPOSALS": "dino"})
    s = Settings.from_env({"SMARTSAM_PROPOSALS": "sam3"}, backbone="disk-test", features="colour-test", data_dir=tmp_path,
                          allow_data_urls=True, reference_prep="none", instance_threshold="0.9")
    sv = Services(s, load=False)
    sv.models.load()
    assert sv.models.concepts is not None and sv.models.health()["proposals"] == "sam3"
    cfg = _config().replace('<RectangleLabels name="box"', '<KeyPointLabels name="all_like_this" toName="image" smart="true">'
                            '<Label value="Car"/></KeyPointLabels><RectangleLabels name="box"')
    model = sv.backend(cfg)
    img = scene()
    task = {"id": 1, "data": {"image": _data_url(img)}}
    kp = {"type": "keypointlabels", "from_name": "all_like_this", "to_name": "image", "original_width": 480,
          "original_height": 360, "is_positive": True,
          "value": {"x": RED[1][0] / 4.8, "y": RED[1][1] / 3.6, "keypointlabels": ["Car"]}}
    [pred] = model.predict([task], context={"result": [kp]}, project="1.1")
    assert pred["mode"] == "all-like-this" and pred["instances"] == 2 and pred["settings"]["proposals"] == "sam3"
    assert "-propsam3" in pred["model_version"]
    ref = sv.models.make_reference(img, disk(img.shape, RED[0]))
    sv.store.put("1", "Car", ref, {"admin": "test"}, how="admin")
    [pred] = sv.backend(_config()).predict([task], project="1.1")
    assert pred["instances"] == {"Car": 3} and pred["settings"]["proposals"] == "sam3", pred
    assert sv.models.concepts.detector_calls == 2
    sv.close()


# -- the adaptive rule: known answers on backgrounds from unlike the reference to fairly like it ---
FEW = [(90, 100), (330, 250)]
MANY = [(x, y) for y in (60, 180, 300) for x in (60, 180, 300, 420)]
BACKGROUNDS = {"blue (cos 0)": [(0, 0, 255)], "grey (cos 0.58)": [(128, 128, 128)], "dull red (cos 0.82)": [(180, 90, 90)],
               "reddish (cos 0.87)": [(200, 80, 80)], "blue | reddish": [(0, 0, 255), (200, 80, 80)]}


def painted(background, red):
    """A 480 x 360 image: the background's colours side by side, red disks (r 22) at ``red``."""
    img = np.zeros((360, 480, 3), np.uint8)
    for k, colour in enumerate(background):
        img[:, k * 480 // len(background):(k + 1) * 480 // len(background)] = colour
    for c in red:
        cv2.circle(img, c, 22, (255, 0, 0), -1)
    return img


def on_disks(instances, centres):
    out = []
    for inst in instances:
        ys, xs = np.nonzero(inst.mask)
        out.append(next((k for k, c in enumerate(centres) if np.hypot(xs.mean() - c[0], ys.mean() - c[1]) < 22), None))
    return out


@pytest.mark.parametrize("background", list(BACKGROUNDS))
@pytest.mark.parametrize("red", [FEW, MANY], ids=["few", "many"])
def test_the_default_rule_finds_exactly_the_instances_whatever_the_background(agent, background, red):
    """At the backend's default threshold (0.6) with the adaptive rule: every red disk once, nothing
    on the background, from a background unlike the reference to one fairly like it."""
    from smartsam.instances import InstanceFinder

    img = painted(BACKGROUNDS[background], red)
    ref = agent.reference_from_mask(img, disk(img.shape, red[0], 14))  # the object, not its rim
    agent.set_image(img)
    found = InstanceFinder(agent, threshold=0.6).find(img, ref)
    assert sorted(on_disks(found, red)) == list(range(len(red)))


def test_a_fixed_threshold_alone_keeps_a_fairly_like_background(agent):
    """Why the rule exists: at 0.6 without it, the reddish background's answers pass as instances."""
    from smartsam.instances import InstanceFinder

    img = painted(BACKGROUNDS["reddish (cos 0.87)"], FEW)
    ref = agent.reference_from_mask(img, disk(img.shape, FEW[0]))
    agent.set_image(img)
    fixed = InstanceFinder(agent, threshold=0.6, adaptive=False).find(img, ref)
    assert None in on_disks(fixed, FEW) and len(fixed) > len(FEW)
    assert InstanceFinder(agent, adaptive=False).rule == "fixed"
    assert InstanceFinder(agent).rule == "adaptive-z3-c0.05-k0.5"


def test_background_level_and_interior_clicks_have_known_answers():
    from smartsam.instances import background_level, interior_point, propose

    # a grid: 70 % at 0.1, 25 % at 0.8 (a fairly like background), 5 % at 1.0 (instances)
    sims = np.full((20, 20), 0.1)
    sims[:, 15:] = 0.8
    sims[2:4, 2:6] = 1.0
    level, spread = background_level(sims)
    assert abs(level - 0.8) < 1e-9 and spread < 1e-9
    # a disk whose centre lies on a patch corner: the click goes to its centre, not a patch centre
    img_hw, centre = (360, 480), (150.0, 150.0)  # 15-pixel patches: corners at multiples of 15
    yy, xx = (np.mgrid[:24, :32] + 0.5) * 15
    sims = np.clip(1.0 - np.hypot(xx - centre[0], yy - centre[1]) / 40.0, 0.0, None)
    (x0, y0, v), = propose(sims, img_hw, 1)
    assert np.hypot(x0 - centre[0], y0 - centre[1]) > 10  # the patch grid's answer is a corner off
    x, y = interior_point(sims, (int(y0 // 15), int(x0 // 15)), (v + 0.0) / 2, img_hw)
    assert np.hypot(x - centre[0], y - centre[1]) < 2.5
