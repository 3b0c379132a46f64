"""The ``label-studio-ml`` model class: Label Studio's ``/predict`` in, SmartSAM's answers out.

Only the protocol's translation lives here: which tasks are answered now, which continue in the
background, what an error looks like to Label Studio. The answers come from
:class:`~backend.serving.answers.Answers`, the models from :class:`~backend.serving.models.Engine`, both built by
the composition root (:mod:`backend.server`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional

from label_studio_ml.model import LabelStudioMLBase

from backend.errors import Busy, ImageFetchError, QueueFull, Refused, RequestError
from backend.labelstudio.label_config import LabelConfig
from backend.labelstudio.schemas import project_key
from backend.serving.answers import Answers, RequestContext, tasks_list
from smartsam.agent import InvalidClick
from smartsam.io import ImageError

log = logging.getLogger("smartsam.backend")

# (project, tasks, label_config) -> how many were queued for the background
SubmitTasks = Callable[[str, List[Dict], str], int]
# (project, clicked task id, labeling config): an annotator is on that task (backend/serving/prefetch.py)
OnClick = Callable[[Optional[str], object, LabelConfig], None]


class SmartSAMBackend(LabelStudioMLBase):
    """Interactive clicks and pre-labeling for one project's labeling config.

    Args:
        label_config: the project's labeling config (checked: RequestError names what it lacks).
        answers: the process's :class:`~backend.serving.answers.Answers`.
        pending: ``(project, task id) -> bool``, tasks already queued in the background.
        submit: hands tasks past the predict budget to the background queue.
        on_click: told of each answered click, after its answer (prefetch of the next tasks).
    """

    def __init__(self, label_config=None, train_output=None, answers: Optional[Answers] = None,
                 pending: Optional[Callable[[str, int], bool]] = None, submit: Optional[SubmitTasks] = None,
                 on_click: Optional[OnClick] = None, **kwargs):
        if answers is None:
            raise ValueError("SmartSAMBackend needs the process's Answers (built by backend.server)")
        self.cfg = LabelConfig.parse(label_config)  # before the base class: a clear message first
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        self.answers = answers
        self.pending = pending
        self.submit = submit
        self.on_click = on_click
        self.errors: List[str] = []
        self.version: Optional[str] = None

    def predict(self, tasks, context=None, project=None, deadline: Optional[float] = None,
                budget: Optional[float] = None, **kwargs) -> List:
        """One entry per task: ``{"result": [...], "score", "model_version", "mode", ...}``. An
        interactive request that fails gets an empty result with its reason in ``errors``; a
        pre-labeling task that cannot be labelled gets ``[]`` (no prediction). Every reason is also
        in ``self.errors`` and the log.

        Args:
            project: Label Studio's ``"<id>.<timestamp>"``; None answers in pure-IS mode (no
                references, no statistics, no pre-labels).
            deadline: ``time.monotonic()`` by which this request must answer (fetch, model, agent).
            budget: pre-labeling several tasks: after this many seconds the tasks not done yet
                are handed to the background queue (they get ``[]`` here and are written to
                Label Studio when done).
        """
        tasks = tasks_list(tasks)
        proj = project_key(project)
        deadline = deadline or time.monotonic() + self.answers.settings.request_timeout
        ctx = RequestContext.build(self.answers.versions, proj, self.cfg, deadline)  # one model version per request
        self.version = ctx.version
        interactive = bool(context and context.get("result"))
        stop_at = min(deadline, time.monotonic() + budget) if budget else deadline
        out: List = []
        self.errors = []
        leftover: List[Dict] = []
        # pre-labeling with a project: what is not done within the budget, or failed for a reason
        # that may pass (the image could not be had now, the model is busy), is queued for the
        # background, which writes it to Label Studio when done (Label Studio keeps only what this
        # answer holds, and asks again only when the user presses the button again)
        background = not interactive and proj is not None and self.submit is not None
        for task in tasks:
            tid = task.get("id") if isinstance(task, dict) else None
            # a prediction is written back by task id: a task without an integer id is answered here only
            queueable = background and isinstance(tid, int) and not isinstance(tid, bool)
            if queueable:
                if self.pending is not None and self.pending(proj, tid):
                    out.append([])  # already queued in the background: it will be written once
                    continue
                if len(tasks) > 1 and time.monotonic() >= stop_at:
                    leftover.append(task)
                    out.append([])
                    continue
            try:
                if interactive:
                    pred = self.answers.interactive(task, context["result"], ctx)
                else:
                    pred = self.answers.prelabel(task, ctx)
                self.errors.extend(f"task {tid}: {m}" for m in pred.get("errors", []))
                out.append(pred)
            except (QueueFull, Busy) as e:
                if not queueable:
                    if isinstance(e, QueueFull):
                        raise  # an annotator's click: 503 with the expected wait, at once
                    self._failed(out, e, proj, tid, interactive, ctx)
                    continue
                leftover.append(task)  # pre-labeling: the background queue takes it
                out.append([])
            except ImageFetchError as e:
                if queueable and e.transient:
                    log.warning("project %s task %s: %s; queued for the background", proj, tid, e)
                    leftover.append(task)
                    out.append([])
                else:
                    self._failed(out, e, proj, tid, interactive, ctx)
            except (RequestError, InvalidClick, ImageError) as e:
                self._failed(out, e, proj, tid, interactive, ctx)
        if interactive and self.on_click is not None:
            for task in tasks:
                self.on_click(proj, task.get("id") if isinstance(task, dict) else None, self.cfg)
        if leftover:
            try:
                n = self.submit(proj, leftover, self.label_config)
            except Refused as e:  # nothing can keep them now: say so, answer what is done
                log.error("project %s: %s", proj, e)
                self.errors.append(str(e))
                return out
            msg = f"{n} of {len(tasks)} tasks continue in the background (SMARTSAM_PREDICT_BUDGET); see /admin/health jobs"
            log.info("project %s: %s", proj, msg)
            self.errors.append(msg)
        return out

    def _failed(self, out: List, e: Exception, proj, tid, interactive: bool, ctx) -> None:
        log.warning("project %s task %s: %s", proj, tid, e)
        self.errors.append(f"task {tid}: {e}")
        if interactive:
            out.append({"result": [], "score": 0.0, "model_version": ctx.version, "errors": [str(e)]})
        else:
            # An empty list is "no prediction for this task" to Label Studio: nothing is stored, so
            # a task without a reference shows no empty prediction tab.
            out.append([])

    def fit(self, tasks, workdir=None, **kwargs):
        """References are learned from annotation events (``backend.background.workers``), not by training."""
        return {}
