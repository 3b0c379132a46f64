"""The backend as Label Studio meets it: a real gunicorn process, real HTTP, the real model
architecture (random weights). Includes the catalogue of bad inputs (issue: reliability)."""

import base64
import io
import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend_helpers import (BUSY, LABEL_CONFIG, TOKEN, Backend, ImageServer, keypoint, png_bytes, predict_body, raw_oversized_post,
                             rle_mask)

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def images(datasets):
    penguin = (datasets / "GrabCut/img/106024.jpg").read_bytes()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    b = io.BytesIO()
    Image.fromarray(rgb).save(b, format="JPEG", exif=exif.tobytes())
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")
    return {
        "penguin.jpg": penguin,
        "coco.jpg": (datasets / "COCO_MVal-dev/img/airplane00_000000281693.jpg").read_bytes(),
        "gray.png": png_bytes(rng.integers(0, 255, (50, 70), dtype=np.uint8)),
        "rgba.png": png_bytes(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8)),
        "sixteen.png": png_bytes(rng.integers(0, 65535, (50, 70), dtype=np.uint16).astype(np.uint16)),
        "exif.jpg": b.getvalue(),
        "truncated.jpg": penguin[: len(penguin) // 3],
        "notimage.jpg": b"this is not an image",
        "bomb.png": bomb.getvalue(),
    }


@pytest.fixture(scope="module")
def server(images):
    s = ImageServer(images)
    yield s
    s.close()


@pytest.fixture(scope="module")
def backend(server, tmp_path_factory, images):
    docs = tmp_path_factory.mktemp("documents")
    (docs / "penguin.jpg").write_bytes(images["penguin.jpg"])
    b = Backend(tmp_path_factory.mktemp("backend") / "data", env={
        "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN, "SMARTSAM_ADMIN_TOKEN": "admin-secret",
        "SMARTSAM_IMAGE_TIMEOUT": "3", "SMARTSAM_MAX_REQUEST_BYTES": str(1 << 20), "SMARTSAM_MAX_PIXELS": "40000000",
        "SMARTSAM_IMAGE_MAX_BYTES": str(20 << 20), "LOCAL_FILES_DOCUMENT_ROOT": str(docs),
        # random weights: pre-labels keep every proposal, at most 2 per label
        "SMARTSAM_INSTANCE_THRESHOLD": "-1", "SMARTSAM_MAX_INSTANCES": "2",
        # four agent clicks at once beside a busy process took 79 s on a slow 2-core machine, near
        # the 90 s default, where they would be cut (partial); spinning threads (the 16x this
        # module's concurrency test guards against) would still take far longer than this
        "SMARTSAM_REQUEST_TIMEOUT": "240"}).start()
    yield b
    b.stop()


def upload(name):
    return f"/data/upload/1/{name}"


def test_health_reports_model_device_and_weights(backend):
    """The public /health says status, model and readiness only; the rest (counters, the
    background work and its errors, the database) is behind the admin token."""
    status, h = backend.get("/health")
    assert status == 200 and h == {"status": "UP", "model_class": "SmartSAMBackend", "model": "sam2.1_hiera_tiny-random",
                                   "ready": True}
    assert backend.get("/admin/health")[0] == 401
    h = backend.health()
    assert h["model"] == "sam2.1_hiera_tiny-random" and h["device"] == "cpu"
    assert h["weights_loaded"] is True and h["random_weights"] is True
    assert {"jobs", "database", "scheduler", "requests"} <= set(h)
    status, s = backend.post("/setup", {"project": "1.1", "schema": LABEL_CONFIG})
    assert status == 200 and s["model_version"].startswith("smartsam-")


def test_one_click_gives_a_brush_mask_of_the_image_size(backend, server):
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50)]))
    assert status == 200 and "errors" not in r
    pred = r["results"][0]
    assert pred["mode"] == "pure-is" and pred["model_version"] == r["model_version"]
    res = pred["result"][0]
    assert res["type"] == "brushlabels" and res["from_name"] == "mask" and res["to_name"] == "image"
    assert res["value"]["brushlabels"] == ["Object"] and res["value"]["format"] == "rle"
    assert (res["original_width"], res["original_height"]) == (481, 321)
    assert rle_mask(res).shape == (321, 481)
    # the token went to Label Studio's host only
    assert (upload("penguin.jpg"), f"Token {TOKEN}") in server.hits


def test_more_clicks_refine_and_box_prompt(backend):
    ctx = [keypoint(50, 50), keypoint(10, 10, positive=False)]
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), ctx))
    assert status == 200 and r["results"][0]["mode"] == "refine"
    rect = {"original_width": 481, "original_height": 321, "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
            "value": {"x": 20, "y": 20, "width": 40, "height": 50, "rectanglelabels": ["Background object"]}}
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [rect]))
    assert status == 200 and r["results"][0]["mode"] == "box"
    assert r["results"][0]["result"][0]["value"]["brushlabels"] == ["Background object"]


@pytest.mark.parametrize("name, displayed_hw", [("gray.png", (50, 70)), ("rgba.png", (50, 70)), ("sixteen.png", (50, 70)),
                                                ("exif.jpg", (60, 40))])
