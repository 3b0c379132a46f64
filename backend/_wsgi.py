"""WSGI app serving Label Studio's ML backend protocol, plus the reference admin API.

Why not ``label_studio_ml.api``: it is Flask 1.1.2 on Werkzeug 2.0.2 (pinned by label-studio-ml
1.0.9), releases with published advisories, including a multipart-parsing denial of service.
This app keeps label-studio-ml's model class (``backend.model.SmartSAMBackend``) and serves the
same endpoints as a plain WSGI callable under gunicorn: it never parses multipart or form bodies,
only JSON up to ``SMARTSAM_MAX_REQUEST_BYTES``, and has no debugger.

Endpoints: ``GET /health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, and for
admins (``Authorization: Bearer $SMARTSAM_ADMIN_TOKEN``, or basic auth with that token as the
password, which a browser asks for): the page ``GET /admin``,
``/admin/references[/<project>[/<label>[/mask.png|/versions]]]`` (GET, PUT, DELETE),
``GET /admin/versions/<id>[/thumb.jpg|/mask.png]``, ``POST /admin/versions/<id>/restore``,
``GET /admin/stats[.png][?project=ID]`` (field statistics) and ``GET /admin/jobs``.

What is trusted: Label Studio's API (read with the backend's key), the admin token, the webhook
secret. What is not: anything in a request body. A webhook is only a notice: the annotation it
names is read back from Label Studio before it can change a reference (``backend.jobs``), so
``/webhook`` needs no basic auth (Label Studio sends none to webhooks); with
``SMARTSAM_WEBHOOK_SECRET`` set it needs the secret in the ``X-SmartSAM-Webhook-Secret`` header.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import sys
import threading
import time
import urllib.parse
from typing import Dict, List, Optional, Tuple

from .jobs import ANNOTATION_EVENTS, DELETED
from .model import Engine, RequestError, SmartSAMBackend, project_key

log = logging.getLogger("smartsam.http")


WEBHOOK_SECRET_HEADER = "X-SmartSAM-Webhook-Secret"


class Raw:
    """An answer that is not JSON: bytes and their content type."""

    def __init__(self, body: bytes, ctype: str) -> None:
        self.body, self.ctype = body, ctype


class HttpError(Exception):
    """An HTTP error answer. ``reason`` replaces the status line's reason phrase: Label Studio's
    Connect dialog shows only that line of a failed /health or /setup, never the body."""

    def __init__(self, status: int, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _reason_phrase(text: str) -> str:
    # a status line is one line of latin-1 text
    return " ".join(text.encode("ascii", "replace").decode().split())[:300]


def _basic_credentials(environ) -> Optional[Tuple[str, str]]:
    """(user, password) of a Basic Authorization header; None when there is none or it is not
    base64 of UTF-8 (then it is not the credentials)."""
    h = environ.get("HTTP_AUTHORIZATION", "")
    if not h.startswith("Basic "):
        return None
    try:
        user, _, pw = base64.b64decode(h[6:].encode("latin-1"), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeError):
        return None
    return user, pw


def _same(a: str, b: str) -> bool:
    """Constant-time comparison of two texts, any characters."""
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type",
            500: "Internal Server Error", 503: "Service Unavailable"}


def _read_json(environ, limit: int):
    ctype = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HttpError(415, f"expected Content-Type application/json, got {ctype or 'none'}")
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if n > limit:
            raise HttpError(413, f"request body of {n} bytes is over the limit of {limit} (SMARTSAM_MAX_REQUEST_BYTES)")
        body = stream.read(n)
    else:
        body = stream.read(limit + 1)  # chunked: read no more than the limit
        if len(body) > limit:
            raise HttpError(413, f"request body is over the limit of {limit} bytes (SMARTSAM_MAX_REQUEST_BYTES)")
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise HttpError(400, f"malformed JSON: {str(e)[:200]}") from None


class App:
    """The WSGI callable. ``engine`` defaults to the process's :class:`Engine`."""

    def __init__(self, engine: Optional[Engine] = None) -> None:
        self._engine = engine
        self._heavy: Optional[threading.BoundedSemaphore] = None
        self._heavy_lock = threading.Lock()

    def _heavy_gate(self) -> threading.BoundedSemaphore:
        # Requests that use the model may hold all threads but one: /health always has a thread.
        with self._heavy_lock:
            if self._heavy is None:
                self._heavy = threading.BoundedSemaphore(max(1, self.engine.settings.threads - 1))
            return self._heavy

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine.instance()
        return self._engine

    # -- plumbing --------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        status, body, ctype, reason = 200, None, "application/json", None
        try:
            status, payload = self.route(method, path, environ)
            if isinstance(payload, Raw):
                body, ctype = payload.body, payload.ctype
            elif isinstance(payload, bytes):
                body, ctype = payload, "image/png"
            elif isinstance(payload, str):
                body, ctype = payload.encode(), "text/html; charset=utf-8"
            else:
                body = json.dumps(payload).encode()
        except HttpError as e:
            status, body, reason = e.status, json.dumps({"error": str(e)}).encode(), e.reason
            log.warning("%s %s -> %d: %s", method, path, e.status, e)
        except Exception as e:  # the server stays up whatever one request does
            log.exception("%s %s failed", method, path)
            status, body = 500, json.dumps({"error": f"internal error: {type(e).__name__}"}).encode()
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        if status == 413:
            # the unread body is not drained: the connection ends after this answer
            headers.append(("Connection", "close"))
        if status == 401 and (path == "/admin" or path.startswith("/admin/")):
            # the page: let the browser ask for the credentials (user: anything, password: the admin token)
            headers.append(("WWW-Authenticate", 'Basic realm="SmartSAM admin", charset="UTF-8"'))
        if ctype.startswith("text/html"):
            headers += [("Content-Security-Policy", "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; img-src 'self'"), ("X-Frame-Options", "DENY"),
                        ("Cache-Control", "no-store")]
        start_response(f"{status} {_reason_phrase(reason) if reason else _REASONS.get(status, '')}", headers)
        return [body]

    def _check_basic_auth(self, environ) -> None:
        s = self.engine.settings
        if not s.basic_auth_user:
            return
        cred = _basic_credentials(environ)
        if not (cred and _same(cred[0], s.basic_auth_user) & _same(cred[1], s.basic_auth_pass or "")):
            raise HttpError(401, "basic auth required (BASIC_AUTH_USER / BASIC_AUTH_PASS)")

    def _check_admin(self, environ, method: str) -> None:
        token = self.engine.settings.admin_token
        if not token:
            raise HttpError(403, "the admin API is off: set SMARTSAM_ADMIN_TOKEN to turn it on")
        h = environ.get("HTTP_AUTHORIZATION", "")
        if h.startswith("Bearer ") and _same(h[7:], token):
            return
        cred = _basic_credentials(environ)
        if cred is not None and _same(cred[1], token):
            # a browser resends basic credentials with any site's form: changes need a header
            # that only a same-origin script can add (the admin page's)
            if method not in ("GET", "HEAD") and environ.get("HTTP_X_SMARTSAM_ADMIN") != "1":
                raise HttpError(403, "changes from a browser need the X-SmartSAM-Admin: 1 header (the admin page sends it)")
            return
        raise HttpError(401, "admin token required: Authorization: Bearer <SMARTSAM_ADMIN_TOKEN> (or basic auth with it "
                             "as the password)")

    def route(self, method: str, path: str, environ) -> Tuple[int, object]:
        limit = self.engine.settings.max_request_bytes
        if path == "/admin" or path.startswith("/admin/"):
            self._check_admin(environ, method)
            if method == "PUT":
                with self._gate():
                    return self.admin(method, path, environ, limit)
            return self.admin(method, path, environ, limit)
        if path == "/webhook":
            # Label Studio sends webhooks without basic auth; a webhook is only a notice (see above)
            self._check_webhook_secret(environ)
            if method != "POST":
                raise HttpError(405, "POST only")
            data = _read_json(environ, limit)
            if not isinstance(data, dict):
                raise HttpError(400, "the body must be a JSON object")
            return 200, self.webhook(data)
        self._check_basic_auth(environ)
        if path in ("/", "/health"):
            if method != "GET":
                raise HttpError(405, "GET only")
            h = self.engine.health()
            if h["load_error"]:
                raise HttpError(503, f"model failed to load: {h['load_error']}", reason=f"Model failed to load: {h['load_error']}")
            return 200, h
        if path == "/metrics":
            return 200, {}
        if method != "POST":
            raise HttpError(405 if path in ("/setup", "/predict") else 404, f"no {method} {path}")
        data = _read_json(environ, limit)
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object")
        if path == "/setup":
            return 200, self.setup(data)
        if path == "/predict":
            with self._gate():
                return 200, self.predict(data)
        raise HttpError(404, f"no endpoint {path}")

    @contextlib.contextmanager
    def _gate(self):
        gate = self._heavy_gate()
        if not gate.acquire(blocking=False):
            raise HttpError(503, "busy: every request thread is in use (SMARTSAM_THREADS); try again")
        try:
            yield
        finally:
            gate.release()

    def _check_webhook_secret(self, environ) -> None:
        secret = self.engine.settings.webhook_secret
        if not secret:
            return
        got = environ.get("HTTP_" + WEBHOOK_SECRET_HEADER.upper().replace("-", "_"), "")
        if not _same(got, secret):
            raise HttpError(401, f"webhook secret required: header {WEBHOOK_SECRET_HEADER} (SMARTSAM_WEBHOOK_SECRET)")

    # -- protocol --------------------------------------------------------------------------
    def _model(self, label_config) -> SmartSAMBackend:
        if not isinstance(label_config, str) or not label_config.strip():
            raise RequestError("the request has no label_config")
        try:
            return SmartSAMBackend(label_config=label_config, engine=self.engine)
        except RequestError:
            raise
        except Exception as e:
            raise RequestError(f"cannot parse the labeling config ({e})") from None

    def setup(self, data: Dict) -> Dict:
        """Label Studio's Connect check: the labeling config must suit SmartSAM."""
        from .model import check_label_config

        problems = check_label_config(data.get("schema"))
        if problems:
            msg = "SmartSAM cannot work with this labeling config: " + "; ".join(problems)
            raise HttpError(400, msg, reason=msg)
        project = data.get("project")
        try:
            version = self.engine.model_version(project if project not in (None, "") else None)
        except RequestError:
            version = self.engine.model_version()
        return {"model_version": version}

    def predict(self, data: Dict) -> Dict:
        s = self.engine.settings
        deadline = time.monotonic() + s.request_timeout
        version = self.engine.model_version()
        try:
            model = self._model(data.get("label_config"))
            version = self.engine.model_version(project_key(data.get("project")))
            params = data.get("params") or {}
            if not isinstance(params, dict):
                raise RequestError("params must be an object")
            context = params.get("context")
            if context is not None and not isinstance(context, dict):
                raise RequestError("params.context must be an object")
            results = model.predict(data.get("tasks"), context=context, project=data.get("project"), deadline=deadline,
                                    budget=s.predict_budget)
        except RequestError as e:
            log.warning("predict: %s", e)
            return {"results": [], "errors": [str(e)], "model_version": version}
        out = {"results": results, "model_version": version}
        if model.errors:
            out["errors"] = model.errors
        return out

    def webhook(self, data: Dict) -> Dict:
        """Queue the notice; the annotation is read back from Label Studio before anything changes."""
        action = data.get("action")
        if not isinstance(action, str):
            raise HttpError(400, "webhook without action")
        if action == DELETED:
            # only ids: each deletion is confirmed with Label Studio (404) before a reference changes
            anns = data.get("annotations")
            ids = [a.get("id") for a in anns if isinstance(a, dict)] if isinstance(anns, list) else []
            ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)][:1000]
            for i in ids:
                if not self.engine.jobs.notify(action, i, None):
                    raise HttpError(503, "too many webhook events waiting; Label Studio will send later ones")
            return {"action": action, "annotations": ids, "queued": True}
        if action not in ANNOTATION_EVENTS:
            return {"action": action, "ignored": True}
        ann = data.get("annotation")
        aid = ann.get("id") if isinstance(ann, dict) else None
        if isinstance(aid, bool) or not isinstance(aid, int):
            return {"action": action, "errors": ["the event names no annotation id (turn on 'send payload' for the webhook)"]}
        project = data.get("project")
        claimed = project.get("id") if isinstance(project, dict) else None
        if not self.engine.jobs.notify(action, aid, None if claimed is None else str(claimed)):
            raise HttpError(503, "too many webhook events waiting; Label Studio will send later ones")
        return {"action": action, "annotation": aid, "queued": True}

    # -- admin -----------------------------------------------------------------------------
    def admin(self, method: str, path: str, environ, limit: int) -> Tuple[int, object]:
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")[1:]]
        store = self.engine.store
        if not parts:
            if method != "GET":
                raise HttpError(405, "GET only")
            from .admin_page import render

            return 200, render(store, self.engine.jobs.state() if self.engine.jobs else {},
                               self.engine.settings.label_studio_url, self.engine.stats.summary())
        if parts == ["jobs"] and method == "GET":
            return 200, self.engine.jobs.state() if self.engine.jobs else {}
        if parts in (["stats"], ["stats.png"]) and method == "GET":
            from .field_stats import plot_png

            q = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            summary = self.engine.stats.summary((q.get("project") or [None])[0])
            return 200, summary if parts == ["stats"] else Raw(plot_png(summary), "image/png")
        if parts[0] == "versions" and len(parts) in (2, 3):
            return self._admin_version(method, parts[1:])
        if parts[0] != "references" or len(parts) > 4:
            raise HttpError(404, f"no admin endpoint {path}")
        project = parts[1] if len(parts) > 1 else None
        label = parts[2] if len(parts) > 2 else None
        if method == "GET" and label is None:
            return 200, {"references": [r.public() for r in store.list(project)], "problems": store.check()}
        if label is None:
            raise HttpError(405, "PUT and DELETE name a project and a label: /admin/references/<project>/<label>")
        if method == "GET":
            if len(parts) == 4 and parts[3] == "mask.png":
                png = store.mask_png(project, label)
                if png is None:
                    raise HttpError(404, f"no mask for project {project} label {label!r}")
                return 200, png
            if len(parts) == 4 and parts[3] == "versions":
                return 200, {"versions": [v.public() for v in store.history(project, label)],
                             "current": [v.id for v in store.current(project, label)]}
            if len(parts) == 4:
                raise HttpError(404, f"no admin endpoint {path}")
            meta = store.meta(project, label)
            if meta is None:
                raise HttpError(404, f"no reference for project {project} label {label!r}")
            return 200, dict(meta.public(), exemplars=[m.public() for m in store.current(project, label)])
        if len(parts) == 4:
            raise HttpError(405, f"{method} not allowed here")
        if method == "DELETE":
            n = store.delete(project, label)
            return 200, {"deleted": n}
        if method == "PUT":
            body = _read_json(environ, limit)
            if not isinstance(body, dict):
                raise HttpError(400, "the body must be a JSON object")
            try:
                return 200, self._set_reference(project, label, body)
            except (RequestError, ValueError) as e:
                raise HttpError(400, str(e)) from None
        raise HttpError(405, f"{method} not allowed here")

    def _admin_version(self, method: str, parts: List[str]) -> Tuple[int, object]:
        store = self.engine.store
        try:
            vid = int(parts[0])
        except ValueError:
            raise HttpError(404, f"no reference version {parts[0]!r}") from None
        v = store.version(vid)
        if v is None:
            raise HttpError(404, f"no reference version {vid}")
        what = parts[1] if len(parts) > 1 else None
        if what == "restore":
            if method != "POST":
                raise HttpError(405, "POST only")
            new = store.restore(vid, {"admin": "restore"})
            return 200, {"restored": vid, "version": new, "current": [m.public() for m in store.current(v.project, v.label)]}
        if method != "GET":
            raise HttpError(405, "GET only")
        if what is None:
            return 200, v.public()
        files = {"thumb.jpg": ("thumb", "image/jpeg"), "mask.png": ("mask", "image/png"), "image.jpg": ("image", "image/jpeg")}
        if what not in files:
            raise HttpError(404, f"no admin endpoint for version {vid}: {what}")
        from .references import CorruptReference

        try:
            data = store.version_file(vid, files[what][0])
        except CorruptReference as e:
            raise HttpError(404, str(e)) from None
        if data is None:
            raise HttpError(404, f"version {vid} has no {what}")
        return 200, Raw(data, files[what][1])

    def _set_reference(self, project: str, label: str, body: Dict) -> Dict:
        from smartsam.io import ImageError, load_image, load_mask
        import io

        eng = self.engine
        if "text" in body:
            ref = eng.make_reference(None, text=str(body["text"]))
            eng.store.put(project, label, ref, {"admin": "text"}, how="admin")
            return {"set": label, "kind": "text"}
        if "image_b64" in body:
            try:
                image = load_image(base64.b64decode(body["image_b64"]))
                mask = load_mask(io.BytesIO(base64.b64decode(body["mask_b64"]))) if body.get("mask_b64") else None
            except (ImageError, binascii.Error, ValueError) as e:
                raise RequestError(f"bad image or mask: {e}") from None
            ref = eng.make_reference(image, mask)
            eng.store.put(project, label, ref, {"admin": "upload", "prep": eng.settings.reference_prep if mask is not None else None},
                          mask=mask, image=image, how="admin")
            return {"set": label, "kind": ref.kind}
        if "task" in body:
            return self._reference_from_task(project, label, body)
        raise RequestError("give one of: text, image_b64 (+ mask_b64), task (+ annotation)")

    def _reference_from_task(self, project: str, label: str, body: Dict) -> Dict:
        """Fetch an annotated task from Label Studio and use its brush mask for ``label``."""
        from .images import ImageFetchError
        from .model import brush_mask, first_regions

        eng = self.engine
        try:
            task = eng.fetcher.get_json(f"/api/tasks/{int(body['task'])}")
        except (ImageFetchError, ValueError) as e:
            raise RequestError(f"cannot read task {body['task']} from Label Studio ({e})") from None
        if str(task.get("project")) != str(project):
            raise RequestError(f"task {body['task']} is in project {task.get('project')}, not {project}")
        anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if body.get("annotation") is not None:
            anns = [a for a in anns if a.get("id") == int(body["annotation"])]
        for a in anns:
            r = first_regions(a.get("result") or []).get(label)
            if r is None:
                continue
            try:
                image = eng.fetcher.fetch(next(v for v in task["data"].values() if isinstance(v, str)), task_id=task.get("id"))
            except (ImageFetchError, StopIteration) as e:
                raise RequestError(f"cannot fetch the task's image ({e})") from None
            mask = brush_mask(r, image.shape[:2])
            ref = eng.make_reference(image, mask)
            eng.store.put(project, label, ref, {"admin": "task", "task": task.get("id"), "annotation": a.get("id"),
                                                "prep": eng.settings.reference_prep},
                          mask=mask, image=image, annotation=a.get("id"), how="admin")
            return {"set": label, "kind": "mask", "task": task.get("id"), "annotation": a.get("id")}
        raise RequestError(f"task {body['task']} has no submitted brush region labelled {label!r}")


