"""The composition root: settings -> stores, Label Studio client, models, answers, background
workers -> the WSGI app (:mod:`backend.web.app`); and the launcher.

``python -m backend.server`` (``run.sh``, ``make run``) reads :class:`Settings` from the
environment once, checks the weights and the reference store in the parent (a file check or
download, no CUDA), plans the compute threads (:mod:`backend.serving.threads`), and execs gunicorn
with the workers and threads those settings give; each gunicorn worker builds the app with
:func:`create_app` (no preload: the model and CUDA are created after fork).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from backend.background.reference_rules import ReferenceRules
from backend.background.workers import Workers
from backend.config import Settings
from backend.errors import RequestError, SettingsError
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import LabelConfig
from backend.serving.answers import Answers, RequestContext
from backend.serving.models import Models
from backend.serving.prefetch import Prefetcher
from backend.serving.threads import ThreadGovernor, apply_in_worker, usable_cores
from backend.serving.threads import plan as thread_plan
from backend.serving.versions import Versions
from backend.store.db import DatabaseUnavailable
from backend.store.field_stats import FieldStats
from backend.store.project_settings import ProjectSettings
from backend.store.references import ReferenceStore
from backend.web.app import App
from backend.web.protocol import SmartSAMBackend

log = logging.getLogger("smartsam.http")


def open_stores(s: Settings) -> Tuple[ReferenceStore, ProjectSettings, FieldStats]:
    """The stores: SQLite files under ``SMARTSAM_DATA_DIR``, or the shared PostgreSQL."""
    return (ReferenceStore(s.data_dir, exemplars=s.exemplars, database_url=s.database_url),
            ProjectSettings(s.data_dir, s.database_url), FieldStats(s.data_dir, s.stats_max, s.database_url))


class Services:
    """Everything one process serves with, built here from one :class:`Settings` and passed down:
    the stores, the Label Studio client and image fetcher, the models and their scheduler, the
    projects' versions, the answers, the reference rules, the background workers and prefetch.

    Args:
        settings: read once by the caller (:meth:`Settings.from_env` for the service).
        load: start loading the models in the background now.
    """

    def __init__(self, settings: Settings, load: bool = True) -> None:
        s = self.settings = settings
        self.store, self.project_settings, self.stats = open_stores(s)
        # Label Studio
        self.client = LabelStudioClient(s)
        self.fetcher = ImageFetcher(s, self.client)
        # the models: the worker's compute threads follow the free cores (SMARTSAM_WAIT_POLICY=adaptive)
        # once the launcher has planned them (SMARTSAM_TORCH_THREADS); in-process uses keep torch's own
        self.governor = (ThreadGovernor(s.torch_threads, usable_cores())
                         if s.wait_policy == "adaptive" and s.torch_threads else None)
        self.models = Models(s, governor=self.governor, on_loaded=self._see_version)
        self.versions = Versions(s, self.models, self.store, self.project_settings, self.stats)
        # how many exemplars a label keeps: the project's confirmed setting, read from its own table
        # (not through Versions, whose read of the project lists the references with it)
        self.store.exemplars_for = lambda project: self.project_settings.agent(s.agent, project).exemplars
        # what the projects' answers depend on and is kept elsewhere moves their generation too
        self.project_settings.on_change = self.store.bump
        self.stats.on_decisions = self.store.bump
        # what serves requests and works in the background
        self.answers = Answers(s, self.models, self.versions, self.fetcher, self.stats)
        self.rules = ReferenceRules(s, self.models, self.store, self.stats, self.answers.image)
        self.workers = Workers(s, self.client, self.versions, self.store, self.project_settings, self.stats, self.rules,
                               self.prelabel_task)
        self.prefetch = Prefetcher(s, self.models, self.client, self.store, self.answers.image, s.prefetch)
        # what the monitor saw last (health answers from these, never asking the database itself)
        self._db_seen: Dict = {"ok": None, "at": None, "error": None}
        self.workers.start()  # its workers call back into what is built above
        threading.Thread(target=self._monitor, name="smartsam-monitor", daemon=True).start()
        threading.Thread(target=self._collect_garbage, name="smartsam-gc", daemon=True).start()
        if self.governor is not None:
            threading.Thread(target=self.governor.run, name="smartsam-threads", daemon=True).start()
        if load:
            self.models.start_loading()

    def _collect_garbage(self) -> None:
        try:  # blobs no version names (e.g. copied from an earlier release's files)
            n = self.store.collect_garbage()
            if n:
                log.info("reference store: removed %d unused blobs", n)
        except (OSError, DatabaseUnavailable) as e:
            log.warning("reference store garbage collection failed: %s", e)

    def _monitor(self) -> None:
        """Every second: the database's state and the queue's counts, read here so that no
        request ever waits for them (``/admin/health`` shows them with their age)."""
        while True:
            for probe in (self._probe_database, self.workers.refresh_view):
                try:
                    probe()
                except Exception:  # a probe never stops the others
                    log.exception("monitor: %s failed", getattr(probe, "__name__", probe))
            time.sleep(1.0)

    def _probe_database(self) -> None:
        """Ask the database a short query now (the monitor thread; never a request)."""
        try:
            self.store.db.ping()
            self._db_seen = {"ok": True, "at": time.monotonic(), "error": None}
        except DatabaseUnavailable as e:
            self._db_seen = {"ok": False, "at": time.monotonic(), "error": str(e)}

    def _see_version(self) -> None:
        # the weights' digest (Versions caches it), on the loading thread before the backbone is
        # published: health names the version from the moment it says the weights are loaded,
        # and no request ever hashes a checkpoint
        self.versions.checkpoint_tag()

    def health(self) -> Dict:
        """The database, the statistics and the model version as last seen (``/admin/health``)."""
        db, seen = self.store.db, self._db_seen
        database = {"engine": db.dialect, "url": db.where(), "ok": seen["ok"],
                    "age_s": None if seen["at"] is None else round(time.monotonic() - seen["at"], 1)}
        if seen["error"]:
            database["error"] = f"{seen['error']}: clicks answer without references until it is back"
        version = self.versions.base_version() if self.models.backbone is not None else None
        return {"model_version": version, "database": database,
                "statistics": {"waiting": self.stats.pending, "dropped": self.stats.dropped, "lost": self.stats.lost}}

    def backend(self, label_config) -> SmartSAMBackend:
        """The protocol adapter for one labeling config (RequestError when SmartSAM cannot use it)."""
        if not isinstance(label_config, str) or not label_config.strip():
            raise RequestError("the request has no label_config")
        return SmartSAMBackend(label_config=label_config, answers=self.answers, pending=self.workers.pending,
                               submit=self.workers.submit, on_click=self.prefetch.on_click)

    def prelabel_task(self, project: str, task: Dict, label_config: str) -> Dict:
        """One task through the pre-labeling path (the background queue's worker): the prediction,
        or the reason there is none as an exception (RequestError: nothing to label; an
        ImageFetchError or DatabaseUnavailable that may pass, which the queue tries again)."""
        deadline = time.monotonic() + self.settings.request_timeout
        ctx = RequestContext.build(self.versions, project, LabelConfig.parse(label_config), deadline, strict=True)
        return self.answers.prelabel(task, ctx)

    def close(self) -> None:
        """At shutdown: write the queued field statistics (no row is lost)."""
        self.prefetch.close()
        self.stats.close()


# -- the process --------------------------------------------------------------------------
_services: Optional[Services] = None


def create_app(settings: Optional[Settings] = None) -> App:
    """The WSGI app of this process (gunicorn: ``backend.server:create_app()``): settings from the
    environment unless given; the statistics are written out when the process exits."""
    global _services
    settings = settings or Settings.from_env()
    if settings.torch_threads:  # the launcher's plan (backend/serving/threads.py), applied after the fork
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

    from backend.store.references import ReferenceStore, ReferenceStoreError
    from smartsam.models import ModelError, ensure_checkpoint, ensure_concept_files, get_spec

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