def test_unusual_images_work_aligned_with_what_the_annotator_sees(backend, name, displayed_hw):
    h, w = displayed_hw
    status, r = backend.post("/predict", predict_body(upload(name), [keypoint(50, 50, w=w, h=h)]))
    assert status == 200 and "errors" not in r, r
    res = r["results"][0]["result"][0]
    assert (res["original_height"], res["original_width"]) == (h, w)  # EXIF applied: 60x40 shows as 40 wide
    assert rle_mask(res).shape == (h, w)


def _kp_value(**v):
    k = keypoint(50, 50)
    k["value"] = {**k["value"], **v}
    return k


BAD_INPUTS = [
    # (name, how to send it, expected HTTP status, text the error contains)
    ("malformed JSON", lambda b: b.post("/predict", b"{not json", raw=True), 400, "malformed JSON"),
    ("multipart body", lambda b: b.request("POST", "/predict", b"--x\r\n\r\n", {"Content-Type": "multipart/form-data; boundary=x"}), 415, "application/json"),
    ("JSON array body", lambda b: b.post("/predict", [1, 2]), 400, "JSON object"),
    ("oversized JSON", lambda b: raw_oversized_post(b.port, "/predict", json.dumps({"pad": "x" * (2 << 20)}).encode()), 413, "over the limit"),
    ("unknown endpoint", lambda b: b.post("/nope", {}), 404, "no endpoint"),
    ("GET on /predict", lambda b: b.get("/predict"), 405, "GET not allowed on /predict: POST"),
    ("POST on /metrics", lambda b: b.post("/metrics", {}), 405, "not allowed on /metrics"),
    ("POST on /health", lambda b: b.post("/health", {}), 405, "not allowed on /health"),
    ("no tasks", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg")), "tasks": []}), 200, "no tasks"),
    ("no label_config", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg"), [keypoint(5, 5)]), "label_config": None}), 200, "no label_config"),
    ("config without an answer tag", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg"), [keypoint(5, 5)]), "label_config": '<View><Image name="image" value="$image"/></View>'}), 200, "no answer tag on the image"),
    ("config not XML", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg"), [keypoint(5, 5)]), "label_config": "<View><Image"}), 200, "not valid XML"),
    ("project that is not an id", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg"), [keypoint(5, 5)]), "project": "x; drop"}), 200, "must be a Label Studio project id"),
    ("pre-label without a project", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg")), "project": None}), 200, "pre-labeling needs the project"),
    ("task without data", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg"), [keypoint(5, 5)]), "tasks": [{"id": 3}]}), 200, "has no data"),
    ("task without image", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg"), [keypoint(5, 5)]), "tasks": [{"id": 3, "data": {"text": "x"}}]}), 200, "has no image"),
    ("context.result not a list", lambda b: b.post("/predict", {**predict_body(upload("penguin.jpg")), "params": {"context": {"result": "x"}}}), 200, "params.context.result: Input should be a valid list"),
    ("click outside the image", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(150, 50)])), 200, "outside the 481x321 image"),
    ("NaN coordinates", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [_kp_value(x=math.nan)])), 200, "not a finite point"),
    ("non-numeric coordinates", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [_kp_value(x="abc")])), 200, "context.result[0].value.x: Input should be a valid number"),
    ("negative-only clicks", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50, positive=False)])), 200, "only negative clicks"),
    ("unknown label", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50, label="Zebra")])), 200, "is not among the answer tags' labels"),
    ("unsupported prompt type", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [{**keypoint(5, 5), "type": "polygonlabels"}])), 200, "unsupported prompt type"),
    ("file URL in task data", lambda b: b.post("/predict", predict_body("file:///etc/passwd", [keypoint(5, 5)])), 200, "unsupported image URL scheme"),
    ("unknown URI scheme: Label Studio decides", lambda b: b.post("/predict", predict_body("ftp://example.org/a.jpg", [keypoint(5, 5)])), 200, "could not resolve the cloud storage URI"),
    ("data: URL (off by default)", lambda b: b.post("/predict", predict_body("data:image/png;base64,iVBORw0KGgo=", [keypoint(5, 5)])), 200, "SMARTSAM_ALLOW_DATA_URLS"),
    ("redirect to file://", lambda b: b.post("/predict", predict_body("/redirect-file", [keypoint(5, 5)])), 200, "refusing to fetch a file: URL"),
    ("local-files path traversal", lambda b: b.post("/predict", predict_body("/data/local-files/?d=../../../../etc/passwd", [keypoint(5, 5)])), 200, "outside LOCAL_FILES_DOCUMENT_ROOT"),
    ("internal URL in task data", lambda b: b.post("/predict", predict_body("http://169.254.169.254/latest/meta-data/", [keypoint(5, 5)])), 200, "refusing to fetch"),
    ("redirect to another host", lambda b: b.post("/predict", predict_body("/redirect-away", [keypoint(5, 5)])), 200, "refusing to fetch"),
    ("HTTP 401 fetching the image", lambda b: b.post("/predict", predict_body("/status/401", [keypoint(5, 5)])), 200, "LABEL_STUDIO_API_KEY"),
    ("HTTP 404 fetching the image", lambda b: b.post("/predict", predict_body("/status/404", [keypoint(5, 5)])), 200, "HTTP 404"),
    ("HTTP 500 fetching the image", lambda b: b.post("/predict", predict_body("/status/500", [keypoint(5, 5)])), 200, "HTTP 500"),
    ("slow image download", lambda b: b.post("/predict", predict_body("/slow", [keypoint(5, 5)])), 200, "image download failed"),
    ("image larger than the byte limit", lambda b: b.post("/predict", predict_body("/huge", [keypoint(5, 5)])), 200, "SMARTSAM_IMAGE_MAX_BYTES"),
    ("truncated image", lambda b: b.post("/predict", predict_body(upload("truncated.jpg"), [keypoint(5, 5)])), 200, "cannot read image data"),
    ("not an image", lambda b: b.post("/predict", predict_body(upload("notimage.jpg"), [keypoint(5, 5)])), 200, "cannot read image data"),
    ("pixel bomb", lambda b: b.post("/predict", predict_body(upload("bomb.png"), [keypoint(5, 5)])), 200, "over the limit"),
    ("webhook without action", lambda b: b.post("/webhook", {"annotation": {}}), 400, "without action"),
    ("webhook without payload", lambda b: b.post("/webhook", {"action": "ANNOTATION_CREATED", "project": {"label_config": LABEL_CONFIG, "id": 1}}), 201, "send payload"),
    ("webhook with a bad annotation id", lambda b: b.post("/webhook", {"action": "ANNOTATION_UPDATED", "annotation": {"id": "7; drop"}}), 201, "no annotation id"),
    ("deletion webhook without a list", lambda b: b.post("/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": "1,2"}), 201, '"annotations": []'),
    ("deletion webhook with ids that are not integers", lambda b: b.post("/webhook", {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": "1"}, {"id": True}, 5, None]}), 201, '"annotations": []'),
    ("training webhook", lambda b: b.post("/webhook", {"action": "START_TRAINING", "project": {"id": 1}}), 201, "nothing to train"),
    ("webhook of another event", lambda b: b.post("/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 1}}), 200, "Unknown event"),
    ("bulk import webhook without ids", lambda b: b.post("/webhook", {"action": "ANNOTATIONS_CREATED", "annotation": [{"id": "x"}, 3]}), 201, "no annotation id"),
    ("setup with unknown extra params", lambda b: b.post("/setup", {"project": "1.1", "schema": LABEL_CONFIG, "extra_params": {"chains": 2}}), 400, "unknown extra params ['chains']"),
    ("setup with a bad chain length", lambda b: b.post("/setup", {"project": "1.1", "schema": LABEL_CONFIG, "extra_params": {"chain_length": "many"}}), 400, "chain_length must be a whole number"),
    ("version id past SQLite's integers", lambda b: b.get("/admin/versions/99999999999999999999999", headers=ADMIN), 404, "no reference version"),
    ("version id that is not a number", lambda b: b.get("/admin/versions/abc/thumb.jpg", headers=ADMIN), 404, "no reference version"),
    ("GET on a restore", lambda b: b.get("/admin/versions/1/restore", headers=ADMIN), 405, "POST"),
    ("POST on a reference", lambda b: b.post("/admin/references/1/Object", {}, headers=ADMIN), 405, "GET, PUT, DELETE"),
    ("setup with a config SmartSAM cannot use", lambda b: b.post("/setup", {"project": "1.1", "schema": '<View><Image name="image" value="$image"/></View>'}), 400, "no answer tag on the image"),
    ("admin without token", lambda b: b.get("/admin/references"), 401, "admin token required"),
    # seen answering 500 before every body was parsed against a schema (backend/labelstudio/schemas.py)
    ("keypoint labels that are an object", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [_kp_value(keypointlabels={"a": 1})])), 200, "value.keypointlabels: Input should be a valid list"),
    ("keypoint labels that are a number", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [_kp_value(keypointlabels=7)])), 200, "value.keypointlabels: Input should be a valid list"),
    ("displayed width Infinity", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [{**keypoint(50, 50), "original_width": math.inf}])), 200, "original_width: Input should be a finite number"),
    ("displayed width 1e400", lambda b: b.post("/predict", json.dumps(predict_body(upload("penguin.jpg"), [{**keypoint(50, 50), "original_width": 7}])).replace('"original_width": 7', '"original_width": 1e400').encode(), raw=True), 200, "original_width: Input should be a finite number"),
    ("displayed width 2.5", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [{**keypoint(50, 50), "original_width": 2.5}])), 200, "original_width must be a positive whole number"),
    ("version id of a Unicode digit", lambda b: b.get("/admin/versions/%C2%B2", headers=ADMIN), 404, "no reference version"),
    ("project id of a Unicode digit", lambda b: b.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50)], project="\u00b2.1")), 200, "must be a Label Studio project id"),
    ("Retrieve predictions of tasks without integer ids", lambda b: b.post("/predict", {"tasks": [{"id": "a", "data": {"image": upload("penguin.jpg")}}, {"id": 2.5, "data": {"image": upload("penguin.jpg")}}], "project": "9.1", "label_config": LABEL_CONFIG}), 200, "no reference for label"),
    ("annotation id past 64 bits", lambda b: b.post("/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"id": 1 << 63}}), 201, "no annotation id"),
    ("reference text that is not text", lambda b: b.request("PUT", "/admin/references/3/Object", json.dumps({"text": ["a"]}).encode(), {**ADMIN, "Content-Type": "application/json"}), 400, "text: Input should be a valid string"),
    ("image path with a space (never fetchable)", lambda b: b.post("/predict", predict_body("/data/upload/1/a b.jpg", [keypoint(5, 5)])), 200, "image download failed"),
    ("local-files name too long for the file system", lambda b: b.post("/predict", predict_body("/data/local-files/?d=" + "a" * 5000, [keypoint(5, 5)])), 200, "cannot name a file"),
    ("reference task that is not an id", lambda b: b.request("PUT", "/admin/references/3/Object", json.dumps({"task": True}).encode(), {**ADMIN, "Content-Type": "application/json"}), 400, "task"),
    ("admin with a wrong token", lambda b: b.get("/admin/references", headers={"Authorization": "Bearer nope"}), 401, "admin token required"),
]


@pytest.mark.parametrize("name, send, status, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_catalogue(backend, name, send, status, message):
    got, body = send(backend)
    assert got == status, body
    text = json.dumps(body) if not isinstance(body, bytes) else body.decode(errors="replace")
    assert message in text, text
    assert TOKEN not in text and "admin-secret" not in text  # no secret in an error
    if got == 200 and isinstance(body, dict) and body.get("results"):
        first = body["results"][0]
        assert first == [] or first["result"] == []  # a failed task gets no mask (a pre-label: no prediction), and says why


def test_server_survives_the_catalogue(backend):
    for _, send, _, _ in BAD_INPUTS:
        send(backend)
    assert backend.health()["status"] == "UP"
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(40, 60)]))
    assert status == 200 and rle_mask(r["results"][0]["result"][0]).shape == (321, 481)
    log = backend.log_path.read_text()
    assert TOKEN not in log and "admin-secret" not in log
    assert "refusing to fetch" in log  # errors are in the log too


