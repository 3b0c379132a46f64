"""End to end with a real Label Studio 1.23.2 server and a real headless browser.

Label Studio runs from its own virtualenv (.cache/ls-venv, made by scripts/test-deps.sh) with the
settings of a local test server; the backend is the real gunicorn process with the real SAM 2.1
tiny architecture (random weights: structure, sizes, modes and persistence are asserted, never
mask quality).
"""

import json
import os
import shutil
import sys
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from backend_helpers import LABEL_CONFIG, Backend, free_port, rle_mask

ROOT = Path(__file__).resolve().parents[1]
LS_BIN = ROOT / ".cache" / "ls-venv" / "bin" / "label-studio"
ARTIFACTS = ROOT / "artifacts"
USER, PASSWORD, TOKEN = "admin@example.com", "smartsam-test-pw", "smartsamlegacytoken0123456789"


class LabelStudio:
    def __init__(self, base: Path, documents: Path):
        if not LS_BIN.exists():
            pytest.fail("Label Studio is not installed: run scripts/test-deps.sh (make test does)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(base), LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
                   ML_BLOCK_LOCAL_IP="false", SSRF_PROTECTION_ENABLED="false", LATEST_VERSION_CHECK="false",
                   COLLECT_ANALYTICS="false", LOCAL_FILES_SERVING_ENABLED="true",
                   LOCAL_FILES_DOCUMENT_ROOT=str(documents), DJANGO_DB="sqlite")
        self.log = open(base / "label-studio.log", "wb")
        self.proc = subprocess.Popen([str(LS_BIN), "start", "--no-browser", "--port", str(self.port), "--internal-host",
                                      "127.0.0.1", "--username", USER, "--password", PASSWORD, "--user-token", TOKEN],
                                     cwd=base, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < 240:
            if self.proc.poll() is not None:
                raise RuntimeError((base / "label-studio.log").read_text()[-3000:])
            try:
                if self.api("GET", "/api/projects")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError("Label Studio did not start")

    def api(self, method, path, data=None, token=TOKEN):
        req = urllib.request.Request(self.url + path, data=None if data is None else json.dumps(data).encode(), method=method,
                                     headers={"Authorization": f"Token {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                b = r.read()
                return r.status, (json.loads(b) if b else None)
        except urllib.error.HTTPError as e:
            return e.code, e.read()[:2000]

    def stop(self):
        os.killpg(self.proc.pid, 15)
        self.proc.wait(30)
        self.log.close()

    def project(self, title, regex, backend_url, webhook=True):
        s, p = self.api("POST", "/api/projects", {"title": title, "label_config": LABEL_CONFIG})
        assert s == 201, p
        pid = p["id"]
        s, st = self.api("POST", "/api/storages/localfiles", {"project": pid, "path": str(self.documents / "GrabCut" / "img"),
                                                              "regex_filter": regex, "use_blob_urls": True, "title": "grabcut"})
        assert s == 201, st
        assert self.api("POST", f"/api/storages/localfiles/{st['id']}/sync")[0] == 200
        ml = {"id": None}
        if backend_url is not None:
            s, ml = self.api("POST", "/api/ml", {"project": pid, "url": backend_url, "is_interactive": True, "title": "SmartSAM"})
            assert s == 201, ml  # Label Studio checked /health and /setup here
        if webhook and backend_url is not None:
            # The setting that sends confirmed annotations to the backend: a project webhook on
            # ANNOTATION_CREATED / ANNOTATION_UPDATED with "send payload" on.
            s, w = self.api("POST", "/api/webhooks", {"project": pid, "url": backend_url + "/webhook", "send_payload": True,
                                                      "send_for_all_actions": False, "is_active": True,
                                                      "actions": ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]})
            assert s == 201, w
        tasks = self.api("GET", f"/api/tasks?project={pid}&page_size=100")[1]["tasks"]
        return pid, ml["id"], tasks


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory, datasets):
    ls = LabelStudio(tmp_path_factory.mktemp("ls"), datasets)
    ls.documents = datasets
    yield ls
    ls.stop()


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    b = Backend(tmp_path_factory.mktemp("ls-backend") / "data",
                env={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN, "SMARTSAM_ADMIN_TOKEN": "adm"}).start()
    yield b
    b.stop()


def keypoint(w, h, positive=True):
    return {"original_width": w, "original_height": h, "image_rotation": 0, "id": "kp1", "from_name": "tag", "to_name": "image",
            "type": "keypointlabels", "origin": "manual", "is_positive": positive,
            "value": {"x": 50, "y": 55, "width": 0.6, "keypointlabels": ["Object"]}}


def test_click_reference_restart_and_prelabel(label_studio, backend):
    ls = label_studio
    pid, ml, tasks = ls.project("SmartSAM e2e", r".*(106024|124080|153077)\.jpg", backend.url)
    assert len(tasks) == 3 and all(t["data"]["image"].startswith("/data/local-files/") for t in tasks)
    t0, t1 = tasks[0], tasks[1]

    # 1. one click through Label Studio's own interactive endpoint -> a brush mask of the image's size
    s, r = ls.api("POST", f"/api/ml/{ml}/interactive-annotating", {"task": t0["id"], "context": {"result": [keypoint(481, 321)]}})
    assert s == 200 and "errors" not in r, r
    res = r["data"]["result"][0]
    assert res["type"] == "brushlabels" and res["value"]["brushlabels"] == ["Object"]
    assert rle_mask(res).shape == (res["original_height"], res["original_width"]) == (321, 481)
    assert r["data"]["mode"] == "pure-is"

    # 2. the annotator submits it: the webhook makes it the label's reference
    s, a = ls.api("POST", f"/api/tasks/{t0['id']}/annotations?project={pid}", {"result": [dict(res, id="r1")], "project": pid})
    assert s == 201, a
    deadline = time.time() + 60
    while time.time() < deadline:
        refs = backend.get(f"/admin/references/{pid}", headers={"Authorization": "Bearer adm"})[1]["references"]
        if refs:
            break
        time.sleep(0.5)
    assert [x["label"] for x in refs] == ["Object"] and refs[0]["source"]["annotation"] == a["id"]

    # 3. it survives a backend restart, and the next click in the project answers in reference mode
    backend.stop()
    backend.start()
    s, r = ls.api("POST", f"/api/ml/{ml}/interactive-annotating", {"task": t1["id"], "context": {"result": [keypoint(481, 321)]}})
    assert s == 200 and r["data"]["mode"] == "reference-mask", r

    # an admin can also take the reference from an annotated task (through Label Studio's API)
    s, body = backend.request("PUT", f"/admin/references/{pid}/Object", json.dumps({"task": t0["id"]}).encode(),
                              {"Authorization": "Bearer adm", "Content-Type": "application/json"})
    assert s == 200 and body["kind"] == "mask" and body["task"] == t0["id"], body
    assert backend.get(f"/admin/references/{pid}/Object", headers={"Authorization": "Bearer adm"})[1]["source"]["admin"] == "task"

    # 4. pre-labeling: "Retrieve predictions" fills every task of the project
    s, r = ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}", {"selectedItems": {"all": True, "excluded": []}})
    assert s == 200, r
    for t in ls.api("GET", f"/api/tasks?project={pid}&page_size=100")[1]["tasks"]:
        preds = ls.api("GET", f"/api/predictions?task={t['id']}")[1]
        ours = [p for p in preds if p["model_version"].startswith("smartsam-")]
        assert len(ours) == 1, preds
        masks = [x for x in ours[0]["result"] if x["value"].get("brushlabels") == ["Object"]]
        assert len(masks) == 1 and rle_mask(masks[0]).shape == (masks[0]["original_height"], masks[0]["original_width"])


