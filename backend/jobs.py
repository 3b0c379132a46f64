"""Work that outlives a request: webhook events, settings confirmations and background pre-labels.

Webhooks. Label Studio waits 1 s for a webhook (``WEBHOOK_TIMEOUT``) and anyone who can reach the
port can post one, so ``/webhook`` only queues a notice (action + annotation id) and answers. A
worker thread then reads the annotation, its project and its task back from Label Studio's API
with the backend's key (never in a way that makes Label Studio predict: :mod:`backend.ls_client`)
and applies the reference rules to *that* copy; an annotation Label Studio does not confirm
changes nothing and is logged. A second delivery of the same event finds the same annotation
version and is skipped. A ``/setup``'s extra params are confirmed the same way, against the
project's ML backends as Label Studio holds them.

Pre-labeling. Label Studio's "Retrieve predictions" sends every selected task in one ``/predict``
call and gives up after 100 s (``ML_TIMEOUT_PREDICT``). ``/predict`` answers what it finished
within ``SMARTSAM_PREDICT_BUDGET`` and hands the rest here: a worker runs each task through the
same pre-labeling path and writes the predictions back through Label Studio's API in batches,
one per task and model version (a task that already has one, from Label Studio or an earlier
press of the button, is skipped). ``state()`` is shown by ``/health`` and ``/admin/jobs``.

Both queues live in the database (:mod:`backend.work_queue`): an event answered 201 and a task
handed to the background are worked after a crash and a restart (``recovered`` in the state), and
with a shared database every replica's worker takes tasks from the one queue. A database that
goes away stops nothing: the workers wait and go on when it is back.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

from .config import AgentSettings
from .engine import Engine
from .errors import ImageFetchError, RequestError, SettingsError
from .label_config import LabelConfig
from .reference_rules import ReferenceRules
from .db import DatabaseUnavailable
from .work_queue import WorkQueue

log = logging.getLogger("smartsam.jobs")

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETED = "ANNOTATIONS_DELETED"
SETUP = "SETUP"  # our own: confirm a /setup's extra params with Label Studio

# (project, task, label_config) -> the task's prediction, or None when it cannot be pre-labeled
PredictTask = Callable[[str, Dict, str], Tuple[Optional[Dict], List[str]]]


class Jobs:
    """Two queues, one worker thread each (events never wait behind a long pre-labeling queue).

    Args:
        engine: the process's :class:`~backend.engine.Engine` (models, client, stores).
        rules: the reference rules applied to confirmed annotations.
        predict_task: pre-labels one task (the protocol adapter's path, injected by the
            composition root so that this module does not import it).
        max_events: queued notices beyond this are refused (the sender gets 503).
        write_batch: predictions per write to Label Studio.
        settings_retry_s: a /setup's params not yet held by Label Studio are read again once
            after this long (Label Studio checks /setup before it saves a new connection).
    """

    def __init__(self, engine: Engine, rules: ReferenceRules, predict_task: PredictTask, max_events: int = 1000,
                 write_batch: int = 10, settings_retry_s: float = 1.0) -> None:
        self.engine = engine
        self.client = engine.client
        self.rules = rules
        self.predict_task = predict_task
        self.write_batch = int(write_batch)
        self.settings_retry_s = float(settings_retry_s)
        self.max_events = int(max_events)
        self._events: "queue.Queue[Tuple[int, str, int, Optional[str]]]" = queue.Queue()
        s = engine.settings
        self.durable = WorkQueue(s.data_dir / "jobs.db", s.database_url, s.queue_lease)
        self._lock = threading.Lock()
        self._busy = {"events": 0, "prelabel": 0}  # items taken off a queue and not finished
        self._idle = threading.Condition(self._lock)
        self._new_tasks = threading.Event()  # set by submit(): the worker need not wait for its poll
        self.poll_s = 1.0  # how often an idle worker looks for tasks another replica queued
        self.events = {"queued": 0, "applied": 0, "duplicates": 0, "rejected": 0, "failed": 0, "recovered": 0}
        self.prelabel = {"queued": 0, "done": 0, "failed": 0, "written": 0, "skipped_existing": 0, "recovered": 0}
        self._recent: "deque[float]" = deque(maxlen=50)
        self.last_errors: "deque[str]" = deque(maxlen=10)
        self._started = False
        self._waiting_cache = (0.0, 0)  # (when, count): /health reads the shared count at most once a second
        # annotation versions whose failed application could not be un-recorded (the database went
        # away meanwhile): un-recorded before the next try, so the event's retry applies it
        self._unrecord: set = set()

    def start(self) -> None:
        """Take up what a crash or a stop left on disk, then start the two workers (the composition
        root calls this once everything the workers use is built)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            # what a crash or a stop left, in the order it came: this host's dead processes' rows
            # at once, other replicas' when their leases run out (the lease loop)
            self.prelabel["recovered"] += self.durable.take_over()["prelabel"]
            self._claim_orphans()
        threading.Thread(target=self._event_loop, name="smartsam-events", daemon=True).start()
        threading.Thread(target=self._prelabel_loop, name="smartsam-prelabel", daemon=True).start()
        threading.Thread(target=self._lease_loop, name="smartsam-leases", daemon=True).start()

    def _claim_orphans(self) -> None:
        """Take up the notices whose process is gone (their lease ran out)."""
        for item in self.durable.claim_events():
            self._events.put(item)
            self.events["recovered"] += 1

    def _lease_loop(self) -> None:
        """Every third of the lease: renew this process's claims, take up orphaned notices."""
        while True:
            time.sleep(self.durable.lease_s / 3)
            try:
                self.durable.renew()
                with self._lock:
                    self._claim_orphans()
            except Exception as e:  # the database is away: the claims lapse, other replicas take them
                log.warning("work queue: leases not renewed (%s)", e)

    # -- state -----------------------------------------------------------------------------
    def state(self) -> Dict:
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._recent if now - t < 120]
            rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
            waiting = self._waiting_tasks()
            return {"events": {**self.events, "waiting": self._events.qsize() + self._busy["events"]},
                    "prelabel": {**self.prelabel, "waiting": waiting, "tasks_per_s": round(rate, 3)},
                    "last_errors": list(self.last_errors)}

    def _waiting_tasks(self) -> Optional[int]:
        """Tasks in the shared queue (every replica's), read at most once a second; None when
        the database does not answer."""
        when, n = self._waiting_cache
        if time.monotonic() - when > 1.0:
            try:
                n = self.durable.waiting_tasks()
            except DatabaseUnavailable:
                return None
            self._waiting_cache = (time.monotonic(), n)
        return n

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no event is queued or being applied and the shared pre-labeling queue is
        empty (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._events.qsize() or self._busy["events"] or self.durable.waiting_tasks():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
            return True

    # -- webhook events --------------------------------------------------------------------
    def notify(self, action: str, annotation_id: int, claimed_project: Optional[str] = None) -> bool:
        """Queue a webhook's notice (on disk when this returns). False when the queue is full."""
        with self._lock:
            if self._events.qsize() >= self.max_events:
                return False
            try:
                row = self.durable.add_event(action, int(annotation_id), claimed_project)
            except DatabaseUnavailable as e:  # not kept, so not accepted: the sender hears 503
                self.last_errors.append(f"webhook {action} {annotation_id} refused: {e}")
                return False
            self._events.put((row, action, int(annotation_id), claimed_project))
            self.events["queued"] += 1
        return True

    def confirm_settings(self, project: str, claimed: Dict) -> bool:
        """Queue the check of a /setup's extra params against Label Studio (nothing is queued when
        they are the ones in force)."""
        try:
            if self.engine.project_settings.get(project) == claimed:
                return True
        except DatabaseUnavailable:
            pass
        return self.notify(SETUP, int(project), json.dumps(claimed, sort_keys=True))

    def _event_loop(self) -> None:
        while True:
            item = self._events.get()
            with self._lock:
                self._busy["events"] += 1
            row, action, aid, claimed = item
            retry = False
            try:
                outcome = self.apply_event(action, aid, claimed)
                key = {"applied": "applied", "duplicate": "duplicates", "rejected": "rejected"}[outcome]
            except DatabaseUnavailable as e:  # kept in the queue and tried again when it is back
                log.warning("webhook %s annotation %s waits for the database (%s)", action, aid, e)
                self._error(f"webhook {action} annotation {aid}: {e}; retried")
                key, retry = "failed", True
            except Exception as e:  # one bad event never stops the worker
                log.exception("webhook %s annotation %s failed", action, aid)
                self._error(f"webhook {action} annotation {aid}: {type(e).__name__}: {e}")
                key = "failed"
            if not retry:
                try:
                    self.durable.event_done(row)
                except Exception as e:  # the database: the event is applied again later (a duplicate, skipped)
                    log.error("webhook %s annotation %s: could not clear it from the queue (%s)", action, aid, e)
            with self._idle:
                if not retry:
                    self.events[key] += 1
                self._busy["events"] -= 1
                self._idle.notify_all()
            self._events.task_done()
            if retry:
                time.sleep(self.poll_s)
                self._events.put(item)

    def apply_event(self, action: str, aid: int, claimed: Optional[str] = None) -> str:
        """Read annotation ``aid`` back from Label Studio and apply the reference rules to it.
        Returns "applied", "duplicate" or "rejected" (Label Studio does not confirm it)."""
        if not self.client.configured:
            log.warning("webhook %s %s ignored: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to confirm it "
                        "with Label Studio", action, aid)
            self._error(f"{action} {aid}: cannot confirm with Label Studio (set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
            return "rejected"
        if action == DELETED:
            return self._apply_deletion(aid)
        if action == SETUP:
            return self._apply_settings(str(aid), json.loads(claimed or "{}"))
        c = self.client
        try:
            ann = c.annotation(aid)
            pid = ann.get("project")
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise ValueError("Label Studio's annotation names no project")
            project = c.project(pid)
            task = c.task(pid, int(ann["task"]))
        except (ImageFetchError, KeyError, TypeError, ValueError) as e:
            log.warning("webhook %s: annotation %s not confirmed by Label Studio (%s): nothing changed", action, aid, e)
            self._error(f"annotation {aid} not confirmed by Label Studio: {e}")
            return "rejected"
        proj = str(pid)
        if claimed is not None and claimed != proj:
            log.warning("webhook %s: the payload names project %s, Label Studio says annotation %s is in project %s; "
                        "using Label Studio's", action, claimed, aid, proj)
        version = (aid, str(ann.get("updated_at")), action == "ANNOTATION_UPDATED")
        for v in list(self._unrecord):
            self.durable.forget_application(*v)
            self._unrecord.discard(v)
        # one application per annotation version, whichever process or replica gets it first
        if not self.durable.first_application(*version):
            return "duplicate"
        try:
            cfg = LabelConfig.parse(project.get("label_config"))
            out = self.rules.apply(ann, task, proj, action, cfg)
        except (RequestError, ImageFetchError, ValueError) as e:
            self._unrecord_application(version)  # not applied: a later delivery may apply it
            log.warning("webhook %s annotation %s: %s", action, aid, e)
            self._error(f"annotation {aid}: {e}")
            return "rejected"
        except BaseException:
            self._unrecord_application(version)
            raise
        try:
            out["statistics"] = len(self.rules.observe(ann, task, proj, cfg))
        except Exception as e:  # statistics never block the reference rules
            log.warning("annotation %s: field statistics not updated (%s)", aid, e)
        log.info("webhook %s annotation %s (project %s, task %s): references set %s", action, aid, proj, task.get("id"),
                 out.get("reference"))
        return "applied"

    def _unrecord_application(self, version) -> None:
        try:
            self.durable.forget_application(*version)
        except DatabaseUnavailable:
            self._unrecord.add(version)

    def _apply_deletion(self, aid: int) -> str:
        """A deletion counts only when Label Studio answers 404 for the annotation."""
        try:
            self.client.annotation(aid)
        except ImageFetchError as e:
            if e.status != 404:
                log.warning("deletion of annotation %s not confirmed (%s): nothing changed", aid, e)
                self._error(f"deletion of annotation {aid} not confirmed by Label Studio: {e}")
                return "rejected"
        else:
            log.warning("webhook says annotation %s was deleted, Label Studio still has it: nothing changed", aid)
            self._error(f"annotation {aid}: deletion not confirmed (Label Studio still has it)")
            return "rejected"
        # each reference it set falls back to the version before it (or none)
        gone = self.engine.store.withdraw_annotation(aid, "annotation deleted in Label Studio")
        self.engine.stats.forget(aid)
        log.info("annotation %s deleted in Label Studio: references withdrawn %s", aid,
                 sorted({(m.project, m.label) for m in gone}))
        return "applied"

    def _apply_settings(self, project: str, claimed: Dict) -> str:
        """A /setup's extra params count once Label Studio holds them for one of the project's
        ML backends."""
        for attempt in range(2):
            try:
                held = [m.get("extra_params") or {} for m in self.client.ml_backends(int(project))]
            except ImageFetchError as e:
                self._error(f"project {project}: extra params not confirmed ({e})")
                return "rejected"
            if claimed in held:
                try:
                    AgentSettings().with_extra_params(claimed)
                except SettingsError as e:
                    self._error(f"project {project}: extra params refused ({e})")
                    return "rejected"
                if self.engine.project_settings.set(project, claimed):
                    log.info("project %s: agent settings %s (confirmed with Label Studio)", project, claimed)
                return "applied"
            if attempt == 0:
                time.sleep(self.settings_retry_s)  # a new connection: Label Studio saves it right after /setup
        log.warning("project %s: /setup sent extra params %s that Label Studio does not hold: not used", project, claimed)
        self._error(f"project {project}: extra params {claimed} not confirmed by Label Studio")
        return "rejected"

    # -- background pre-labeling -----------------------------------------------------------
    def pending(self, project: str, task_id) -> bool:
        """Whether the task waits in the shared queue or is being worked (by any replica)."""
        try:
            return self.durable.has_task(project, task_id)
        except DatabaseUnavailable:
            return False

    def submit(self, project: str, tasks: List[Dict], label_config: str) -> int:
        """Queue tasks for background pre-labeling (committed when this returns); returns how
        many were new to the queue."""
        fresh = [t for t in tasks if isinstance(t.get("id"), int) and not isinstance(t.get("id"), bool)]
        try:
            added = self.durable.add_tasks(project, fresh, label_config)
        except DatabaseUnavailable as e:
            self._error(f"{len(fresh)} tasks not queued: {e}")
            raise RequestError(f"{e}: {len(fresh)} tasks past the budget were not queued; press Retrieve "
                               f"predictions again when it is back") from None
        with self._lock:
            self.prelabel["queued"] += len(added)
        self._new_tasks.set()
        return len(added)

    def _prelabel_loop(self) -> None:
        """Claim a task from the shared queue, predict it, write predictions in batches; idle, look
        again every ``poll_s`` (another replica may have queued some) or when this one queues."""
        batch: List[Dict] = []
        while True:
            try:
                item = self.durable.claim_task()
            except Exception as e:  # the database is away: what is claimed is written, then wait
                self._error(f"pre-labeling queue: {e}")
                item = None
            if item is None:
                if batch:
                    self._flush(batch)
                    continue
                self._new_tasks.wait(self.poll_s)
                self._new_tasks.clear()
                continue
            project, task, label_config = item
            with self._lock:
                self._busy["prelabel"] += 1
            try:
                pred = self._predict(project, task, label_config)
                if pred is not None:
                    batch.append(pred)
                else:
                    self._done(project, task.get("id"))
                if len(batch) >= self.write_batch:
                    self._flush(batch)
            except Exception as e:  # the worker never dies
                log.exception("background pre-label of task %s failed", task.get("id"))
                self._error(f"task {task.get('id')}: {type(e).__name__}: {e}")
                self._done(project, task.get("id"))
            finally:
                with self._lock:
                    self._busy["prelabel"] -= 1

    def _done(self, project: str, task_id) -> None:
        # a task stays queued until its prediction is written: a second press of the button
        # meanwhile must not queue it again
        try:
            self.durable.task_done(project, task_id)
        except Exception as e:  # the database: the task runs again later (then skipped at write)
            log.error("task %s: could not clear it from the queue (%s)", task_id, e)
        with self._idle:
            self._idle.notify_all()

    def _predict(self, project: str, task: Dict, label_config: str) -> Optional[Dict]:
        try:
            pred, errors = self.predict_task(project, task, label_config)
        except (RequestError, ImageFetchError, ValueError) as e:
            pred, errors = None, [str(e)]
        with self._lock:
            self._recent.append(time.monotonic())
            if pred:
                self.prelabel["done"] += 1
            else:
                self.prelabel["failed"] += 1
        if not pred:
            self._error(f"task {task.get('id')}: {'; '.join(errors) or 'no prediction'}")
            return None
        return {"task": task["id"], "project": project, "result": pred["result"], "score": pred.get("score"),
                "model_version": pred["model_version"]}

    def _flush(self, batch: List[Dict]) -> None:
        """Write predictions to Label Studio, skipping tasks that already have this model version's."""
        keys = [(p["project"], p["task"]) for p in batch]
        todo = []
        for p in batch:
            try:
                if any(x.get("model_version") == p["model_version"] for x in self.client.predictions(p["task"])):
                    with self._lock:
                        self.prelabel["skipped_existing"] += 1
                    continue
            except ImageFetchError as e:
                self._error(f"task {p['task']}: cannot check its predictions ({e})")
            todo.append(p)
        by_project: Dict[str, List[Dict]] = {}
        for p in todo:
            by_project.setdefault(p["project"], []).append({k: v for k, v in p.items() if k != "project"})
        for project, preds in by_project.items():
            try:
                self.client.import_predictions(int(project), preds)
                with self._lock:
                    self.prelabel["written"] += len(preds)
            except (ImageFetchError, ValueError) as e:
                log.error("project %s: writing %d predictions failed: %s", project, len(preds), e)
                self._error(f"project {project}: writing {len(preds)} predictions failed: {e}")
        for key in keys:
            self._done(*key)
        batch.clear()

    def _error(self, msg: str) -> None:
        with self._lock:
            self.last_errors.append(msg)