def wait_events(backend, key: str, at_least: int, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ev = backend.health()["jobs"]["events"]
        if ev[key] >= at_least and ev["waiting"] == 0:
            return ev
        time.sleep(0.2)
    raise AssertionError(f"events: {backend.health()['jobs']}")


def test_forged_webhook_changes_nothing(backend):
    """A webhook is only a notice: an annotation the Label Studio host does not confirm (this
    stand-in answers 404 for /api/annotations/...) never becomes a reference, whatever the body says."""
    project = "5.1700000000"
    body = json.dumps({"text": "a penguin"}).encode()
    assert backend.request("PUT", "/admin/references/5/Object", body, {**ADMIN, "Content-Type": "application/json"})[0] == 200
    before = backend.get("/admin/references/5/Object", headers=ADMIN)[1]
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50)], project=project))
    res = r["results"][0]["result"][0]
    forged = {"action": "ANNOTATION_UPDATED", "project": {"id": 5, "label_config": LABEL_CONFIG},
              "task": {"id": 5, "project": 5, "data": {"image": upload("coco.jpg")}},
              "annotation": {"id": 11, "result": [res, {"type": "choices", "from_name": "reference", "to_name": "image",
                                                        "value": {"choices": ["Use as reference"]}}]}}
    rejected = backend.health()["jobs"]["events"]["rejected"]
    status, w = backend.post("/webhook", forged)
    assert status == 201 and w["queued"] is True  # 201, as label-studio-ml answers annotation events
    wait_events(backend, "rejected", rejected + 1)
    assert backend.get("/admin/references/5/Object", headers=ADMIN)[1] == before  # still the admin's text
    assert "not confirmed by Label Studio" in backend.log_path.read_text()