def test_personal_access_token_works_too(label_studio, tmp_path):
    ls = label_studio
    assert ls.api("POST", "/api/jwt/settings", {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True})[0] == 200
    s, t = ls.api("POST", "/api/token/")
    assert s == 201, t
    b = Backend(tmp_path / "data", env={"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": t["token"]}).start()
    try:
        pid, ml, tasks = ls.project("SmartSAM PAT", r".*106024\.jpg", b.url, webhook=False)
        s, r = ls.api("POST", f"/api/ml/{ml}/interactive-annotating", {"task": tasks[0]["id"], "context": {"result": [keypoint(481, 321)]}})
        assert s == 200 and r["data"]["result"], r
        assert t["token"] not in b.log_path.read_text()
    finally:
        b.stop()


def test_browser_click_shows_the_suggestion(label_studio, backend):
    from playwright.sync_api import sync_playwright

    ls = label_studio
    pid, ml, tasks = ls.project("SmartSAM browser", r".*106024\.jpg", backend.url, webhook=False)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(ls.url + "/user/login/")
        page.fill("input[name=email]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{ls.url}/projects/{pid}/data?task={tasks[0]['id']}")
        page.wait_for_selector("canvas", timeout=120_000)
        page.wait_for_timeout(2000)
        page.get_by_text("Auto-Annotation").click()  # the smart tools appear
        group = [e for e in page.query_selector_all("button.lsf-tool_smart") if not e.get_attribute("aria-label")]
        group[0].hover()
        page.click("button.lsf-tool_smart[aria-label=key-point-tool]")
        page.locator(".lsf-label", has_text="Object").first.click()
        canvas = max(page.query_selector_all("canvas"), key=lambda c: (lambda b: b["width"] * b["height"] if b else 0)(c.bounding_box()))
        box = canvas.bounding_box()
        with page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=180_000) as resp:
            page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.55)
        assert resp.value.status == 200
        body = resp.value.json()
        assert body["data"]["result"][0]["type"] == "brushlabels"
        page.get_by_text("1 suggestions").wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "label_studio_suggestion.png"))
        browser.close()
    assert (ARTIFACTS / "label_studio_suggestion.png").stat().st_size > 10_000


