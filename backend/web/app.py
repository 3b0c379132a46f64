"""The web layer: the WSGI app Label Studio and admins talk to.

Routes (``backend.web.wsgi``'s table): the ML API as the current ``label-studio-ml`` serves it
(HumanSignal/label-studio-ml-backend, ``label_studio_ml/api.py``): ``GET /`` and ``/health``
(``status``, ``model_class``), ``POST /setup`` (``extra_params``: per-project agent settings),
``POST /predict`` (without a ``project``: pure-IS for that request), ``POST /webhook``
(annotation events answer 201, ``START_TRAINING`` is answered), ``GET /metrics``; plus the admin
API (:mod:`backend.web.admin_api`). Authentication, and the one place where what went wrong
becomes an HTTP status and an answer Label Studio understands.

What is trusted: Label Studio's API (read with the backend's key), the admin token, the webhook
secret. What is not: anything in a request body. A webhook (and a /setup's extra params) is only
a notice: what it names is read back from Label Studio before it changes anything
(:mod:`backend.background.workers`), so ``/webhook`` needs no basic auth (Label Studio sends none
to webhooks); with ``SMARTSAM_WEBHOOK_SECRET`` set it needs the secret in the
``X-SmartSAM-Webhook-Secret`` header.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from typing import Dict, List, Optional, Tuple

import torch

from backend.background.workers import ANNOTATION_EVENTS, DELETED
from backend.config import AgentSettings
from backend.errors import QueueFull, Refused, RequestError, SettingsError
from backend.labelstudio.schemas import PredictBody, SetupBody, WebhookBody, parse, project_key
from backend.store.db import DatabaseUnavailable, calls_here
from backend.web.protocol import SmartSAMBackend
from backend.web.wsgi import (
    HttpError,
    MethodNotAllowed,
    Request,
    Router,
    basic_credentials,
    client_address,
    json_object,
    path_segments,
    respond,
    same,
)

log = logging.getLogger("smartsam.http")

WEBHOOK_SECRET_HEADER = "X-SmartSAM-Webhook-Secret"
MODEL_CLASS = SmartSAMBackend.__name__


class App:
    """The WSGI callable over the process's services (:class:`backend.server.Services`)."""

    def __init__(self, services) -> None:
        self.services = services
        self.settings = services.settings
        self.models = services.models
        self.versions = services.versions
        # Requests that use the model may hold all threads but one: /health always has a thread.
        # (Webhooks are not limited: Label Studio never resends one refused; a writer waits at most
        # PostgreSQL's lock_timeout, backend.store.db.)
        self._heavy = threading.BoundedSemaphore(max(1, self.settings.threads - 1))
        self._in_flight = 0
        self._predict_calls = 0
        self._click_db_calls: Optional[int] = None
        self._in_flight_lock = threading.Lock()
        from backend.web.admin_api import AdminApi

        self.router = Router()
        self.router.add("GET", "/", self.health)
        self.router.add("GET", "/health", self.health)
        self.router.add("GET", "/admin/health", self.admin_health)
        self.router.add("GET", "/metrics", lambda req: (200, {}))
        self.router.add("POST", "/setup", self.setup)
        self.router.add("POST", "/predict", self.predict)
        self.router.add("POST", "/webhook", self.webhook)
        self.admin = AdminApi(services.settings, services.store, services.stats, services.client, services.models,
                              services.rules, services.workers, self.gate)
        self.admin.register(self.router)

    # -- plumbing --------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        segs: List[str] = []
        try:
            segs = path_segments(environ)
            self._authenticate(segs, method, environ)
            handler, caps = self.router.resolve(method, segs)
            status, payload = handler(Request(method, segs, environ), **caps)
            reason, extra = None, []
        except Exception as e:  # the server stays up whatever one request does
            status, payload, reason, extra = error_answer(e, method, path)
            if status == 401 and segs[:1] == ["admin"]:
                # the page: let the browser ask for the credentials (user: anything, password: the admin token)
                extra.append(("WWW-Authenticate", 'Basic realm="SmartSAM admin", charset="UTF-8"'))
        return respond(start_response, status, payload, reason, extra)

    def _authenticate(self, segs: List[str], method: str, environ) -> None:
        from backend.web.admin_api import check_admin

        s = self.settings
        if segs[:1] == ["admin"]:
            check_admin(environ, method, s.admin_token)
        elif segs == ["webhook"]:
            # Label Studio sends webhooks without basic auth; a webhook is only a notice (see above)
            if s.webhook_secret:
                got = environ.get("HTTP_" + WEBHOOK_SECRET_HEADER.upper().replace("-", "_"), "")
                if not same(got, s.webhook_secret):
                    raise HttpError(401, f"webhook secret required: header {WEBHOOK_SECRET_HEADER} (SMARTSAM_WEBHOOK_SECRET)")
        elif s.basic_auth_user:
            cred = basic_credentials(environ)
            if not (cred and same(cred[0], s.basic_auth_user) & same(cred[1], s.basic_auth_pass or "")):
                raise HttpError(401, "basic auth required (BASIC_AUTH_USER / BASIC_AUTH_PASS)")

    @contextlib.contextmanager
    def gate(self):
        if not self._heavy.acquire(blocking=False):
            raise HttpError(503, "busy: every request thread is in use (SMARTSAM_THREADS); try again")
        with self._in_flight_lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1
            self._heavy.release()

    # -- the ML API ------------------------------------------------------------------------
    def health(self, req: Request):
        """Public: what Label Studio's Connect needs (status, model, readiness), nothing about
        projects, tasks, errors or the database (those are at ``/admin/health``). Never waits for
        the model, the database or a lock."""
        m = self.models
        if m.load_error:
            raise HttpError(503, f"model failed to load: {m.load_error}", reason=f"Model failed to load: {m.load_error}")
        bb = m.backbone
        return 200, {"status": "UP", "model_class": MODEL_CLASS, "model": bb.name if bb else m.settings.backbone_name,
                     "ready": bb is not None}

    def admin_health(self, req: Request):
        """Everything: the model's counters, the scheduler, requests, the background work, the
        prefetch and the database as last seen (with their ages). Never waits for the database
        or a lock either."""
        h = self.models.health()
        h.update(self.services.health())
        h["model_class"] = MODEL_CLASS
        # this worker's /predict calls so far, and model requests being answered now
        h["requests"] = {"predict": self._predict_calls, "in_flight": self._in_flight,
                         "database_calls_last_click": self._click_db_calls}
        h["projects_read"] = self.versions.refreshes
        h["threads"] = self.settings.threads
        h["threads_per_worker"] = torch.get_num_threads()
        h["jobs"] = self.services.workers.state()
        h["prefetch"] = self.services.prefetch.health()
        return 200, h

    def setup(self, req: Request):
        """Label Studio's Connect check: the labeling config must suit SmartSAM, and the extra
        params must be SmartSAM's (queued for confirmation with Label Studio)."""
        from backend.labelstudio.label_config import check_label_config

        data = json_object(req.environ, self.settings.max_request_bytes)
        try:
            parse(SetupBody, data)
        except RequestError as e:
            raise HttpError(400, str(e), reason=str(e)) from None
        problems = check_label_config(data.get("schema"))
        extra = data.get("extra_params")
        if extra in (None, ""):
            extra = {}
        try:
            AgentSettings().with_extra_params(extra)
        except SettingsError as e:
            problems.append(f"extra params: {e}")
        if problems:
            msg = "SmartSAM cannot work with this labeling config: " + "; ".join(problems)
            raise HttpError(400, msg, reason=msg)
        try:
            project = project_key(data.get("project"))
        except RequestError:
            project = None
        if project is not None and self.services.client.configured:
            try:
                self.services.workers.confirm_settings(project, dict(extra), self._sender(req))
            except Refused as e:  # Connect still works; the params wait for the next /setup
                log.warning("setup: extra params of project %s not queued for confirmation: %s", project, e)
        return 200, {"model_version": self.versions.model_version(project)}

    def predict(self, req: Request):
        with self._in_flight_lock:
            self._predict_calls += 1
        data = json_object(req.environ, self.settings.max_request_bytes)
        with self.gate():
            s = self.settings
            deadline = time.monotonic() + s.request_timeout
            try:
                project = project_key(data.get("project"))
            except RequestError as e:
                return 200, {"results": [], "errors": [str(e)], "model_version": self.versions.model_version()}
            model = None
            try:
                parse(PredictBody, data)  # the body's shape, each field named when wrong
                model = self.services.backend(data.get("label_config"))
                params = data.get("params") or {}
                context = params.get("context")
                calls = calls_here()
                results = model.predict(data.get("tasks"), context=context, project=data.get("project"),
                                        deadline=deadline, budget=s.predict_budget)
                if isinstance(context, dict) and context.get("result"):
                    # an annotator's click: how often it asked the database (the project's state is cached)
                    self._click_db_calls = calls_here() - calls
            except RequestError as e:
                log.warning("predict: %s", e)
                version = (model.version if model is not None else None) or self.versions.model_version(project)
                return 200, {"results": [], "errors": [str(e)], "model_version": version}
            out = {"results": results, "model_version": model.version}
            if model.errors:
                out["errors"] = model.errors
            return 200, out

    def _sender(self, req: Request) -> str:
        return client_address(req.environ, self.settings.trusted_proxies)

    def webhook(self, req: Request):
        """Queue the notice; what it names is read back from Label Studio before anything changes."""
        try:
            return self._webhook(req)
        except Refused as e:  # not kept: the sender hears 503 (Label Studio does not resend; see jobs)
            raise HttpError(503, str(e)) from None

    def _webhook(self, req: Request):
        data = json_object(req.environ, self.settings.max_request_bytes)
        sender = self._sender(req)
        action = data.get("action")
        jobs = self.services.workers
        if not isinstance(action, str):
            raise HttpError(400, "webhook without action")
        try:
            parse(WebhookBody, data)
        except RequestError as e:
            raise HttpError(400, str(e)) from None
        if action == "START_TRAINING":
            return 201, {"action": action, "status": "ok", "trained": False,
                         "note": "SmartSAM learns references from annotations as they are submitted; nothing to train"}
        if action == DELETED:
            # only ids: each deletion is confirmed with Label Studio (404) before a reference changes
            ids = _ids(data.get("annotations"))
            for i in ids:
                jobs.notify(action, i, None, sender)
            return 201, {"action": action, "annotations": ids, "queued": True}
        if action not in ANNOTATION_EVENTS:
            return 200, {"action": action, "status": "Unknown event", "ignored": True}
        ann = data.get("annotation")
        # ANNOTATIONS_CREATED (an import) carries a list; the others one annotation
        ids = _ids(ann) if isinstance(ann, list) else _ids([ann])
        if not ids:
            # label-studio-ml answers annotation events 201 whatever they carry (its own test expects it)
            return 201, {"action": action, "errors": ["the event names no annotation id (turn on 'send payload' for the webhook)"]}
        project = data.get("project")
        claimed = project.get("id") if isinstance(project, dict) else None
        if isinstance(claimed, bool) or not isinstance(claimed, (int, str)) or len(str(claimed)) > 20:
            claimed = None  # only logged beside Label Studio's answer: a short id or nothing
        for i in ids:
            jobs.notify(action, i, None if claimed is None else str(claimed), sender)
        if isinstance(ann, list):
            return 201, {"action": action, "annotations": ids, "queued": True}
        return 201, {"action": action, "annotation": ids[0], "queued": True}


