"""Work that outlives a request: webhook events, settings confirmations and background pre-labels.

Webhooks. Label Studio waits 1 s for a webhook (``WEBHOOK_TIMEOUT``), never sends one again, and
anyone who can reach the port can post one, so ``/webhook`` only records a notice (action,
annotation id, who sent it) in the durable queue and answers. A worker thread then reads the
annotation, its project and its task back from Label Studio's API with the backend's key (never
in a way that makes Label Studio predict: :mod:`backend.labelstudio.client`) and applies the reference
rules to *that* copy. An annotation Label Studio says it does not have (404, 403) changes nothing
and is logged; one it cannot say anything about now (no answer, a timeout, a 5xx while it
restarts) is tried again later with backoff, across restarts (:class:`~backend.store.work_queue.RetryPolicy`).
A second delivery of the same event finds the same annotation version and is skipped. A
``/setup``'s extra params are confirmed the same way, against the project's ML backends as Label
Studio holds them.

Pre-labeling. Label Studio's "Retrieve predictions" sends every selected task in one ``/predict``
call and gives up after 100 s (``ML_TIMEOUT_PREDICT``). ``/predict`` answers what it finished
within ``SMARTSAM_PREDICT_BUDGET`` and hands the rest here: a worker runs each task through the
same pre-labeling path, keeps the prediction in the task's row, and writes the predictions back
through Label Studio's API in batches, one per task and model version (a task that already has
one, from Label Studio, an earlier press of the button or a write whose answer was lost, is not
written again). A task leaves the queue when Label Studio holds its prediction, or when it
cannot have one (no reference, its image or the task is gone); a failed write or image fetch is
tried again. ``state()`` is shown by ``/admin/health`` and ``/admin/jobs``; it never waits for
the database (the counts are the last ones read, with their age).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

from backend.background.reference_rules import ReferenceRules
from backend.config import AgentSettings, Settings
from backend.errors import Busy, ImageFetchError, QueueFull, Refused, RequestError, SettingsError
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.label_config import LabelConfig
from backend.serving.versions import Versions
from backend.store.db import DatabaseUnavailable
from backend.store.field_stats import FieldStats
from backend.store.project_settings import ProjectSettings
from backend.store.references import ReferenceStore
from backend.store.work_queue import Notice, QueuedTask, RetryPolicy, SenderFull, WorkQueue
from smartsam.agent import InvalidClick
from smartsam.io import ImageError

log = logging.getLogger("smartsam.jobs")

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETED = "ANNOTATIONS_DELETED"
SETUP = "SETUP"  # our own: confirm a /setup's extra params with Label Studio

# (project, task, label_config) -> the task's prediction; raises RequestError when the task cannot
# be pre-labeled (no reference, nothing found), ImageFetchError when its image cannot be had
PredictTask = Callable[[str, Dict, str], Dict]


class TryLater(Exception):
    """The work could not be done now for a reason that may pass (Label Studio or the database
    did not answer, the model is busy): the row is tried again after the retry policy's delay."""