def _worker_pids():
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "PrelabelWorker" in line and "ray::" in line]


def test_prelabel_a_project_on_ray_with_a_worker_killed(label_studio, tmp_path):
    ls = label_studio
    pid, ml, tasks = ls.project("SmartSAM queue", r"(^|.*/)[0-9]+\.jpg$", None, webhook=False)
    assert len(tasks) == 20
    env = dict(os.environ, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=TOKEN, SMARTSAM_DATA_DIR=str(tmp_path / "data"),
               SMARTSAM_BACKBONE="sam2.1_hiera_tiny-random", SMARTSAM_CHAIN_LENGTH="0", PYTHONPATH=str(ROOT),
               SMARTSAM_EMBED_CACHE_DIR=str(tmp_path / "emb"), RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, "-m", "backend.prelabel", "--project", str(pid), "--workers", "2", "--write-batch", "2",
           "--label", "Object", "--reference-text", "the main object"]
    log = open(tmp_path / "prelabel.log", "w")
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def ours(task_id):
        return [x for x in ls.api("GET", f"/api/predictions?task={task_id}")[1] if x["model_version"].startswith("smartsam-")]

    killed = None
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        done = sum(len(ours(t["id"])) for t in tasks)
        pids = _worker_pids()
        if killed is None and done >= 4 and len(pids) == 2:
            killed = pids[0]
            os.kill(killed, 9)  # a worker dies midway: Ray restarts it and retries its task
        time.sleep(1)
    assert p.wait(timeout=max(1, deadline - time.time())) == 0, (tmp_path / "prelabel.log").read_text()[-3000:]
    log.close()
    assert killed is not None, "the run ended before a worker could be killed"
    summary = json.loads((tmp_path / "prelabel.log").read_text().strip().splitlines()[-1])
    assert summary["done"] == 20 and summary["failed"] == 0
    for t in tasks:
        preds = ours(t["id"])
        assert len(preds) == 1, (t["id"], preds)  # exactly one, the killed worker's task included
        assert preds[0]["result"][0]["value"]["brushlabels"] == ["Object"]
    # a re-run adds none
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    again = json.loads(p.stdout.strip().splitlines()[-1])
    assert again["skipped"] == 20 and again["done"] == 0
    assert all(len(ours(t["id"])) == 1 for t in tasks)