def test_admin_api_references_and_prelabel(backend, server):
    project = "7.1700000000"
    status, s = backend.request("PUT", "/admin/references/7/Background%20object", json.dumps({"text": "a penguin"}).encode(),
                                {**ADMIN, "Content-Type": "application/json"})
    assert status == 200 and s["kind"] == "text"
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50, label="Background object")], project=project))
    assert r["results"][0]["mode"] == "reference-text"
    # other projects and labels are untouched
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50)], project=project))
    assert r["results"][0]["mode"] == "pure-is"
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50, label="Background object")], project="8.1"))
    assert r["results"][0]["mode"] == "pure-is"
    m = np.zeros((321, 481), np.uint8)
    m[100:200, 200:300] = 255
    body = {"image_b64": base64.b64encode(server.files["penguin.jpg"]).decode(), "mask_b64": base64.b64encode(png_bytes(m)).decode()}
    v0 = backend.post("/setup", {"project": "9.1", "schema": LABEL_CONFIG})[1]["model_version"]
    status, s = backend.request("PUT", "/admin/references/9/Object", json.dumps(body).encode(), {**ADMIN, "Content-Type": "application/json"})
    assert status == 200 and s["kind"] == "mask"
    png = backend.get("/admin/references/9/Object/mask.png", headers=ADMIN)[1]
    assert Image.open(io.BytesIO(png)).size == (481, 321)
    # the project's model version follows its references
    v1 = backend.post("/setup", {"project": "9.1", "schema": LABEL_CONFIG})[1]["model_version"]
    assert v1 != v0 and v1.startswith("smartsam-") and v1.split("-")[-1] != "noref"
    # pre-labeling (no click) with a reference, and without one
    status, r = backend.post("/predict", predict_body(upload("coco.jpg"), None, project="9.1"))
    pred = r["results"][0]
    assert pred["mode"] == "prelabel" and [x["value"]["brushlabels"] for x in pred["result"]] == [["Object"]]
    assert pred["model_version"] == v1 == r["model_version"]
    assert any("no reference for label 'Background object'" in e for e in pred["errors"])
    status, r = backend.post("/predict", predict_body(upload("coco.jpg"), None, project="10.1"))
    assert r["results"] == [[]] and "no reference" in r["errors"][0]  # no prediction, and why
    # an upload over the pixel cap is refused before decoding
    big = io.BytesIO()
    Image.new("1", (7000, 7000)).save(big, format="PNG")
    body = {"image_b64": body["image_b64"], "mask_b64": base64.b64encode(big.getvalue()).decode()}
    status, e = backend.request("PUT", "/admin/references/9/Object", json.dumps(body).encode(), {**ADMIN, "Content-Type": "application/json"})
    assert status == 400 and "over the limit" in e["error"]
    # clear
    status, d = backend.request("DELETE", "/admin/references/7/Background%20object", headers=ADMIN)
    assert d["deleted"] == 1
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50, label="Background object")], project=project))
    assert r["results"][0]["mode"] == "pure-is"


