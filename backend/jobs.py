"""Work that outlives a request: webhook events and the background part of pre-labeling.

Webhooks. Label Studio waits 1 s for a webhook (``WEBHOOK_TIMEOUT``) and anyone who can reach the
port can post one, so ``/webhook`` only queues a notice (action + annotation id) and answers. A
worker thread then reads the annotation, its task and its project back from Label Studio's API
with the backend's key and applies the reference rules to *that* copy; an annotation Label
Studio does not confirm changes nothing and is logged. A second delivery of the same event finds
the same annotation version and is skipped.

Pre-labeling. Label Studio's "Retrieve predictions" sends every selected task in one ``/predict``
call and gives up after 100 s (``ML_TIMEOUT_PREDICT``). ``/predict`` answers what it finished
within ``SMARTSAM_PREDICT_BUDGET`` and hands the rest here: a worker runs each task through the
same pre-labeling path and writes the predictions back through Label Studio's API in batches,
one per task and model version (a task that already has one, from Label Studio or an earlier
press of the button, is skipped). ``state()`` is shown by ``/health`` and ``/admin/jobs``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from typing import Dict, List, Optional, Tuple

log = logging.getLogger("smartsam.jobs")

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETED = "ANNOTATIONS_DELETED"


class Jobs:
    """Two queues, one worker thread each (events never wait behind a long pre-labeling queue).

    Args:
        engine: the process's :class:`backend.model.Engine` (models, fetcher, store).
        max_events: queued notices beyond this are refused (the sender gets 503).
        write_batch: predictions per write to Label Studio.
    """

    def __init__(self, engine, max_events: int = 1000, write_batch: int = 10) -> None:
        self.engine = engine
        self.write_batch = int(write_batch)
        self._events: "queue.Queue[Tuple[str, int, Optional[str]]]" = queue.Queue(max_events)
        self._tasks: "queue.Queue[Tuple[str, Dict, str]]" = queue.Queue()
        self._lock = threading.Lock()
        self._pending: Dict[Tuple[str, int], float] = {}
        self._seen: "OrderedDict[Tuple[int, str], None]" = OrderedDict()
        self.events = {"queued": 0, "applied": 0, "duplicates": 0, "rejected": 0, "failed": 0}
        self.prelabel = {"queued": 0, "done": 0, "failed": 0, "written": 0, "skipped_existing": 0}
        self._recent: "deque[float]" = deque(maxlen=50)
        self.last_errors: "deque[str]" = deque(maxlen=10)
        threading.Thread(target=self._event_loop, name="smartsam-events", daemon=True).start()
        threading.Thread(target=self._prelabel_loop, name="smartsam-prelabel", daemon=True).start()

    # -- state -----------------------------------------------------------------------------
    def state(self) -> Dict:
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._recent if now - t < 120]
            rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0
            return {"events": {**self.events, "waiting": self._events.qsize()},
                    "prelabel": {**self.prelabel, "waiting": len(self._pending), "tasks_per_s": round(rate, 3)},
                    "last_errors": list(self.last_errors)}

    # -- webhook events --------------------------------------------------------------------
    def notify(self, action: str, annotation_id: int, claimed_project: Optional[str] = None) -> bool:
        """Queue a webhook's notice. False when the queue is full."""
        try:
            self._events.put_nowait((action, int(annotation_id), claimed_project))
        except queue.Full:
            return False
        with self._lock:
            self.events["queued"] += 1
        return True

    def _event_loop(self) -> None:
        while True:
            action, aid, claimed = self._events.get()
            try:
                outcome = self.apply_event(action, aid, claimed)
                key = {"applied": "applied", "duplicate": "duplicates", "rejected": "rejected"}[outcome]
            except Exception as e:  # one bad event never stops the worker
                log.exception("webhook %s annotation %s failed", action, aid)
                self._error(f"webhook {action} annotation {aid}: {type(e).__name__}: {e}")
                key = "failed"
            with self._lock:
                self.events[key] += 1
            self._events.task_done()

    def apply_event(self, action: str, aid: int, claimed: Optional[str] = None) -> str:
        """Read annotation ``aid`` back from Label Studio and apply the reference rules to it.
        Returns "applied", "duplicate" or "rejected" (Label Studio does not confirm it)."""
        from .images import ImageFetchError
        from .model import RequestError, SmartSAMBackend

        f = self.engine.fetcher
        if action == DELETED:
            return self._apply_deletion(aid)
        if not (self.engine.settings.label_studio_url and self.engine.settings.label_studio_api_key):
            log.warning("webhook %s annotation %s ignored: LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to "
                        "confirm it with Label Studio", action, aid)
            self._error(f"annotation {aid}: cannot confirm with Label Studio (set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
            return "rejected"
        try:
            ann = f.get_json(f"/api/annotations/{aid}")
            task = f.get_json(f"/api/tasks/{int(ann['task'])}")
            project = f.get_json(f"/api/projects/{int(task['project'])}")
        except (ImageFetchError, KeyError, TypeError, ValueError) as e:
            log.warning("webhook %s: annotation %s not confirmed by Label Studio (%s): nothing changed", action, aid, e)
            self._error(f"annotation {aid} not confirmed by Label Studio: {e}")
            return "rejected"
        proj = str(task["project"])
        if claimed is not None and claimed != proj:
            log.warning("webhook %s: the payload names project %s, Label Studio says annotation %s is in project %s; "
                        "using Label Studio's", action, claimed, aid, proj)
        version = (aid, str(ann.get("updated_at")), action == "ANNOTATION_UPDATED")
        with self._lock:
            if version in self._seen:
                return "duplicate"
        model = SmartSAMBackend(label_config=project.get("label_config"), engine=self.engine)
        try:
            out = model.apply_annotation(ann, task, proj, action)
        except (RequestError, ImageFetchError, ValueError) as e:
            log.warning("webhook %s annotation %s: %s", action, aid, e)
            self._error(f"annotation {aid}: {e}")
            return "rejected"
        try:
            out["statistics"] = len(model.observe_annotation(ann, task, proj))
        except Exception as e:  # statistics never block the reference rules
            log.warning("annotation %s: field statistics not updated (%s)", aid, e)
        with self._lock:
            self._seen[version] = None
            while len(self._seen) > 10000:
                self._seen.popitem(last=False)
        log.info("webhook %s annotation %s (project %s, task %s): references set %s", action, aid, proj, task.get("id"),
                 out.get("reference"))
        return "applied"

    def _apply_deletion(self, aid: int) -> str:
        """A deletion counts only when Label Studio answers 404 for the annotation."""
        from .images import ImageFetchError

        if not (self.engine.settings.label_studio_url and self.engine.settings.label_studio_api_key):
            self._error(f"annotation {aid}: cannot confirm the deletion with Label Studio (set LABEL_STUDIO_URL and "
                        f"LABEL_STUDIO_API_KEY)")
            return "rejected"
        try:
            self.engine.fetcher.get_json(f"/api/annotations/{aid}")
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

    # -- background pre-labeling -----------------------------------------------------------
    def pending(self, project: str, task_id) -> bool:
        with self._lock:
            return (project, task_id) in self._pending

    def submit(self, project: str, tasks: List[Dict], label_config: str) -> int:
        """Queue tasks for background pre-labeling; returns how many were new to the queue."""
        n = 0
        with self._lock:
            for t in tasks:
                key = (project, t.get("id"))
                if key in self._pending or not isinstance(t.get("id"), int):
                    continue
                self._pending[key] = time.monotonic()
                self._tasks.put((project, t, label_config))
                self.prelabel["queued"] += 1
                n += 1
        return n

    def _prelabel_loop(self) -> None:
        batch: List[Dict] = []
        while True:
            try:
                project, task, label_config = self._tasks.get(timeout=1.0 if batch else None)
            except queue.Empty:
                self._flush(batch)
                continue
            try:
                pred = self._predict(project, task, label_config)
                if pred is not None:
                    batch.append(pred)
                else:
                    self._done(project, task.get("id"))
                if len(batch) >= self.write_batch or self._tasks.empty():
                    self._flush(batch)
            except Exception as e:  # the worker never dies
                log.exception("background pre-label of task %s failed", task.get("id"))
                self._error(f"task {task.get('id')}: {type(e).__name__}: {e}")
                self._done(project, task.get("id"))
            finally:
                self._tasks.task_done()

    def _done(self, project: str, task_id) -> None:
        # a task stays "pending" until its prediction is written: a second press of the button
        # meanwhile must not predict it again
        with self._lock:
            self._pending.pop((project, task_id), None)

    def _predict(self, project: str, task: Dict, label_config: str) -> Optional[Dict]:
        from .images import ImageFetchError
        from .model import RequestError, SmartSAMBackend

        model = SmartSAMBackend(label_config=label_config, engine=self.engine)
        try:
            pred = model.predict([task], project=project)[0]
        except (RequestError, ImageFetchError, ValueError) as e:
            pred, model.errors = [], [str(e)]
        with self._lock:
            self._recent.append(time.monotonic())
            if pred:
                self.prelabel["done"] += 1
            else:
                self.prelabel["failed"] += 1
        if not pred:
            self._error(f"task {task.get('id')}: {'; '.join(model.errors) or 'no prediction'}")
            return None
        return {"task": task["id"], "project": project, "result": pred["result"], "score": pred.get("score"),
                "model_version": pred["model_version"]}

    def _flush(self, batch: List[Dict]) -> None:
        """Write predictions to Label Studio, skipping tasks that already have this model version's."""
        from .images import ImageFetchError

        f = self.engine.fetcher
        keys = [(p["project"], p["task"]) for p in batch]
        todo = []
        for p in batch:
            try:
                have = f.get_json(f"/api/predictions?task={int(p['task'])}")
                if any(isinstance(x, dict) and x.get("model_version") == p["model_version"] for x in have or []):
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
                f.post_json(f"/api/projects/{int(project)}/import/predictions", preds)
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
