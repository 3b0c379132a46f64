"""Label Studio 1.23.2 as the tests run it: its own virtualenv (.cache/ls-venv, made by
scripts/test-deps.sh), its defaults except exactly the settings the README tells users to change
(``readme_settings``), one server for the whole test run (the ``label_studio`` fixture in
conftest.py), and the helpers the end-to-end tests share."""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from backend_helpers import LABEL_CONFIG, free_port

ROOT = Path(__file__).resolve().parents[1]
LS_BIN = ROOT / ".cache" / "ls-venv" / "bin" / "label-studio"
ARTIFACTS = ROOT / "artifacts"
USER, PASSWORD, TOKEN = "admin@example.com", "smartsam-test-pw", "smartsamlegacytoken0123456789"
BASIC = ("ls-user", "ls-pass")
WEBHOOK_SECRET = "hook-secret"


def readme_settings(documents: Path) -> dict:
    """The Label Studio settings the README's "Connect it" section tells users to change."""
    return {
        "ML_BLOCK_LOCAL_IP": "false",  # Connect refuses local and private backend addresses otherwise
        "SSRF_PROTECTION_ENABLED": "false",  # webhooks to local or private addresses are dropped otherwise
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",  # the README's token example (a PAT works too)
        "LOCAL_FILES_SERVING_ENABLED": "true",  # local-files storage, as Label Studio documents it
        "LOCAL_FILES_DOCUMENT_ROOT": str(documents),
    }


class LabelStudio:
    def __init__(self, base: Path, documents: Path):
        if not LS_BIN.exists():
            pytest.fail("Label Studio is not installed: run scripts/test-deps.sh (make test does)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "ML_", "SSRF", "LOCAL_FILES", "DJANGO"))}
        env.update(readme_settings(documents), LABEL_STUDIO_BASE_DATA_DIR=str(base))
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

    def project(self, title, regex, backend_url, label_config=LABEL_CONFIG, basic_auth=False, folder="GrabCut",
                extra_params=None):
        """A project over local files, connected to the backend the way the README says (which
        makes Label Studio create the backend's webhook itself)."""
        s, p = self.api("POST", "/api/projects", {"title": title, "label_config": label_config})
        assert s == 201, p
        pid = p["id"]
        s, st = self.api("POST", "/api/storages/localfiles", {"project": pid, "path": str(self.documents / folder / "img"),
                                                              "regex_filter": regex, "use_blob_urls": True, "title": "images"})
        assert s == 201, st
        assert self.api("POST", f"/api/storages/localfiles/{st['id']}/sync")[0] == 200
        ml = {"id": None}
        if backend_url is not None:
            ml = self.connect(pid, backend_url, basic_auth, extra_params)
        tasks = self.tasks(pid)
        return pid, ml["id"], tasks

    def connect(self, pid, backend_url, basic_auth=False, extra_params=None):
        body = {"project": pid, "url": backend_url, "is_interactive": True, "title": "SmartSAM"}
        if extra_params is not None:
            body["extra_params"] = extra_params  # the "Extra params" field of the Connect form
        if basic_auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=BASIC[0], basic_auth_pass=BASIC[1])
        s, ml = self.api("POST", "/api/ml", body)
        assert s == 201, ml  # Label Studio checked /health and /setup here
        return ml

    def tasks(self, pid):
        return self.api("GET", f"/api/tasks?project={pid}&page_size=500")[1]["tasks"]

    def predictions(self, task_id):
        return [x for x in self.api("GET", f"/api/predictions?task={task_id}")[1] if x["model_version"].startswith("smartsam-")]


ADMIN = {"Authorization": "Bearer adm"}
# Random weights: similarities say nothing, so pre-labeling keeps every proposal (a fixed threshold)
# and at most 2 instances per label and task (the suite's time)
RANDOM_INSTANCES = {"SMARTSAM_INSTANCE_THRESHOLD": "-1", "SMARTSAM_MAX_INSTANCES": "2"}
SECRET = {"X-SmartSAM-Webhook-Secret": WEBHOOK_SECRET}


def keypoint(w, h, positive=True, x=50, y=55, kid="kp1"):
    return {"original_width": w, "original_height": h, "image_rotation": 0, "id": kid, "from_name": "tag", "to_name": "image",
            "type": "keypointlabels", "origin": "manual", "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["Object"]}}


def box_brush(w=481, h=321):
    """A submitted brush region for "Object": a rectangle in the middle of a ``w x h`` image."""
    import numpy as np

    from backend.labelstudio.regions import mask_to_rle

    mask = np.zeros((h, w), bool)
    mask[h // 3:h * 2 // 3, w // 3:w * 2 // 3] = True
    return {"id": "r1", "type": "brushlabels", "from_name": "mask", "to_name": "image", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Object"]}}


def wait_for(fn, timeout=90, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def slow_image_store(ls, seconds: float):
    """A proxy in front of Label Studio whose image fetches (local files) each take ``seconds``
    more, as slow storage would. A backend or CLI whose LABEL_STUDIO_URL points at it holds work
    back (a queue still half done when something is killed) without a slow model; close it after."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(ls.url)
    proxy.add(r"^/data/local-files/", "delay", seconds=seconds)
    return proxy