app = App()


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m backend._wsgi``: check the weights, then serve with gunicorn (never a debugger)."""
    import argparse

    ap = argparse.ArgumentParser(description="SmartSAM Label Studio ML backend")
    ap.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SMARTSAM_THREADS", 4)))
    ap.add_argument("--no-download", action="store_true", help="fail instead of downloading missing weights")
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from smartsam.models import ModelError, default_backbone, ensure_checkpoint, get_spec

    from .config import Settings, SettingsError
    from .references import ReferenceStore, ReferenceStoreError

    try:
        s = Settings()
    except (SettingsError, ValueError) as e:
        print(f"smartsam-backend: error: {e}", file=sys.stderr)
        return 1
    try:
        spec = get_spec(s.backbone or default_backbone())
        if not spec.random and not s.checkpoint:
            # In the parent, before forking: a file check or download, no CUDA.
            ensure_checkpoint(spec, allow_download=not args.no_download)
        ReferenceStore(s.data_dir, exemplars=s.exemplars)  # a newer or broken store stops the start with its reason
    except (ModelError, ReferenceStoreError) as e:
        print(f"smartsam-backend: error: {e}", file=sys.stderr)
        return 1
    os.environ.setdefault("SMARTSAM_BACKBONE", spec.name)
    cmd = [sys.executable, "-m", "gunicorn", "--config", os.path.join(os.path.dirname(__file__), "gunicorn_conf.py"),
           "--bind", f"{args.host}:{args.port}", "--threads", str(args.threads), "backend._wsgi:app"]
    os.execv(sys.executable, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