def test_damaged_reference_is_reported_not_used(backend):
    body = json.dumps({"text": "a bird"}).encode()
    backend.request("PUT", "/admin/references/21/Object", body, {**ADMIN, "Content-Type": "application/json"})
    assert backend.get("/admin/references/21/Object", headers=ADMIN)[1]["kind"] == "text"
    from backend.store.references import ReferenceStore

    store = ReferenceStore(backend.data_dir)
    name = store.meta("21", "Object").feature_file
    with store.db.write() as c:  # damaged in the database, as a bad disk or a bad restore would leave it
        c.execute("UPDATE blobs SET data = ? WHERE name = ?", (store._read_file(name)[:-7] + b"garbage", name))
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(50, 50)], project="21.1"))
    assert status == 200 and r["results"][0]["mode"] == "pure-is"
    assert "damaged" in r["results"][0]["errors"][0]
    assert any("damaged" in p for p in backend.get("/admin/references", headers=ADMIN)[1]["problems"])


def test_concurrent_clients_get_their_own_answers(backend, server, tmp_path):
    """4 clients x 5 clicks, different projects and images, at once, with a busy process beside
    the backend (a neighbour on the box: Label Studio, another replica): every answer is for the
    right image and equals what the same request gets alone, from another backend process (so no
    cache can make them equal; up to the last bits of another thread count), and none is cut at
    its deadline."""
    import subprocess

    jobs = {0: ("penguin.jpg", 481, 321), 1: ("coco.jpg", 640, 481), 2: ("gray.png", 70, 50), 3: ("rgba.png", 70, 50)}

    def requests_for(c):
        name, w, h = jobs[c]
        first = keypoint(47, 53, w=w, h=h)
        out = [predict_body(upload(name), [first], project=f"{100 + c}.1")]
        for k in range(4):  # refinements (cheap): 9 of them showed nothing 4 do not
            out.append(predict_body(upload(name), [first, keypoint(10 + 8 * k, 15, positive=False, w=w, h=h)], project=f"{100 + c}.1"))
        return out

    other = Backend(tmp_path / "alone", env={"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN}).start()
    try:
        alone = {c: [other.post("/predict", b)[1] for b in requests_for(c)] for c in jobs}
    finally:
        other.stop()
    # the images encoded first, as the module's earlier tests leave them: four new images and four
    # agent clicks beside the busy process at once outlast the 90 s deadline on a slow 2-core
    # machine (seen run alone: every first click answered "try again"); a box encodes without
    # touching the agent's answers
    for c, (name, w, h) in jobs.items():
        rect = {"original_width": w, "original_height": h, "type": "rectanglelabels", "from_name": "rect", "to_name": "image",
                "value": {"x": 20, "y": 20, "width": 40, "height": 50, "rectanglelabels": ["Background object"]}}
        assert backend.post("/predict", predict_body(upload(name), [rect], project=f"{100 + c}.1"))[1]["results"][0]["mode"] == "box"
    got, errors = {c: [] for c in jobs}, []

    def client(c):
        try:
            for b in requests_for(c):
                got[c].append(backend.post("/predict", b)[1])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in jobs]
    hog = subprocess.Popen(BUSY)  # a busy neighbour
    try:
        t0 = time.time()
        [t.start() for t in threads]
        [t.join(600) for t in threads]
    finally:
        hog.kill()
        hog.wait()
    assert not errors
    for c, (name, w, h) in jobs.items():
        assert len(got[c]) == 5
        for k, r in enumerate(got[c]):
            assert not r["results"][0].get("partial"), r["results"][0]  # not cut at the deadline
            res = r["results"][0]["result"][0]
            assert (res["original_width"], res["original_height"]) == (w, h)
            assert rle_mask(res).shape == (h, w)
            other = alone[c][k]["results"][0]
            # Beside the busy process the thread governor runs steps with 1 thread, alone it runs 2;
            # fp32 sums split over another thread count differ in their last bits, and a pixel whose
            # logit is that close to 0 can flip (seen: 1 of 307840 on coco.jpg's first click, the
            # same in-process at torch.set_num_threads 1 against 2). A job's answer is bit-identical
            # to its answer alone at one thread count (test_batch.py's mixed batch); here the same
            # candidate (mode, score) and the same mask up to such pixels, while another image's
            # answer differs by far more.
            a, b = rle_mask(res), rle_mask(other["result"][0])
            # the score rounded to 4 places: the last bits can cross a rounding boundary
            same = r["results"][0]["mode"] == other["mode"] and abs(r["results"][0]["score"] - other["score"]) <= 1.5e-4
            if not same or int((a != b).sum()) > max(2, a.size // 10000):
                pytest.fail(f"client {c} request {k}: {int((a != b).sum())} of {a.size} pixels differ; shared backend "
                            f"{ {x: r['results'][0].get(x) for x in ('mode', 'score')} }, alone "
                            f"{ {x: other.get(x) for x in ('mode', 'score')} }")
    # the two images of the same size: another image's answer is far from this tolerance
    for k in range(5):
        g, r = (alone[c][k]["results"][0] for c in (2, 3))
        assert abs(g["score"] - r["score"]) > 1e-3 or int((rle_mask(g["result"][0]) != rle_mask(r["result"][0])).sum()) > 100
    assert backend.health()["status"] == "UP"
    print(f"20 concurrent requests in {time.time() - t0:.1f} s")


def test_basic_auth_and_missing_checkpoint(tmp_path, server):
    b = Backend(tmp_path / "data", env={"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw", "LABEL_STUDIO_URL": server.url,
                                        "LABEL_STUDIO_API_KEY": TOKEN}).start(wait_loaded=False)
    try:
        status, body = b.get("/health", headers={"Authorization": None})
        assert status == 401 and "basic auth" in body["error"]
        auth = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
        assert b.get("/health", headers=auth)[0] == 200
        assert b.get("/health", headers={"Authorization": "Basic " + base64.b64encode(b"ls:no").decode()})[0] == 401
        # non-ASCII credentials, and a non-ASCII header, are a 401 like any wrong password
        assert b.get("/health", headers={"Authorization": "Basic " + base64.b64encode("lś:pä".encode()).decode()})[0] == 401
        assert b.get("/health", headers={"Authorization": "Basic %%%"})[0] == 401
        assert b.request("GET", "/health", headers={"Authorization": "Basic bHM6cHc=\u00e9".encode().decode("latin-1")}, timeout=5)[0] == 401
        # webhooks come without basic auth (Label Studio sends none): accepted as notices
        status, w = b.post("/webhook", {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}, headers={"Authorization": None})
        assert status == 201 and w["queued"] is True
        assert b.post("/predict", {"tasks": []}, headers={"Authorization": None})[0] == 401
    finally:
        b.stop()
    # a real backbone whose weights are not here: the start stops at once with one message
    env = dict(os.environ, SMARTSAM_BACKBONE="sam2.1_hiera_tiny", SMARTSAM_HOME=str(tmp_path / "home"),
               SMARTSAM_MIRROR="http://127.0.0.1:9", SMARTSAM_DATA_DIR=str(tmp_path / "d2"))
    import subprocess
    import sys

    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "backend.server", "--port", "0"], env=env, capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 1 and time.time() - t0 < 30
    assert "sam2.1_hiera_tiny.pt" in p.stderr and "smartsam models download sam2.1_hiera_tiny --from" in p.stderr
    assert "Traceback" not in p.stderr
    # ...and a file placed by hand as the message says is checked against the published hash: a
    # file that is not the official checkpoint is refused, and nothing is placed
    import torch

    from smartsam.backbones.sam2 import build_sam2_model

    torch.manual_seed(3)
    ckpt = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": build_sam2_model("hiera_t").state_dict()}, ckpt)  # the official file's layout, other weights
    p = subprocess.run([sys.executable, "-m", "smartsam", "models", "download", "sam2.1_hiera_tiny", "--from", str(ckpt)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "expected 156008466" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "home" / "checkpoints" / "sam2.1_hiera_tiny.pt").exists()


def _status_after_headers(backend, head: bytes, body: bytes) -> bytes:
    """Send the headers, read the status line the server answers before any body byte, then send
    the body (a reset then is fine: the server has answered and closed)."""
    import socket

    s = socket.create_connection(("127.0.0.1", backend.port), timeout=20)
    try:
        s.sendall(head)
        line = s.recv(65536).split(b"\r\n", 1)[0]
        try:
            s.sendall(body)
        except OSError:
            pass
        return line
    finally:
        s.close()


def _endless_chunked(backend, chunks: int = 200) -> bytes:
    """Send a chunked body until the server answers or closes. The server reads up to its limit,
    answers 413 and closes; the answer may be lost to the reset that closing with unread bytes
    causes, so a reset counts as the refusal too. Returns the status line, or b"reset"."""
    import select
    import socket

    s = socket.create_connection(("127.0.0.1", backend.port), timeout=20)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    try:
        s.sendall(head)
        for _ in range(chunks):
            if select.select([s], [], [], 0)[0]:
                break  # the server has answered
            try:
                s.sendall(chunk)
            except OSError:
                break
        try:
            data = s.recv(65536)
        except OSError:
            return b"reset"
        return data.split(b"\r\n", 1)[0] if data else b"reset"
    finally:
        s.close()


def test_known_attack_shapes_are_refused_without_harm(backend):
    # a huge multipart upload announced by Content-Length: refused before the body is read
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=z\r\n"
            b"Content-Length: 10000000000\r\n\r\n")
    assert b"415" in _status_after_headers(backend, head, b"--z\r\n" * 1000)
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
    assert b"413" in _status_after_headers(backend, head, b"{" * 1000)
    # an endless chunked body: read up to the limit, then refused (413, or the reset that follows it)
    got = _endless_chunked(backend)
    assert b"413" in got or got == b"reset", got
    # deeply nested JSON under the size limit
    status, body = backend.post("/predict", b"[" * 200000 + b"]" * 200000, raw=True)
    assert status == 400
    assert backend.health()["status"] == "UP"
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(45, 55)]))
    assert status == 200 and r["results"][0]["result"]


