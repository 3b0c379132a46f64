"""The composition root: settings -> engine, answers, rules, jobs -> the WSGI app; and the launcher.

``python -m backend.server`` (``run.sh``, ``make run``) reads :class:`Settings` from the
environment once, checks the weights and the reference store in the parent (a file check or
download, no CUDA), and execs gunicorn with the workers and threads those settings give; each
gunicorn worker builds the app with :func:`create_app` (no preload: the model and CUDA are
created after fork).

The ML API as the current ``label-studio-ml`` serves it (HumanSignal/label-studio-ml-backend,
``label_studio_ml/api.py``): ``GET /`` and ``/health`` (``status``, ``model_class``), ``POST
/setup`` (``extra_params``: per-project agent settings), ``POST /predict`` (without a
``project``: pure-IS for that request), ``POST /webhook`` (annotation events answer 201,
``START_TRAINING`` is answered), ``GET /metrics``; plus the admin API (:mod:`backend.admin_api`).

What is trusted: Label Studio's API (read with the backend's key), the admin token, the webhook
secret. What is not: anything in a request body. A webhook (and a /setup's extra params) is only
a notice: what it names is read back from Label Studio before it changes anything
(:mod:`backend.jobs`), so ``/webhook`` needs no basic auth (Label Studio sends none to webhooks);
with ``SMARTSAM_WEBHOOK_SECRET`` set it needs the secret in the ``X-SmartSAM-Webhook-Secret``
header.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch

from .answers import Answers
from .config import AgentSettings, Settings
from .db import DatabaseUnavailable
from .engine import Engine, project_key
from .answers import RequestContext
from .errors import HttpError, Refused, RequestError, SettingsError
from .jobs import ANNOTATION_EVENTS, DELETED, Jobs
from .label_config import LabelConfig
from .model import SmartSAMBackend
from .prefetch import Prefetcher
from .schemas import PredictBody, SetupBody, WebhookBody, parse
from .threads import ThreadGovernor, apply_in_worker, plan as thread_plan, usable_cores
from .reference_rules import ReferenceRules
from .wsgi import (MethodNotAllowed, Request, Router, basic_credentials, client_address, json_object, path_segments,
                   respond, same)

log = logging.getLogger("smartsam.http")

WEBHOOK_SECRET_HEADER = "X-SmartSAM-Webhook-Secret"
MODEL_CLASS = SmartSAMBackend.__name__


class Services:
    """Everything one process serves with, built from one :class:`Settings`.

    Args:
        settings: read once by the caller (:meth:`Settings.from_env` for the service).
        load: start loading the models in the background now.
    """

    def __init__(self, settings: Settings, load: bool = True) -> None:
        self.settings = settings
        # the worker's compute threads follow the free cores (SMARTSAM_WAIT_POLICY=adaptive) once the
        # launcher has planned them (SMARTSAM_TORCH_THREADS); in-process uses keep torch's own
        self.governor = (ThreadGovernor(settings.torch_threads, usable_cores())
                         if settings.wait_policy == "adaptive" and settings.torch_threads else None)
        self.engine = Engine(settings, governor=self.governor)
        self.answers = Answers(self.engine)
        self.rules = ReferenceRules(self.engine, self.answers.image)
        self.jobs = Jobs(self.engine, self.rules, self.prelabel_task)
        self.prefetch = Prefetcher(self.engine, self.answers.image, settings.prefetch)
        self.jobs.start()  # its workers call back into what is built above
        threading.Thread(target=self._monitor, name="smartsam-monitor", daemon=True).start()
        if load:
            self.engine.start_loading()

    def _monitor(self) -> None:
        """Every second: the database's state and the queue's counts, read here so that no
        request ever waits for them (``/health`` shows them with their age)."""
        while True:
            probes = [self.engine.probe_database, self.jobs.refresh_view]
            if self.governor is not None:
                probes.append(self.governor.update)
            for probe in probes:
                try:
                    probe()
                except Exception:  # a probe never stops the others
                    log.exception("monitor: %s failed", getattr(probe, "__name__", probe))
            time.sleep(1.0)

    def backend(self, label_config) -> SmartSAMBackend:
        """The protocol adapter for one labeling config (RequestError when SmartSAM cannot use it)."""
        if not isinstance(label_config, str) or not label_config.strip():
            raise RequestError("the request has no label_config")
        return SmartSAMBackend(label_config=label_config, answers=self.answers, pending=self.jobs.pending,
                               submit=self.jobs.submit, on_click=self.prefetch.on_click)

    def prelabel_task(self, project: str, task: Dict, label_config: str) -> Dict:
        """One task through the pre-labeling path (the background queue's worker): the prediction,
        or the reason there is none as an exception (RequestError: nothing to label; an
        ImageFetchError or DatabaseUnavailable that may pass, which the queue tries again)."""
        deadline = time.monotonic() + self.settings.request_timeout
        ctx = RequestContext.build(self.engine, project, LabelConfig.parse(label_config), deadline, strict=True)
        return self.answers.prelabel(task, ctx)

    def close(self) -> None:
        """At shutdown: write the queued field statistics (no row is lost)."""
        self.prefetch.close()
        self.engine.stats.close()


class App:
    """The WSGI callable over :class:`Services`."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.engine = services.engine
        # Requests that use the model may hold all threads but one: /health always has a thread.
        self._heavy = threading.BoundedSemaphore(max(1, self.settings.threads - 1))
        self._in_flight = 0
        self._predict_calls = 0
        self._in_flight_lock = threading.Lock()
        from .admin_api import AdminApi

        self.router = Router()
        self.router.add("GET", "/", self.health)
        self.router.add("GET", "/health", self.health)
        self.router.add("GET", "/admin/health", self.admin_health)
        self.router.add("GET", "/metrics", lambda req: (200, {}))
        self.router.add("POST", "/setup", self.setup)
        self.router.add("POST", "/predict", self.predict)
        self.router.add("POST", "/webhook", self.webhook)
        self.admin = AdminApi(self.engine, services.rules, services.jobs, self.gate)
        self.admin.register(self.router)

    # -- plumbing --------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/") or "/"
        extra: List[Tuple[str, str]] = []
        reason = None
        try:
            segs = path_segments(environ)
            self._authenticate(segs, method, environ)
            handler, caps = self.router.resolve(method, segs)
            status, payload = handler(Request(method, segs, environ), **caps)
        except HttpError as e:
            status, payload, reason = e.status, {"error": str(e)}, e.reason
            if isinstance(e, MethodNotAllowed):
                extra.append(("Allow", ", ".join(e.allowed)))
            if status == 401 and segs[:1] == ["admin"]:
                # the page: let the browser ask for the credentials (user: anything, password: the admin token)
                extra.append(("WWW-Authenticate", 'Basic realm="SmartSAM admin", charset="UTF-8"'))
            log.warning("%s %s -> %d: %s", method, path, e.status, e)
        except DatabaseUnavailable as e:  # what needs the store waits for it; the sender may try again
            log.warning("%s %s -> 503: %s", method, path, e)
            status, payload = 503, {"error": str(e)}
        except Exception as e:  # the server stays up whatever one request does
            log.exception("%s %s failed", method, path)
            status, payload = 500, {"error": f"internal error: {type(e).__name__}"}
        return respond(start_response, status, payload, reason, extra)

    def _authenticate(self, segs: List[str], method: str, environ) -> None:
        from .admin_api import check_admin

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
        e = self.engine
        if e.load_error:
            raise HttpError(503, f"model failed to load: {e.load_error}", reason=f"Model failed to load: {e.load_error}")
        bb = e.backbone
        return 200, {"status": "UP", "model_class": MODEL_CLASS, "model": bb.name if bb else e.settings.backbone_name,
                     "ready": bb is not None}

    def admin_health(self, req: Request):
        """Everything: the model's counters, the scheduler, requests, the background work, the
        prefetch and the database as last seen (with their ages). Never waits for the database
        or a lock either."""
        h = self.engine.health()
        h["model_class"] = MODEL_CLASS
        # this worker's /predict calls so far, and model requests being answered now
        h["requests"] = {"predict": self._predict_calls, "in_flight": self._in_flight}
        h["threads"] = self.settings.threads
        h["threads_per_worker"] = torch.get_num_threads()
        h["jobs"] = self.services.jobs.state()
        h["prefetch"] = self.services.prefetch.health()
        return 200, h

    def setup(self, req: Request):
        """Label Studio's Connect check: the labeling config must suit SmartSAM, and the extra
        params must be SmartSAM's (queued for confirmation with Label Studio)."""
        from .label_config import check_label_config

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
        if project is not None and self.engine.client.configured:
            try:
                self.services.jobs.confirm_settings(project, dict(extra), self._sender(req))
            except Refused as e:  # Connect still works; the params wait for the next /setup
                log.warning("setup: extra params of project %s not queued for confirmation: %s", project, e)
        return 200, {"model_version": self.engine.model_version(project)}

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
                return 200, {"results": [], "errors": [str(e)], "model_version": self.engine.model_version()}
            model = None
            try:
                parse(PredictBody, data)  # the body's shape, each field named when wrong
                model = self.services.backend(data.get("label_config"))
                params = data.get("params") or {}
                context = params.get("context")
                results = model.predict(data.get("tasks"), context=context, project=data.get("project"),
                                        deadline=deadline, budget=s.predict_budget)
            except RequestError as e:
                log.warning("predict: %s", e)
                version = (model.version if model is not None else None) or self.engine.model_version(project)
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
        jobs = self.services.jobs
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


# -- the process --------------------------------------------------------------------------
_services: Optional[Services] = None


def create_app(settings: Optional[Settings] = None) -> App:
    """The WSGI app of this process (gunicorn: ``backend.server:create_app()``): settings from the
    environment unless given; the statistics are written out when the process exits."""
    global _services
    settings = settings or Settings.from_env()
    if settings.torch_threads:  # the launcher's plan (backend/threads.py), applied after the fork
        apply_in_worker(settings.torch_threads)
    _services = Services(settings)
    atexit.register(shutdown)
    return App(_services)


def shutdown() -> None:
    """Write what is queued (gunicorn's ``worker_exit``, and at interpreter exit)."""
    if _services is not None:
        _services.close()


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m backend.server``: check the weights, then serve with gunicorn (never a debugger)."""
    import argparse

    ap = argparse.ArgumentParser(description="SmartSAM Label Studio ML backend")
    ap.add_argument("--host", help="address to listen on (default $HOST, else 0.0.0.0)")
    ap.add_argument("--port", type=int, help="port (default $PORT, else 9090)")
    ap.add_argument("--no-download", action="store_true", help="fail instead of downloading missing weights")
    args = ap.parse_args(argv)

    from smartsam.models import ModelError, ensure_checkpoint, ensure_concept_files, get_spec

    from .db import DatabaseUnavailable
    from .references import ReferenceStore, ReferenceStoreError

    try:
        s = Settings.from_env().resolved()
        if args.host:
            s = s.replace(host=args.host)
        if args.port:
            s = s.replace(port=args.port)
    except (SettingsError, ValueError) as e:
        print(f"smartsam-backend: error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = get_spec(s.backbone)
        if not spec.random and not s.checkpoint:
            # In the parent, before forking: a file check or download, no CUDA.
            # with SAM 3's concept proposals its tokenizer too, once here rather than in each worker
            (ensure_concept_files if s.proposals == "sam3" else ensure_checkpoint)(spec, allow_download=not args.no_download, sources=s.sources)
        # a newer or broken store, or a database that does not answer, stops the start with its reason
        ReferenceStore(s.data_dir, exemplars=s.exemplars, database_url=s.database_url)
    except (ModelError, ReferenceStoreError, DatabaseUnavailable) as e:
        print(f"smartsam-backend: error: {e}", file=sys.stderr)
        return 1
    # The workers read the same settings: the backbone as resolved here (one model version), and
    # the compute threads that fit the box; OpenMP reads its variables when it loads (in the workers)
    os.environ["SMARTSAM_BACKBONE"] = s.backbone
    tp = thread_plan(s.torch_threads, s.wait_policy, s.workers)
    os.environ["SMARTSAM_TORCH_THREADS"] = str(tp.threads)
    os.environ.update(tp.environment(os.environ))
    log.info("%d compute threads per worker (%d workers), OpenMP wait policy %s", tp.threads, s.workers,
             os.environ.get("OMP_WAIT_POLICY"))
    cmd = [sys.executable, "-m", "gunicorn", "--config", os.path.join(os.path.dirname(__file__), "gunicorn_conf.py"),
           "--bind", f"{s.host}:{s.port}", "--workers", str(s.workers), "--threads", str(s.threads),
           "--log-level", s.log_level.lower(), "backend.server:create_app()"]
    os.execv(sys.executable, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
