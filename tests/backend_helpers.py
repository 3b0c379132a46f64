"""Running the real backend process (gunicorn) and a real HTTP image server for tests."""

from __future__ import annotations

import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from PIL import Image

# A busy neighbour (a CPU hog) that ends with the process that started it: a test run killed
# before its ``finally`` (SIGTERM, a timeout) leaves none spinning to slow whatever runs next.
BUSY = [sys.executable, "-c", "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"]

ROOT = Path(__file__).resolve().parents[1]
LABEL_CONFIG = (ROOT / "label_config.xml").read_text()
TOKEN = "legacy-token-for-tests"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Backend:
    """``python -m backend.server`` (as run.sh starts it) in a subprocess, on a free port, with its own data dir."""

    def __init__(self, data_dir: Path, env: Optional[Dict[str, str]] = None, backbone: str = "sam2.1_hiera_tiny-random",
                 run_sh: bool = False, pid_namespace: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir.parent / f"backend-{self.port}.log"
        # no tuning variables: the backend runs its defaults, as `make run` does
        # an admin token unless the test sets its own: the counters the tests read are behind it
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("SMARTSAM_")},
                    "SMARTSAM_BACKBONE": backbone, "SMARTSAM_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT),
                    "SMARTSAM_ADMIN_TOKEN": "test-admin", **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        # run_sh: exactly the README's launch (`make run` -> run.sh, venv first on PATH, PORT set)
        self.run_sh = run_sh
        # each start in a fresh PID namespace of the same host name, as a container restarts: the
        # processes get the same PIDs every time (needs root: unshare)
        self.pid_namespace = pid_namespace
        if run_sh:
            self.env.update(PORT=str(self.port), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")

    def start(self, wait_loaded: bool = True, timeout: float = 120) -> "Backend":
        self.log = open(self.log_path, "ab")
        cmd = ([str(ROOT / "run.sh")] if self.run_sh else
               [sys.executable, "-m", "backend.server", "--host", "127.0.0.1", "--port", str(self.port)])
        if self.pid_namespace:
            cmd = ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
        self.proc = subprocess.Popen(cmd,
                                     cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                h = self.get("/health")[1]
                if not wait_loaded or not isinstance(h, dict) or h.get("ready") or "error" in h:
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError("backend did not come up")

    def kill(self, sig=9) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        self.kill(15)

    def request(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[Dict] = None, timeout: float = 300):
        headers = dict(headers or {})
        if headers.get("Authorization", "") is None:
            headers.pop("Authorization")  # explicitly without credentials
        elif self.env.get("BASIC_AUTH_USER") and "Authorization" not in headers:
            import base64

            cred = f"{self.env['BASIC_AUTH_USER']}:{self.env.get('BASIC_AUTH_PASS', '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(cred).decode()
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
        return status, (json.loads(raw) if "json" in ctype else raw)

    def get(self, path: str, headers=None):
        return self.request("GET", path, headers=headers, timeout=5)

    def health(self) -> Dict:
        """Everything ``/admin/health`` says (counters, jobs, scheduler, database), with the admin token."""
        status, h = self.get("/admin/health", headers={"Authorization": f"Bearer {self.env['SMARTSAM_ADMIN_TOKEN']}"})
        assert status == 200, (status, h)
        return h

    def post(self, path: str, data, headers=None, raw: bool = False):
        body = data if raw else json.dumps(data).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        return self.request("POST", path, body, h)


def keypoint(x_pct: float, y_pct: float, label: str = "Object", positive: bool = True, w: int = 481, h: int = 321) -> Dict:
    return {"original_width": w, "original_height": h, "image_rotation": 0, "id": f"k{x_pct}-{y_pct}",
            "from_name": "tag", "to_name": "image", "type": "keypointlabels", "is_positive": positive,
            "value": {"x": x_pct, "y": y_pct, "width": 0.6, "keypointlabels": [label]}}


def predict_body(image_url: str, context_result=None, project: str = "1.1700000000", task_id: int = 1) -> Dict:
    body = {"tasks": [{"id": task_id, "data": {"image": image_url}}], "project": project, "label_config": LABEL_CONFIG,
            "params": {"context": {"result": context_result} if context_result is not None else None}}
    return body


def raw_oversized_post(port: int, path: str, body: bytes, content_type: str = "application/json"):
    """POST a body the server refuses by its Content-Length: the headers go first and the answer is
    read before the body is sent, so the server's 413 (and its closing the connection) is seen
    deterministically; sending the body afterwards may then fail with a reset, which is fine.
    Returns (status, the JSON error)."""
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        length = int(next((line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), b"0"))
        while len(payload) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            payload += chunk
        try:
            s.sendall(body)
        except OSError:
            pass  # the server answered and closed: a reset here is the defined behaviour
        return int(head.split()[1]), json.loads(payload or b"{}")
    finally:
        s.close()


def rle_mask(result: Dict) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    h, w = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0


def png_bytes(arr: np.ndarray, mode: Optional[str] = None) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(b, format="PNG")
    return b.getvalue()


class ImageServer:
    """A real HTTP server standing in for Label Studio's file endpoints and other hosts."""

    def __init__(self, files: Dict[str, bytes]) -> None:
        self.files = files
        self.hits = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.hits.append((self.path, self.headers.get("Authorization")))
                p = self.path
                if p.startswith("/data/upload/") and self.headers.get("Authorization") != f"Token {TOKEN}":
                    return self._send(401, b"unauthorized")
                if p == "/status/404":
                    return self._send(404, b"no")
                if p == "/status/500":
                    return self._send(500, b"boom")
                if p == "/status/401":
                    return self._send(401, b"no")
                if p == "/redirect-file":
                    self.send_response(302)
                    self.send_header("Location", "file:///etc/passwd")
                    self.end_headers()
                    return
                if p.startswith("/drip/"):
                    # a server that never stops sending, one byte at a time
                    body = outer.files[p.split("/")[-1]]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        for b in body:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(0.05)
                    except OSError:
                        pass
                    return
                if p == "/redirect-away":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                    self.end_headers()
                    return
                if p == "/slow":
                    time.sleep(8)
                    return self._send(200, b"late")
                if p == "/huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 ** 10))
                    self.end_headers()
                    return
                name = p.split("/")[-1]
                if name in outer.files:
                    return self._send(200, outer.files[name])
                return self._send(404, b"missing")

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Access-Control-Allow-Origin", "*")  # a browser may show these images too
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def wsgi_call(app, method: str, path: str, body: bytes = b"", headers=None):
    """One request through the WSGI callable: ``(status, JSON answer or bytes, seconds)``."""
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "RAW_URI": path, "QUERY_STRING": query,
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body),
               "REMOTE_ADDR": "127.0.0.1", **(headers or {})}
    got = {}

    def start_response(status, hdrs):
        got["status"] = int(status.split()[0])
        got["ctype"] = dict(hdrs).get("Content-Type", "")

    t0 = time.monotonic()
    out = b"".join(app(environ, start_response))
    took = time.monotonic() - t0
    return got["status"], (json.loads(out) if "json" in got["ctype"] else out), took
