"""Prefetch: the next tasks' encodings made while the annotator works on this one.

A first click on a new image pays for its encoding (on 2 CPU cores 4.8-5.6 s through Label Studio
against ~2.7 s on an encoded one; on a GPU a third of the click). An annotator spends several
seconds on a task, time enough to encode the next ones. So when a task of a project is clicked,
the tasks Label Studio's labeling stream would serve next are looked up and their images encoded
(and their patch features computed when the project has image references) at the scheduler's
lowest priority, ``PREFETCH``: a click or a pre-label is always taken before queued prefetch work,
and waits at most for the one encoding in progress.

Which tasks: under the project's "Sequential sampling" (Label Studio's default), the first
``depth`` tasks without annotations in id order, the clicked one left out (the annotator holds
it). Under uniform or uncertainty sampling the next task is Label Studio's random or model-driven
choice, which cannot be known here: nothing is prefetched. Tasks are read through the task list
with ``review=true`` (``backend/labelstudio/client.py``), which never makes Label Studio predict.

One worker thread, one lookup at a time (a newer click of the same project replaces a pending
one), ``depth`` bounded by the embedding cache (the clicked image and the prefetched ones must fit),
and what it did in ``/health`` (``prefetch``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

from backend.config import Settings
from backend.errors import ImageFetchError, RequestError
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.label_config import LabelConfig
from backend.serving.models import Models
from backend.serving.scheduler import PREFETCH
from backend.store.references import ReferenceStore
from smartsam.backbones.base import image_key

log = logging.getLogger("smartsam.prefetch")

SEQUENTIAL = "Sequential sampling"  # Label Studio's value of a project's ``sampling``
# A click repeats on the same task (refinements): look the next tasks up again only after this.
RELOOK_S = 30.0


class Prefetcher:
    """Encodes the next tasks of a clicked project in the background.

    Args:
        settings: the backend's settings.
        models: the models and their scheduler (encodings run there, at the lowest priority).
        client: the Label Studio client (the project's sampling, its next tasks).
        store: the reference store (whether the project has image references).
        image: ``(task, cfg, deadline) -> image``, the answers' own fetch (the same cache).
        depth: tasks ahead to encode (``SMARTSAM_PREFETCH``; 0: off); at most the embedding cache
            less the clicked image.
    """

    def __init__(self, settings: Settings, models: Models, client: LabelStudioClient, store: ReferenceStore,
                 image: Callable, depth: int) -> None:
        self.settings, self.models, self.client, self.store = settings, models, client, store
        self.image = image
        self.depth = max(0, min(int(depth), settings.embedding_cache - 1))
        self._cond = threading.Condition()
        self._pending: "OrderedDict[str, Tuple[int, LabelConfig]]" = OrderedDict()  # project -> clicked task
        self._looked: Dict[Tuple[str, int], float] = {}  # (project, clicked task) -> when looked up
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.counts = {"clicks": 0, "lookups": 0, "encoded": 0, "already_encoded": 0, "features": 0, "failed": 0,
                       "not_sequential": 0}
        self.last: Dict[str, object] = {}

    @property
    def enabled(self) -> bool:
        return self.depth > 0 and self.client.configured

    def on_click(self, project: Optional[str], task_id, cfg: LabelConfig) -> None:
        """A task of ``project`` was clicked: queue a lookup of the tasks after it (returns at once)."""
        if not self.enabled or project is None or not isinstance(task_id, int) or isinstance(task_id, bool):
            return
        now = time.monotonic()
        with self._cond:
            self.counts["clicks"] += 1
            if now - self._looked.get((project, task_id), -RELOOK_S) < RELOOK_S:
                return
            self._looked[(project, task_id)] = now
            if len(self._looked) > 1000:
                self._looked = {k: t for k, t in self._looked.items() if now - t < RELOOK_S}
            self._pending.pop(project, None)
            self._pending[project] = (task_id, cfg)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="smartsam-prefetch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def next_tasks(self, project: str, clicked: int) -> List[Dict]:
        """The tasks Label Studio would serve after ``clicked`` (none unless sampling is sequential)."""
        sampling = self.client.project(int(project)).get("sampling", SEQUENTIAL)
        if sampling != SEQUENTIAL:
            self.counts["not_sequential"] += 1
            return []
        return self.client.unlabeled_tasks(int(project), exclude=clicked, limit=self.depth)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                project, (clicked, cfg) = self._pending.popitem(last=False)
            try:
                self._prefetch(project, clicked, cfg)
            except Exception as e:  # never the server's problem: counted, logged, shown in /health
                self.counts["failed"] += 1
                self.last = {"project": project, "after_task": clicked, "error": f"{type(e).__name__}: {e}"[:300]}
                log.warning("prefetch after task %s of project %s failed: %s", clicked, project, e)

    def _prefetch(self, project: str, clicked: int, cfg: LabelConfig) -> None:
        self.counts["lookups"] += 1
        tasks = self.next_tasks(project, clicked)
        image_refs = any(m.kind in ("mask", "image") for m in self.store.list(project))
        bb = self.models.ready(0)
        done = []
        for task in tasks:
            deadline = time.monotonic() + self.settings.image_timeout
            try:
                image = self.image(task, cfg, deadline)
            except (RequestError, ImageFetchError) as e:
                self.counts["failed"] += 1
                log.info("prefetch: task %s of project %s: %s", task.get("id"), project, e)
                continue
            key = image_key(image)
            before = bb.encoder_calls
            # lowest priority, no deadline: it waits for every click and pre-label there is
            self.models.call(lambda: bb.embed(image, key), PREFETCH)
            self.counts["encoded" if bb.encoder_calls > before else "already_encoded"] += 1
            if image_refs:
                self.models.call(lambda: self.models.features.get("image").tokens(image, key), PREFETCH)
                self.counts["features"] += 1
            done.append(task.get("id"))
        self.last = {"project": project, "after_task": clicked, "tasks": done, "at": time.time()}

    def health(self) -> Dict[str, object]:
        with self._cond:
            pending = len(self._pending)
        return {"depth": self.depth, "enabled": self.enabled, "pending": pending, **self.counts, "last": self.last}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