def test_a_slow_image_download_does_not_block_other_annotators(backend, server):
    """The image server holds /slow for 8 s (the backend gives up after 3); meanwhile another
    annotator's click is answered."""
    ctx = [keypoint(50, 50), keypoint(12, 12, positive=False)]
    backend.post("/predict", predict_body(upload("penguin.jpg"), ctx))  # warm: image and agent answer cached
    done = {}

    def slow():
        t = time.time()
        done["slow_status"] = backend.post("/predict", predict_body("/slow", [keypoint(5, 5)]))[1]
        done["slow_s"] = time.time() - t

    th = threading.Thread(target=slow)
    hits = len([h for h in server.hits if h[0] == "/slow"])
    th.start()
    deadline = time.time() + 30
    while len([h for h in server.hits if h[0] == "/slow"]) == hits and time.time() < deadline:
        time.sleep(0.02)  # until the slow download has reached the image server
    assert time.time() < deadline
    t = time.time()
    status, r = backend.post("/predict", predict_body(upload("penguin.jpg"), ctx))
    fast_s = time.time() - t
    th.join(60)
    assert status == 200 and r["results"][0]["result"]
    assert fast_s < done["slow_s"] and fast_s < 2.5
    assert "image download failed" in json.dumps(done["slow_status"])


def test_eight_clicks_at_once_are_all_answered_in_shared_decoder_calls(server, tmp_path):
    """The backend launched exactly as the README does (`make run` -> run.sh, no SMARTSAM_* tuning
    variables). 8 annotators click at the same moment (new clicks, cached images): all 8 are
    answered, none refused; /health answers within Label Studio's 1 s all along; the 8 clicks use
    at most a quarter of the decoder calls 8 clicks make one after another (four times those of a
    click alone on each image; the scheduler runs them in lockstep), and /health shows the batches."""
    b = Backend(tmp_path / "data", env={"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN}, run_sh=True).start()
    images = (("penguin.jpg", 481, 321), ("coco.jpg", 640, 481))

    def bodies(y):
        return [predict_body(upload(n), [keypoint(20 + 7 * k, y, w=w, h=h)], project="31.1")
                for k, (n, w, h) in enumerate(images * 4)]

    try:
        h = b.health()
        assert h["threads"] == 32 and h["model_class"] == "SmartSAMBackend"  # the documented default reached gunicorn
        calls = []  # a click alone on each image (which encodes it; the 8 below are four on each)
        for body in bodies(60)[:2]:
            d0 = b.health()["decoder_calls"]
            status, r = b.post("/predict", body)
            assert status == 200 and r["results"][0]["result"]
            calls.append(b.health()["decoder_calls"] - d0)
        one_by_one = 4 * sum(calls)  # the decoder calls of those 8 clicks made one after another
        results = []
        threads = [threading.Thread(target=lambda body=body: results.append(b.post("/predict", body))) for body in bodies(40)]
        d0 = b.health()["decoder_calls"]
        [t.start() for t in threads]
        probes = []
        while any(t.is_alive() for t in threads):
            t0 = time.time()
            status, h = b.get("/admin/health", headers={"Authorization": "Bearer test-admin"})
            probes.append((time.time() - t0, h["requests"]["in_flight"] if status == 200 else None))
            assert status == 200
            time.sleep(0.2)  # as a monitor probes: back to back, the probes took the clicks' CPU
        [t.join() for t in threads]
        assert len(results) == 8 and all(s == 200 and r["results"][0]["result"] for s, r in results), results
        h = b.health()
        at_once = h["decoder_calls"] - d0
        assert 8 <= at_once <= one_by_one / 4, (at_once, one_by_one)
        assert h["scheduler"]["batch_jobs"]["max"] >= 4 and h["scheduler"]["refused"] == 0
        busy = [w for w, n in probes if n and n >= 1]
        assert busy, probes  # probes made while clicks were being answered (the server says so)
        assert max(w for w, _ in probes) < 1.0, probes
    finally:
        b.stop()


def test_health_is_not_up_when_the_model_failed_to_load(tmp_path):
    """/health answers at once while loading, and 503 with the reason when loading failed: the
    reason is in the status line too, the one part of a failed check Label Studio's Connect shows."""
    import http.client

    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint")
    b = Backend(tmp_path / "data", env={"SMARTSAM_CHECKPOINT": str(bad)}, backbone="sam2.1_hiera_tiny").start(wait_loaded=False)
    try:
        t0 = time.time()
        status, h = b.get("/health")
        assert time.time() - t0 < 1.0
        deadline = time.time() + 60
        while status == 200 and time.time() < deadline:
            time.sleep(0.2)
            status, h = b.get("/health")
        assert status == 503 and "failed to load" in h["error"] and "garbage.pt" in h["error"], h
        c = http.client.HTTPConnection("127.0.0.1", b.port, timeout=5)
        c.request("GET", "/health")
        r = c.getresponse()
        assert r.status == 503 and r.reason.startswith("Model failed to load") and "garbage.pt" in r.reason, r.reason
        c.close()
    finally:
        b.stop()


def test_labels_with_any_character_round_trip_through_the_admin_api_and_page(backend):
    """Label Studio allows any text as a label ("a/b", "50%", "why?", "#1", accents): each is set,
    read, listed, shown on the page and cleared through its percent-encoded path segment."""
    from urllib.parse import quote

    labels = ["car/truck", "50% done", "why? #1", "é & ü", "a%2Fb"]
    for label in labels:
        path = f"/admin/references/41/{quote(label, safe='')}"
        status, body = backend.request("PUT", path, json.dumps({"text": f"a {label}"}).encode(),
                                       {**ADMIN, "Content-Type": "application/json"})
        assert status == 200 and body["set"] == label, body
        status, meta = backend.get(path, headers=ADMIN)
        assert status == 200 and meta["label"] == label and meta["text"] == f"a {label}", meta
        status, hist = backend.get(path + "/versions", headers=ADMIN)
        assert status == 200 and len(hist["versions"]) == 1
    listed = backend.get("/admin/references/41", headers=ADMIN)[1]["references"]
    assert sorted(r["label"] for r in listed) == sorted(labels)
    status, page = backend.request("GET", "/admin", headers=ADMIN)
    import html

    assert status == 200 and all(html.escape(label).encode() in page for label in labels)
    for label in labels:
        status, d = backend.request("DELETE", f"/admin/references/41/{quote(label, safe='')}", headers=ADMIN)
        assert status == 200 and d["deleted"] == 1, (label, d)
    assert backend.get("/admin/references/41", headers=ADMIN)[1]["references"] == []


def test_predict_without_a_project_answers_in_pure_is_mode(backend):
    """The SDK and scripts post /predict with no project: that request is answered in pure-IS mode
    (no references, nothing recorded), as label-studio-ml's own server would answer it."""
    body = {**predict_body(upload("penguin.jpg"), [keypoint(50, 50)]), "project": None}
    status, r = backend.post("/predict", body)
    assert status == 200 and "errors" not in r, r
    pred = r["results"][0]
    assert pred["mode"] == "pure-is" and rle_mask(pred["result"][0]).shape == (321, 481)
    assert r["model_version"].endswith("-random")  # no project: no references digest in the version
    status, h = backend.get("/")
    assert status == 200 and h["status"] == "UP" and h["model_class"] == "SmartSAMBackend"


def test_statistics_queued_at_shutdown_are_written(server, tmp_path):
    """Suggestions are recorded off the request path; a graceful stop (SIGTERM, as a deploy sends)
    writes every queued one before the worker exits (the disk-test backbone answers: the
    bookkeeping is checked, not the model)."""
    b = Backend(tmp_path / "data", env={"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN},
                backbone="disk-test").start()
    try:
        for k in range(3):
            status, r = b.post("/predict", predict_body(upload("penguin.jpg"), [keypoint(30 + 10 * k, 40)], project="61.1"))
            assert status == 200 and r["results"][0]["result"]
    finally:
        b.stop()
    from backend.store.field_stats import FieldStats

    served = FieldStats(tmp_path / "data").summary("61")["served"]
    assert sum(x["suggestions"] for x in served) == 3, served


def test_gated_sam3_without_a_token_stops_make_run_with_one_message(tmp_path):
    """`make run` (run.sh) with SMARTSAM_BACKBONE=sam3 and no access: a local server answering 401
    stands in for the hub (HF_ENDPOINT); the start stops within seconds, saying where to accept
    the license and to set HF_TOKEN."""
    import http.server
    import subprocess
    import sys
    import threading

    class Gated(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_error(401, "Access to model facebook/sam3 is restricted. You must have access to it and be authenticated")

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gated)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTSAM_", "HF_"))}
    env.update(SMARTSAM_BACKBONE="sam3", SMARTSAM_HOME=str(tmp_path / "home"), SMARTSAM_DATA_DIR=str(tmp_path / "d"),
               HF_ENDPOINT=f"http://127.0.0.1:{httpd.server_address[1]}", PORT="0",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    try:
        t0 = time.time()
        p = subprocess.run([str(Path(__file__).resolve().parents[1] / "run.sh")], env=env, capture_output=True, text=True,
                           timeout=120)
    finally:
        httpd.shutdown()
    assert p.returncode != 0 and time.time() - t0 < 60
    err = p.stderr
    assert "HTTP 401" in err and "https://huggingface.co/facebook/sam3" in err and "HF_TOKEN" in err, err
    assert "smartsam models download sam3 --from" in err and "Traceback" not in err
    assert err.count("HF_TOKEN=<token>") == 1  # one message