class Workers:
    """Two workers, one for notices and one for pre-labeling tasks (notices never wait behind a
    long pre-labeling queue), over the durable :class:`~backend.store.work_queue.WorkQueue`.

    Args:
        settings: the backend's settings.
        client: the Label Studio client (annotations, tasks, predictions are read and written there).
        versions: the projects' model versions (a kept prediction is written while it is current).
        store: the reference store (a deletion withdraws what the annotation set).
        project_settings: the projects' confirmed extra params.
        stats: the field statistics (a deleted annotation's outcomes are forgotten).
        rules: the reference rules applied to confirmed annotations.
        predict_task: pre-labels one task (the answers' path, injected by the composition root).
        max_events: notices one sender may have waiting (its further ones get 503).
        write_batch: predictions per write to Label Studio.
        settings_retry_s: a /setup's params not yet held by Label Studio are read again once
            after this long (Label Studio checks /setup before it saves a new connection).
        retry: when failed notices and tasks are tried again and given up.
    """

    def __init__(self, settings: Settings, client: LabelStudioClient, versions: Versions, store: ReferenceStore,
                 project_settings: ProjectSettings, stats: FieldStats, rules: ReferenceRules, predict_task: PredictTask,
                 max_events: int = 1000, write_batch: int = 10, settings_retry_s: float = 1.0,
                 retry: Optional[RetryPolicy] = None) -> None:
        self.client = client
        self.versions = versions
        self.store = store
        self.project_settings = project_settings
        self.stats = stats
        self.rules = rules
        self.predict_task = predict_task
        self.write_batch = int(write_batch)
        self.settings_retry_s = float(settings_retry_s)
        s = settings
        self.retry = retry or RetryPolicy(max_delay=s.retry_max_delay, give_up_after=s.retry_for)
        self.durable = WorkQueue(s.data_dir / "jobs.db", s.database_url, s.queue_lease, self.retry, max_events)
        # counters only: never held while the database or Label Studio is asked anything
        self._lock = threading.Lock()
        self._busy = {"events": 0, "prelabel": 0}  # items being worked now
        self._idle = threading.Condition(self._lock)
        self._new_event = threading.Event()  # set by notify(): the worker need not wait for its poll
        self._new_tasks = threading.Event()  # set by submit()
        self.poll_s = 1.0  # how often an idle worker looks for work another replica queued or that is due
        self.events = {"queued": 0, "merged": 0, "spooled": 0, "refused": 0, "applied": 0, "duplicates": 0,
                       "rejected": 0, "retried": 0, "given_up": 0, "recovered": 0, "spool_dropped": 0}
        self.prelabel = {"queued": 0, "done": 0, "failed": 0, "written": 0, "skipped_existing": 0, "retried": 0,
                         "given_up": 0, "recovered": 0}
        self._recent: "deque[float]" = deque(maxlen=50)
        self.last_errors: "deque[str]" = deque(maxlen=10)
        self._started = False
        self._last_sender: Optional[str] = None
        self._held: Dict[int, QueuedTask] = {}
        self._prelabel_thread: Optional[threading.Thread] = None  # tasks the pre-labeling worker claimed and has not finished (seq)
        # what the database said last (the monitor thread reads it; state() never waits for it)
        self._view: Dict = {"at": None, "counts": None, "spooled": 0, "error": None}

    def start(self) -> None:
        """Take up what a crash or a stop left, then start the workers (the composition root
        calls this once everything the workers use is built)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            # this host's dead processes' rows at once; other replicas' when their leases run out
            n = self.durable.take_over()
            with self._lock:
                self.prelabel["recovered"] += n["prelabel"]
                self.events["recovered"] += n["events"]
        except DatabaseUnavailable as e:  # their leases lapse meanwhile: the workers take them then
            log.warning("work queue: nothing taken over at start (%s)", e)
        threads = {name: threading.Thread(target=target, name=f"smartsam-{name}", daemon=True)
                   for target, name in ((self._event_loop, "events"), (self._prelabel_loop, "prelabel"),
                                        (self._lease_loop, "leases"))}
        self._prelabel_thread = threads["prelabel"]
        for t in threads.values():
            t.start()

    def _lease_loop(self) -> None:
        """Every third of the lease: renew this process's claims (the tasks only while the
        pre-labeling worker lives); forget the tasks another process took over meanwhile."""
        while True:
            time.sleep(self.durable.lease_s / 3)
            try:
                alive = self._prelabel_thread is not None and self._prelabel_thread.is_alive()
                for seq in self.durable.renew(list(self._held) if alive else []):
                    self._held.pop(seq, None)
            except Exception as e:  # the database is away: the claims lapse, other replicas take them
                log.warning("work queue: leases not renewed (%s)", e)

    def refresh_view(self) -> None:
        """Read the queue's counts now (the composition root's monitor, every second), so that
        :meth:`state` never asks the database."""
        spooled = self.durable.spooled()  # a local file: answers while the shared database is away
        with self._lock:  # shown at once: the counts below may take up to the database's reply bound
            self._view = dict(self._view, spooled=spooled)
        try:
            view = {"at": time.monotonic(), "counts": self.durable.counts(), "spooled": spooled, "error": None}
        except Exception as e:
            view = dict(self._view, spooled=spooled, error=str(e))
        with self._lock:
            self._view = view

    def _seen(self, table: str, delta: int) -> None:
        """This process queued or finished rows since the counts were read: the view follows at
        once (the next read corrects what other replicas did)."""
        with self._lock:
            c = (self._view["counts"] or {}).get(table)
            if c is not None:
                c["waiting"] = max(0, c["waiting"] + delta)

    # -- state -----------------------------------------------------------------------------
    def state(self) -> Dict:
        """Counters of this process and the queue's counts as last read (every replica's rows),
        with their age in seconds; never waits for the database."""
        with self._lock:
            view = self._view
            counts = view["counts"] or {}
            age = None if view["at"] is None else round(time.monotonic() - view["at"], 1)
            now = time.monotonic()
            recent = [t for t in self._recent if now - t < 120]
            rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
            ev = counts.get("events", {})
            tasks = counts.get("prelabel", {})
            return {"events": {**self.events, "waiting": ev.get("waiting"), "retrying": ev.get("retrying"),
                               "given_up_total": ev.get("given_up"), "working": self._busy["events"]},
                    "prelabel": {**self.prelabel, "waiting": tasks.get("waiting"), "retrying": tasks.get("retrying"),
                                 "given_up_total": tasks.get("given_up"), "working": self._busy["prelabel"],
                                 "tasks_per_s": round(rate, 3)},
                    "spooled": view["spooled"], "counts_age_s": age, "database_error": view["error"],
                    "last_errors": list(self.last_errors)}

    def troubled(self) -> Dict:
        """What failed at least once, with its reasons (the admin page; reads the database)."""
        return self.durable.troubled()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no notice or task waits (given-up ones aside) and none is being worked
        (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                idle = not self.durable.waiting_events() and not self.durable.waiting_tasks() and not self.durable.spooled()
            except DatabaseUnavailable:
                idle = False
            with self._lock:
                if idle and not self._busy["events"] and not self._busy["prelabel"]:
                    return True
            time.sleep(0.2)
        return False

    # -- webhook events --------------------------------------------------------------------
    def notify(self, action: str, annotation_id: int, claimed_project: Optional[str] = None, sender: str = "") -> str:
        """Record a webhook's notice (on disk when this returns): "queued", "merged" (into a
        notice for the same annotation that has not started) or "spooled" (the shared database
        is away). Refused when ``sender`` has too many notices waiting or nothing can keep it."""
        try:
            how = self.durable.add_event(action, int(annotation_id), claimed_project, sender)
        except SenderFull:
            self._count(self.events, "refused")
            raise Refused(f"{self.durable.max_per_sender} webhook events from this sender are waiting; later ones are "
                          f"refused until they are worked") from None
        except DatabaseUnavailable as e:  # not kept, so not accepted: the sender hears 503
            self._count(self.events, "refused")
            self._error(f"webhook {action} {annotation_id} refused: {e}")
            raise Refused(f"webhook not kept: {e}") from None
        self._count(self.events, how)
        if how == "queued":
            self._seen("events", +1)
        self._new_event.set()
        return how

    def confirm_settings(self, project: str, claimed: Dict, sender: str = "") -> None:
        """Queue the check of a /setup's extra params against Label Studio (nothing is queued when
        they are the ones in force)."""
        try:
            if self.project_settings.get(project) == claimed:
                return
        except DatabaseUnavailable:
            pass
        self.notify(SETUP, int(project), json.dumps(claimed, sort_keys=True), sender)

    def _event_loop(self) -> None:
        while True:
            try:
                self._drain_spool()
            except Exception as e:  # the database is still away: the spool waits, the queue may answer
                self._error(f"spool: {e}")
            try:
                notice = self.durable.claim_event(self._last_sender)
            except Exception as e:  # the database is away: try again at the next poll
                self._error(f"webhook queue: {e}")
                notice = None
            if notice is None:
                self._new_event.wait(self.poll_s)
                self._new_event.clear()
                continue
            self._last_sender = notice.sender
            self._work_event(notice)

    def _drain_spool(self) -> None:
        if self.durable.spool is not None and self.durable.spooled():
            moved = self.durable.drain_spool()
            self._count(self.events, "spool_dropped", moved["dropped"])
            if any(moved.values()):
                log.info("work queue: moved %s from the spool into the shared database", moved)
                self._new_tasks.set()

    def _work_event(self, n: Notice) -> None:
        with self._lock:
            self._busy["events"] += 1
        try:
            outcome, reason, unexpected = None, None, False
            try:
                outcome = self.apply_event(n.action, n.annotation, n.claimed)
            except (TryLater, DatabaseUnavailable) as e:
                reason = str(e)
            except Exception as e:  # a bug, not an outage: tried a few times, then given up
                log.exception("webhook %s annotation %s failed", n.action, n.annotation)
                reason, unexpected = f"{type(e).__name__}: {e}", True
            try:
                if outcome is not None:
                    self.durable.event_done(n.row)
                    self._seen("events", -1)
                    self._count(self.events, {"applied": "applied", "duplicate": "duplicates",
                                              "rejected": "rejected"}[outcome])
                elif self.durable.event_failed(n, reason, unexpected):
                    log.warning("webhook %s annotation %s: %s; tried again later (attempt %d)", n.action, n.annotation,
                                reason, n.attempts + 1)
                    self._error(f"webhook {n.action} annotation {n.annotation}: {reason}; tried again later")
                    self._count(self.events, "retried")
                else:
                    log.error("webhook %s annotation %s: given up after %d attempts: %s", n.action, n.annotation,
                              n.attempts + 1, reason)
                    self._error(f"webhook {n.action} annotation {n.annotation}: given up: {reason}")
                    self._count(self.events, "given_up")
            except DatabaseUnavailable as e:  # the row stays: worked again once the database is back
                self._error(f"webhook {n.action} annotation {n.annotation}: {e}")
        finally:
            with self._idle:
                self._busy["events"] -= 1
                self._idle.notify_all()

    def apply_event(self, action: str, aid: int, claimed: Optional[str] = None) -> str:
        """Read annotation ``aid`` back from Label Studio and apply the reference rules to it.
        Returns "applied", "duplicate" or "rejected" (Label Studio does not confirm it); raises
        TryLater (or DatabaseUnavailable) when it cannot be told now."""
        if not self.client.configured:
            log.warning("webhook %s %s ignored: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to confirm it "
                        "with Label Studio", action, aid)
            self._error(f"{action} {aid}: cannot confirm with Label Studio (set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
            return "rejected"
        if action == DELETED:
            return self._apply_deletion(aid, claimed)
        if action == SETUP:
            return self._apply_settings(str(aid), json.loads(claimed or "{}"))
        c = self.client
        try:
            ann = c.annotation(aid)
            pid = ann.get("project") if isinstance(ann, dict) else None
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise ValueError("Label Studio's annotation names no project")
            project = c.project(pid)
            task = c.task(pid, int(ann["task"]))
        except ImageFetchError as e:
            if e.transient:
                raise TryLater(f"Label Studio did not confirm annotation {aid} now ({e})") from None
            return self._reject(action, aid, f"not confirmed by Label Studio ({e})")
        except (KeyError, TypeError, ValueError) as e:
            return self._reject(action, aid, f"not confirmed by Label Studio ({e})")
        proj = str(pid)
        if claimed is not None and claimed != proj:
            log.warning("webhook %s: the payload names project %s, Label Studio says annotation %s is in project %s; "
                        "using Label Studio's", action, claimed, aid, proj)
        # one application per annotation version, whichever process or replica gets it first; the
        # record is written after the rules ran (they are idempotent: a crash in between applies
        # the same version again and changes nothing twice)
        version = (aid, str(ann.get("updated_at")), action == "ANNOTATION_UPDATED")
        if self.durable.was_applied(*version):
            return "duplicate"
        try:
            cfg = LabelConfig.parse(project.get("label_config"))
            out = self.rules.apply(ann, task, proj, action, cfg)
        except ImageFetchError as e:
            if e.transient:
                raise TryLater(f"annotation {aid}: the task's image cannot be had now ({e})") from None
            return self._reject(action, aid, str(e))
        except (Busy, QueueFull) as e:  # the model loading or busy (Busy is a RequestError: first)
            raise TryLater(f"annotation {aid}: the model cannot compute its reference now ({e})") from None
        except (RequestError, ImageError) as e:
            return self._reject(action, aid, str(e))
        try:
            out["statistics"] = len(self.rules.observe(ann, task, proj, cfg))
        except Exception as e:  # statistics never block the reference rules
            log.warning("annotation %s: field statistics not updated (%s)", aid, e)
        if not self.durable.record_application(*version):
            return "duplicate"  # another replica applied the same version meanwhile (the same result)
        log.info("webhook %s annotation %s (project %s, task %s): references set %s", action, aid, proj, task.get("id"),
                 out.get("reference"))
        return "applied"

    def _reject(self, action: str, aid: int, why: str) -> str:
        log.warning("webhook %s annotation %s: %s: nothing changed", action, aid, why)
        self._error(f"annotation {aid}: {why}")
        return "rejected"

    def _apply_deletion(self, aid: int, claimed: Optional[str] = None) -> str:
        """A deletion counts only when Label Studio answers 404 for the annotation."""
        try:
            self.client.annotation(aid)
        except ImageFetchError as e:
            if e.status != 404:
                if e.transient:
                    raise TryLater(f"deletion of annotation {aid} not confirmed now ({e})") from None
                return self._reject(DELETED, aid, f"deletion not confirmed by Label Studio ({e})")
        else:
            return self._reject(DELETED, aid, "deletion not confirmed (Label Studio still has it)")
        # each reference it set falls back to the version before it (or none); done twice, the same
        gone = self.store.withdraw_annotation(aid, "annotation deleted in Label Studio")
        self.stats.forget(aid, claimed)
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
                if e.transient:
                    raise TryLater(f"project {project}: extra params not confirmed now ({e})") from None
                self._error(f"project {project}: extra params not confirmed ({e})")
                return "rejected"
            if claimed in held:
                try:
                    AgentSettings().with_extra_params(claimed)
                except SettingsError as e:
                    self._error(f"project {project}: extra params refused ({e})")
                    return "rejected"
                if self.project_settings.set(project, claimed):
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
        """Queue tasks for background pre-labeling (committed when this returns, in the shared
        queue or, while it is away, the spool); returns how many were new to the queue."""
        fresh = [t for t in tasks if isinstance(t, dict) and isinstance(t.get("id"), int) and not isinstance(t.get("id"), bool)]
        try:
            added = self.durable.add_tasks(project, fresh, label_config)
        except DatabaseUnavailable as e:
            self._error(f"{len(fresh)} tasks not queued: {e}")
            raise Refused(f"{e}: {len(fresh)} tasks past the budget were not queued; press Retrieve predictions again "
                          f"when it is back") from None
        self._count(self.prelabel, "queued", len(added))
        self._seen("prelabel", len(added))
        self._new_tasks.set()
        return len(added)

    def _prelabel_loop(self) -> None:
        """Claim a task from the shared queue, predict it, write predictions in batches; idle, look
        again every ``poll_s`` (another replica may have queued some, a retry may be due) or when
        this one queues. The worker never dies: whatever one step raises fails its tasks (tried
        again later) and the loop goes on."""
        batch: List[Tuple[QueuedTask, Dict]] = []
        while True:
            try:
                self._prelabel_step(batch)
            except Exception as e:
                log.exception("background pre-labeling step failed")
                for item, _ in batch:
                    try:
                        self._task_failed(item, f"{type(e).__name__}: {e}", unexpected=True)
                    except Exception:
                        self._held.pop(item.seq, None)  # its lease lapses: claimed again later
                batch.clear()
                time.sleep(self.poll_s)

    def _prelabel_step(self, batch: List[Tuple[QueuedTask, Dict]]) -> None:
        try:
            item = self.durable.claim_task()
        except DatabaseUnavailable as e:  # the database is away: what is claimed is written, then wait
            self._error(f"pre-labeling queue: {e}")
            item = None
        if item is None:
            if batch:
                self._flush(batch)
                return
            self._new_tasks.wait(self.poll_s)
            self._new_tasks.clear()
            return
        self._held[item.seq] = item
        with self._lock:
            self._busy["prelabel"] += 1
        try:
            pred = self._prediction(item)
            if pred is None:
                self._done(item)
            else:
                self.durable.keep_prediction(item.seq, pred)
                batch.append((item, pred))
        except (TryLater, DatabaseUnavailable) as e:
            self._task_failed(item, str(e))
        except Exception as e:  # a bug, not an outage: tried a few times, then given up
            log.exception("background pre-label of task %s failed", item.task.get("id"))
            self._task_failed(item, f"{type(e).__name__}: {e}", unexpected=True)
        finally:
            with self._idle:
                self._busy["prelabel"] -= 1
                self._idle.notify_all()
        if len(batch) >= self.write_batch:
            self._flush(batch)

    def _prediction(self, item: QueuedTask) -> Optional[Dict]:
        """The task's prediction to write: the one kept in its row while it is of the current
        model version, else a new one; None when the task cannot have one."""
        if item.prediction is not None and item.prediction["model_version"] == self.versions.model_version(item.project, strict=True):
            return item.prediction
        tid = item.task.get("id")
        try:
            pred = self.predict_task(item.project, item.task, item.label_config)
        except ImageFetchError as e:
            if e.transient:
                raise TryLater(f"task {tid}: its image cannot be had now ({e})") from None
            return self._no_prediction(tid, str(e))
        except (QueueFull, Busy) as e:
            raise TryLater(f"task {tid}: the model is busy ({e})") from None
        except (RequestError, ImageError, InvalidClick) as e:
            return self._no_prediction(tid, str(e))
        with self._lock:
            self._recent.append(time.monotonic())
            self.prelabel["done"] += 1
        return {"task": item.task["id"], "result": pred["result"], "score": pred.get("score"),
                "model_version": pred["model_version"]}

    def _no_prediction(self, tid, why: str) -> None:
        with self._lock:
            self._recent.append(time.monotonic())
            self.prelabel["failed"] += 1
        self._error(f"task {tid}: {why}")
        return None

    def _task_failed(self, item: QueuedTask, reason: str, unexpected: bool = False, min_delay: float = 0.0) -> None:
        tid = item.task.get("id")
        self._held.pop(item.seq, None)  # not renewed any more: if what follows cannot be written, it lapses
        try:
            again = self.durable.task_failed(item, reason, unexpected, min_delay)
        except DatabaseUnavailable as e:  # its lease lapses: it is worked again once the database is back
            self._error(f"task {tid}: {reason}; {e}")
            return
        if again:
            self._error(f"task {tid}: {reason}; tried again later")
            self._count(self.prelabel, "retried")
        else:
            log.error("task %s: given up after %d attempts: %s", tid, item.attempts + 1, reason)
            self._error(f"task {tid}: given up: {reason}")
            self._count(self.prelabel, "given_up")

    def _done(self, item: QueuedTask) -> None:
        self._held.pop(item.seq, None)
        try:
            self.durable.task_done(item.project, item.task["id"])
            self._seen("prelabel", -1)
        except DatabaseUnavailable as e:  # worked again later: its prediction is found in Label Studio then
            log.error("task %s: could not clear it from the queue (%s)", item.task.get("id"), e)
        with self._idle:
            self._idle.notify_all()

    def _flush(self, batch: List[Tuple[QueuedTask, Dict]]) -> None:
        """Write the batch's predictions to Label Studio: a task that already holds this model
        version's prediction, or one a write of it was tried with (its answer lost, the version
        changed since), is not written again; a task is done when Label Studio holds its
        prediction. Only tasks this process still holds are written."""
        todo: Dict[str, List[Tuple[QueuedTask, Dict]]] = {}
        for item, pred in batch:
            try:
                held = self.client.predictions(item.task["id"])
                tried = set(self.durable.attempted(item.seq)) | {pred["model_version"]}
            except ImageFetchError as e:
                if e.transient:  # unknown whether it holds one: ask again later, never write twice
                    self._task_failed(item, f"cannot check the task's predictions in Label Studio ({e})")
                    continue
                held, tried = [], {pred["model_version"]}
            if any(x.get("model_version") in tried for x in held):
                self._count(self.prelabel, "skipped_existing")
                self._done(item)
                continue
            todo.setdefault(item.project, []).append((item, pred))
        batch.clear()
        for project, items in todo.items():
            self._write(project, items)

    def _write(self, project: str, items: List[Tuple[QueuedTask, Dict]]) -> None:
        mine = set(self.durable.writing([item.seq for item, _ in items], items[0][1]["model_version"]))
        for item, _ in items:
            if item.seq not in mine:  # its claim lapsed and another process took it: that one writes it
                self._held.pop(item.seq, None)
        items = [(item, pred) for item, pred in items if item.seq in mine]
        if not items:
            return
        try:
            self.client.import_predictions(int(project), [pred for _, pred in items])
        except ImageFetchError as e:
            if e.transient:
                # Label Studio may still commit what timed out: look for it only after the write's
                # own time limit has passed, never sooner (a second write would be a second prediction)
                for item, _ in items:
                    self._task_failed(item, f"writing its prediction to Label Studio failed ({e})",
                                      min_delay=self.client.post_timeout + 5.0)
                return
            if len(items) > 1:  # refused: find the task Label Studio refuses, write the others
                for one in items:
                    self._write(project, [one])
                return
            log.error("project %s task %s: Label Studio refused its prediction: %s", project, items[0][0].task["id"], e)
            self._no_prediction(items[0][0].task["id"], f"Label Studio refused its prediction ({e})")
            self._done(items[0][0])
            return
        self._count(self.prelabel, "written", len(items))
        for item, _ in items:
            self._done(item)

    def _count(self, counters: Dict[str, int], key: str, n: int = 1) -> None:
        with self._lock:
            counters[key] += n

    def _error(self, msg: str) -> None:
        with self._lock:
            self.last_errors.append(msg)
