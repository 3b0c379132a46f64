"""What an outsider who reaches the backend's port can and cannot do, and where masks land.

Bounded decoding (RLE bombs), a real per-request deadline against a server that drips bytes, and
the geometry of answers checked with the deterministic ``disk-test`` backbone (it draws a disk at
the prompt), since random weights cannot show where a mask lands.
"""

import io
import json
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from backend_helpers import TOKEN, Backend, ImageServer, keypoint, png_bytes, predict_body, rle_mask


# -- bounded RLE decoding ------------------------------------------------------------------
def _region(rle, w=64, h=48):
    return {"type": "brushlabels", "original_width": w, "original_height": h,
            "value": {"format": "rle", "rle": rle, "brushlabels": ["Object"]}}


def test_rle_bomb_is_refused_at_once_with_memory_flat():
    from backend.errors import RequestError
    from backend.labelstudio.regions import brush_mask, mask_to_rle

    good = mask_to_rle(np.ones((48, 64), bool))
    brush_mask(_region(good), (48, 64))  # imports done before timing
    # ~200 KiB of RLE whose header claims 4 billion values: refused before any decoding
    bomb = list((0xFFFFFFF0).to_bytes(4, "big")) + [0xAA] * (200 << 10)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(RequestError, match="claims"):
        brush_mask(_region(bomb), (48, 64))
    # a region that says it is huge is refused by SMARTSAM_MAX_PIXELS before its RLE is read
    with pytest.raises(RequestError, match="over the limit"):
        brush_mask(_region(bomb, 100_000, 100_000), (48, 64))
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 20 << 20, (elapsed, peak)
    # malformed: truncated stream, non-byte values, not a list -> a clear RequestError, never a crash
    for bad in (good[: len(good) // 2] if len(good) > 10 else good[:5], good[:4] + [999] * 4, "abc", None, [1, 2]):
        with pytest.raises(RequestError):
            brush_mask(_region(bad), (48, 64))
    with pytest.raises(RequestError, match="positive whole number"):
        brush_mask({**_region(good), "original_width": -3}, (48, 64))
    # and a good one decodes, resized to our image when Label Studio saw another size
    m = brush_mask(_region(good), (96, 128))
    assert m.shape == (96, 128) and m.all()


# -- a real deadline -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drip_server(datasets):
    s = ImageServer({"penguin.jpg": (datasets / "GrabCut/img/106024.jpg").read_bytes()})
    yield s
    s.close()


def test_slow_drip_is_cut_at_the_request_deadline_and_health_answers(drip_server, tmp_path):
    b = Backend(tmp_path / "data", env={"LABEL_STUDIO_URL": drip_server.url, "LABEL_STUDIO_API_KEY": TOKEN,
                                        "SMARTSAM_REQUEST_TIMEOUT": "3", "SMARTSAM_IMAGE_TIMEOUT": "60"}).start()
    try:
        out = {}

        def drip():
            t = time.time()
            out["r"] = b.post("/predict", predict_body("/drip/penguin.jpg", [keypoint(50, 50)]))
            out["s"] = time.time() - t

        th = threading.Thread(target=drip)
        th.start()
        deadline = time.time() + 30
        while not any(h[0].startswith("/drip/") for h in drip_server.hits) and time.time() < deadline:
            time.sleep(0.02)  # until the backend is reading the dripping image
        assert time.time() < deadline
        for _ in range(5):
            t = time.time()
            assert b.get("/health")[0] == 200
            assert time.time() - t < 1.0
            time.sleep(0.2)
        th.join(30)
        status, r = out["r"]
        # the server sends the 25 kB image at 20 bytes/s: only the deadline can end this request
        assert status == 200 and r["results"][0]["result"] == []
        assert "time limit" in r["results"][0]["errors"][0] and "SMARTSAM_REQUEST_TIMEOUT=3" in r["results"][0]["errors"][0]
        assert 2.5 < out["s"] < 8, out["s"]
        assert b.health()["status"] == "UP"
    finally:
        b.stop()


# -- where the mask lands ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def disk_backend(tmp_path_factory):
    rng = np.random.default_rng(1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60x40 (w x h), displayed rotated: 40 wide, 60 high
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(b, format="JPEG", exif=exif.tobytes())
    files = {
        "plain.png": png_bytes(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)),
        "exif.jpg": b.getvalue(),
        "sixteen.png": png_bytes(rng.integers(0, 65535, (50, 70), dtype=np.uint16)),
        "rgba.png": png_bytes(rng.integers(0, 255, (50, 70, 4), dtype=np.uint8)),
        "gray.png": png_bytes(rng.integers(0, 255, (50, 70), dtype=np.uint8)),
    }
    server = ImageServer(files)
    backend = Backend(tmp_path_factory.mktemp("disk") / "data", backbone="disk-test",
                      env={"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN}).start()
    yield backend
    backend.stop()
    server.close()


def _centre(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


@pytest.mark.parametrize("name, w, h", [("plain.png", 200, 120), ("exif.jpg", 40, 60), ("sixteen.png", 70, 50),
                                        ("rgba.png", 70, 50), ("gray.png", 70, 50)])
def test_the_mask_lands_where_the_annotator_clicked(disk_backend, name, w, h):
    # a click at 25 % across, 70 % down of the image as Label Studio shows it
    status, r = disk_backend.post("/predict", predict_body(f"/data/upload/1/{name}", [keypoint(25, 70, w=w, h=h)]))
    assert status == 200 and "errors" not in r, r
    assert r["results"][0]["path"] == "fast"  # auto on a CPU without a shared decoder (disk-test), said in every answer
    res = r["results"][0]["result"][0]
    m = rle_mask(res)
    assert m.shape == (h, w) and (res["original_width"], res["original_height"]) == (w, h)
    x, y = 0.25 * w, 0.70 * h
    assert m[int(y), int(x)]
    cx, cy = _centre(m)
    assert abs(cx - x) <= 1.5 and abs(cy - y) <= 1.5, (cx, cy, x, y)


def test_edge_click_third_click_and_displayed_size(disk_backend):
    url = "/data/upload/1/plain.png"
    # 100 % is the right / bottom edge, which Label Studio allows: the last pixel, not "outside"
    status, r = disk_backend.post("/predict", predict_body(url, [keypoint(100, 100, w=200, h=120)]))
    assert "errors" not in r, r
    m = rle_mask(r["results"][0]["result"][0])
    assert m[119, 199] and not m[0, 0]
    status, r = disk_backend.post("/predict", predict_body(url, [keypoint(100.5, 50, w=200, h=120)]))
    assert "outside the 200x120 image" in r["results"][0]["errors"][0]
    # each further click refines the latest answer: a second positive click adds its disk, and the
    # third keeps it (refining from the first answer would lose it)
    a, b2, c = keypoint(20, 30, w=200, h=120), keypoint(50, 50, w=200, h=120), keypoint(80, 70, w=200, h=120)
    b2["id"], c["id"] = "k2", "k3"
    r3 = disk_backend.post("/predict", predict_body(url, [a, b2, c]))[1]
    assert r3["results"][0]["mode"] == "refine"
    m3 = rle_mask(r3["results"][0]["result"][0])
    assert m3[36, 40] and m3[60, 100] and m3[84, 160]  # all three clicks' disks
    # the RLE comes at the size Label Studio displays, even when that differs from the decoded image
    status, r = disk_backend.post("/predict", predict_body(url, [keypoint(25, 70, w=400, h=240)]))
    res = r["results"][0]["result"][0]
    m = rle_mask(res)
    assert (res["original_width"], res["original_height"]) == (400, 240) and m.shape == (240, 400)
    cx, cy = _centre(m)
    assert abs(cx - 100) <= 3 and abs(cy - 168) <= 3, (cx, cy)


def test_agent_settings_are_honoured_and_said(tmp_path, disk_backend):
    """SMARTSAM_FAST_PATH and SMARTSAM_REQUIRE_CLICK: the backend honours them and says which ran."""
    server_url = disk_backend.env["LABEL_STUDIO_URL"]  # the disk backend's image server, reused
    b = Backend(tmp_path / "data", backbone="disk-test", env={"LABEL_STUDIO_URL": server_url, "LABEL_STUDIO_API_KEY": TOKEN,
                                                              "SMARTSAM_FAST_PATH": "off", "SMARTSAM_REQUIRE_CLICK": "false",
                                                              "SMARTSAM_ADMIN_TOKEN": "a"}).start()
    try:
        r = b.post("/predict", predict_body("/data/upload/1/plain.png", [keypoint(25, 70, w=200, h=120)]))[1]
        assert r["results"][0]["path"] == "literal", r
        assert b.request("PUT", "/admin/references/1/Object", json.dumps({"text": "x"}).encode(),
                         {"Authorization": "Bearer a", "Content-Type": "application/json"})[0] == 200
        r = b.post("/predict", predict_body("/data/upload/1/plain.png", [keypoint(25, 70, w=200, h=120)]))[1]
        assert r["results"][0]["mode"] == "reference-text" and r["results"][0]["require_click"] is False, r
    finally:
        b.stop()


def test_local_files_root_slash_is_refused_at_start(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, LOCAL_FILES_DOCUMENT_ROOT="/", SMARTSAM_BACKBONE="disk-test", SMARTSAM_DATA_DIR=str(tmp_path / "d"))
    p = subprocess.run([sys.executable, "-m", "backend.server", "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "LOCAL_FILES_DOCUMENT_ROOT=/" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_model_version_follows_the_weights(tmp_path):
    """A new checkpoint file gives a new model version (so old predictions are not kept as current)."""
    import os

    from backend.config import Settings
    from backend.serving.versions import checkpoint_tag

    ck = tmp_path / "mine.pt"
    ck.write_bytes(b"weights one")
    a = checkpoint_tag(Settings(backbone="sam2.1_hiera_tiny", checkpoint=str(ck)))
    ck.write_bytes(b"weights two!")
    os.utime(ck, ns=(1, 1))  # a new file version (size and time differ)
    b = checkpoint_tag(Settings(backbone="sam2.1_hiera_tiny", checkpoint=str(ck)))
    assert a != b and len(a) == len(b) == 8
    assert checkpoint_tag(Settings(backbone="sam2.1_hiera_tiny-random")) == "random"
    # a registry checkpoint is named by its published hash
    assert checkpoint_tag(Settings(backbone="sam2.1_hiera_tiny", checkpoint=None)) == "7402e0d8"


def test_one_cloud_uri_in_two_projects_is_two_images(tmp_path):
    """The same ``s3://`` URI in two projects' storages may be two images (two endpoints with a
    bucket of one name, or one the other project may not read): Label Studio resolves it per
    task, and the backend's image cache keeps them apart. A real HTTP server stands in for Label
    Studio's resolver and answers each task with its own image."""
    import http.server
    import re
    import threading

    from backend.config import Settings
    from backend.labelstudio.images import ImageFetcher

    pngs = {t: png_bytes(np.full((20, 30, 3), 60 * t, np.uint8)) for t in (1, 2)}

    class Resolver(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            m = re.match(r"^/tasks/(\d+)/presign/\?fileuri=", self.path)
            body = pngs[int(m.group(1))]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Resolver)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        f = ImageFetcher(Settings(label_studio_url=f"http://127.0.0.1:{srv.server_address[1]}",
                                  label_studio_api_key=TOKEN, data_dir=tmp_path))
        a = f.fetch("s3://shared-name/cat.png", task_id=1)
        b = f.fetch("s3://shared-name/cat.png", task_id=2)
        assert a[0, 0, 0] == 60 and b[0, 0, 0] == 120  # each task's own bytes, not the first one cached
        assert f.fetch("s3://shared-name/cat.png", task_id=1)[0, 0, 0] == 60
    finally:
        srv.shutdown()


def test_a_download_cut_short_is_a_failure_that_may_pass(tmp_path):
    """A server (Label Studio restarting, a proxy resetting) that announces 5,000 bytes and closes
    after 10: the image is not "unreadable" (which refuses it for good) but a failure that may
    pass (the background queue tries again)."""
    import socket
    import threading

    from backend.config import Settings
    from backend.errors import ImageFetchError
    from backend.labelstudio.images import ImageFetcher

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        c, _ = srv.accept()
        c.recv(65536)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n" + png_bytes(
            np.zeros((8, 8, 3), np.uint8))[:10])
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    f = ImageFetcher(Settings(label_studio_url=f"http://127.0.0.1:{srv.getsockname()[1]}", label_studio_api_key=TOKEN,
                              data_dir=tmp_path))
    with pytest.raises(ImageFetchError) as e:
        f.fetch("/data/upload/1/cut.png")
    assert e.value.transient and "10 of 5000 bytes" in str(e.value)
    srv.close()