def _ids(items) -> List[int]:
    """The integer ids of a list of ``{"id": ...}`` (at most 1000; anything else, and numbers past
    a 64-bit id, are left out)."""
    if not isinstance(items, list):
        return []
    ids = [a.get("id") for a in items if isinstance(a, dict)]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 63][:1000]


def error_answer(e: Exception, method: str = "", path: str = "") -> Tuple[int, Dict, Optional[str], List[Tuple[str, str]]]:
    """The one place where what went wrong becomes an HTTP answer: ``(status, JSON body, reason
    phrase, extra headers)``, logged. The domain's errors (``backend.errors``) say what happened;
    this says what HTTP calls it. Anything else is a bug: logged with its trace under an id, and
    answered 500 with that id only (never as if it were a message for the annotator)."""
    if isinstance(e, HttpError):
        extra = [("Allow", ", ".join(e.allowed))] if isinstance(e, MethodNotAllowed) else []
        log.warning("%s %s -> %d: %s", method, path, e.status, e)
        return e.status, {"error": str(e)}, e.reason, extra
    if isinstance(e, QueueFull):  # the model's queue: come back after the work ahead
        log.warning("%s %s -> 503: %s", method, path, e)
        return 503, {"error": str(e), "expected_wait_s": round(e.expected_wait, 1)}, None, [
            ("Retry-After", str(max(1, math.ceil(e.expected_wait))))]
    if isinstance(e, (Refused, DatabaseUnavailable)):  # not kept or not answerable now; the sender may try again
        log.warning("%s %s -> 503: %s", method, path, e)
        return 503, {"error": str(e)}, None, []
    if isinstance(e, (RequestError, SettingsError)):  # bad input that reached no handler's own answer
        log.warning("%s %s -> 400: %s", method, path, e)
        return 400, {"error": str(e)}, None, []
    ref = uuid.uuid4().hex[:12]
    log.error("%s %s failed (error %s)", method, path, ref, exc_info=e)
    return 500, {"error": f"internal error {ref}: the backend's log has the details"}, None, []
