"""Answers: a task and a prompt (or none) in, the prediction Label Studio stores out.

Interactive clicks and boxes go through the agent (or, for a seeded share of first clicks, the
plain backbone: ``SMARTSAM_COMPARE``); a task without a prompt is pre-labeled for each label with
a reference. Every suggestion served is queued for the field statistics. One
:class:`RequestContext` per request carries what is computed once: the project, its labeling
config, its agent settings and the model version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from smartsam.agent import AgentResult, locate

from .config import AgentSettings
from .engine import Engine
from .errors import RequestError
from .field_stats import draw_plain
from .label_config import LabelConfig
from .regions import brush_result, parse_prompt

log = logging.getLogger("smartsam.backend")


@dataclass(frozen=True)
class RequestContext:
    """What one request computes once and every task of it shares.

    Attributes:
        project: the Label Studio project id, or None (pure-IS: no references, no statistics).
        cfg: the project's labeling config.
        agent_settings: the project's agent settings (its extra params applied).
        version: the model version of every prediction in the answer.
        deadline: ``time.monotonic()`` by which the request must answer.
    """

    project: Optional[str]
    cfg: LabelConfig
    agent_settings: AgentSettings
    version: str
    deadline: float

    @classmethod
    def build(cls, engine: Engine, project: Optional[str], cfg: LabelConfig, deadline: float) -> "RequestContext":
        a = engine.agent_settings(project)
        return cls(project, cfg, a, engine.model_version(project, a), deadline)

    def settings_named(self) -> Dict[str, object]:
        """The agent settings this answer ran with (every answer names them)."""
        a = self.agent_settings
        return {"chain_length": a.chain_length, "exemplars": a.exemplars, "fast_path": a.fast_path,
                "require_click": a.require_click}


class Answers:
    """Turns tasks into predictions with the engine's models.

    Args:
        engine: the process's :class:`~backend.engine.Engine`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def image(self, task, cfg: LabelConfig, deadline: Optional[float] = None) -> np.ndarray:
        """The task's image (the config's image key), through the fetcher."""
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise RequestError("a task has no data")
        ref = task["data"].get(cfg.image_key)
        if not ref:
            raise RequestError(f"task {task.get('id')} has no image in data.{cfg.image_key}")
        tid = task.get("id")
        return self.engine.fetcher.fetch(ref, task_id=tid if isinstance(tid, int) and not isinstance(tid, bool) else None,
                                         deadline=deadline)

    # -- interactive -----------------------------------------------------------------------
    def interactive(self, task, context_result, ctx: RequestContext) -> Dict:
        """One click (or a box, or a click chain) on one task -> its prediction."""
        image = self.image(task, ctx.cfg, ctx.deadline)
        h, w = image.shape[:2]
        prompt = parse_prompt(context_result, (w, h), ctx.cfg)
        first = prompt.first_positive if prompt.box is None else None
        ref, note = (None, None)
        if prompt.box is None and ctx.project is not None:
            ref, note = self.engine.reference(ctx.project, prompt.label)
        s = self.engine.settings
        # SMARTSAM_COMPARE: a seeded share of first clicks goes to plain SAM; the draw depends on
        # the first click only, so the chain's later requests stay in the same arm
        plain = first is not None and ctx.project is not None and draw_plain(
            s.seed, s.compare_share, ctx.project, task.get("id"), prompt.label, prompt.points[first])
        t0 = time.monotonic()
        with self.engine.model(ctx.deadline, ctx.agent_settings) as agent:
            agent.set_image(image)
            if prompt.box is not None:
                res = agent.predict_box(prompt.box, prompt.points, prompt.labels)
            elif plain:
                res = agent.predict_plain(prompt.points[first])
            else:
                res = agent.predict(prompt.points[first], ref, deadline=ctx.deadline)
                # outer interactions, the ordinary SAM way: each further click refines the previous
                # answer's logits with every click so far
                for k in range(first + 1, len(prompt.points)):
                    res = agent.refine(prompt.points[: k + 1], prompt.labels[: k + 1], res)
            require_click = agent.require_click
        log.info("project %s task %s label %r: %s, %d clicks, score %.3f, %.2f s%s", ctx.project, task.get("id"),
                 prompt.label, res.mode, len(prompt.points), res.score, res.timings.get("total", 0),
                 " (cut at the deadline)" if res.partial else "")
        pred, shown_mask = self.prediction(res, ctx, prompt.label, note, prompt.shown)
        if res.mode.startswith("reference"):
            pred["require_click"] = require_click
        if plain:
            pred["arm"] = "plain"  # the first answer came from plain SAM (SMARTSAM_COMPARE)
        self.record(ctx, task, prompt.label, res.mode, "plain" if plain else "smartsam",
                    len(prompt.points) + (prompt.box is not None), time.monotonic() - t0, shown_mask)
        return pred

    def record(self, ctx: RequestContext, task, label: str, mode: str, arm: str, clicks: int, seconds: float,
               mask: np.ndarray) -> None:
        """Field statistics: one suggestion served, ``mask`` as Label Studio shows it (queued, and
        never fails the request)."""
        if ctx.project is None:
            return
        try:
            self.engine.stats.record(ctx.project, task.get("id"), label, mode, arm, clicks, seconds, mask, ctx.version)
        except Exception as e:  # statistics must not cost an annotator an answer
            log.warning("field statistics: suggestion not recorded (%s)", e)

    def prediction(self, res: AgentResult, ctx: RequestContext, label: str, note: Optional[str],
                   shown=None) -> tuple:
        """The prediction Label Studio stores, and its mask at the displayed size."""
        result, mask = brush_result(res.mask, ctx.cfg, label, res.score, shown, self.engine.settings.max_pixels)
        pred = {"result": [result], "score": round(float(res.score), 4), "model_version": ctx.version,
                "mode": res.mode, "path": res.path, "settings": ctx.settings_named()}
        if res.similarity is not None:
            pred["similarity"] = round(float(res.similarity), 4)
        if res.partial:
            pred["partial"] = True
            note = "; ".join(x for x in (note, "the agent was cut short at SMARTSAM_REQUEST_TIMEOUT: best answer so far") if x)
        if self.engine.backbone is not None and self.engine.backbone.random_weights:
            pred["note"] = "RANDOM weights (test configuration)"
        if note:
            pred["errors"] = [note]
        return pred, mask

    # -- pre-labeling ----------------------------------------------------------------------
    def prelabel(self, task, ctx: RequestContext) -> Dict:
        """No click: for each label with a reference, find the object and segment it."""
        if ctx.project is None:
            raise RequestError("pre-labeling needs the project (its references): Label Studio sends it")
        refs, reasons = {}, []
        for label in ctx.cfg.brush_labels:
            ref, note = self.engine.reference(ctx.project, label)
            if ref is not None:
                refs[label] = ref
            else:
                reasons.append(note or f"no reference for label {label!r}: set one to pre-label it")
        if not refs:
            raise RequestError("; ".join(reasons))
        image = self.image(task, ctx.cfg, ctx.deadline)
        results, scores = [], []
        for label, ref in refs.items():
            extractor = self.engine.features.for_reference(ref.kind)
            with self.engine.model(ctx.deadline, ctx.agent_settings) as agent:
                key = agent.set_image(image)
                click = locate(extractor, image, ref, key)
                t0 = time.monotonic()
                res = agent.predict(click, ref, deadline=ctx.deadline)
            pred, shown_mask = self.prediction(res, ctx, label, None)
            self.record(ctx, task, label, "prelabel", "prelabel", 0, time.monotonic() - t0, shown_mask)
            results.extend(pred["result"])
            scores.append(res.score)
        out = {"result": results, "score": round(float(np.mean(scores)), 4), "model_version": ctx.version,
               "mode": "prelabel", "settings": ctx.settings_named()}
        if reasons:
            out["errors"] = reasons
            log.info("project %s task %s: %s", ctx.project, task.get("id"), "; ".join(reasons))
        return out

    def embed(self, task, cfg: LabelConfig) -> None:
        """Encode the task's image only (fills the embedding caches)."""
        image = self.image(task, cfg)
        with self.engine.model() as agent:
            agent.backbone.set_image(image)


def tasks_list(tasks) -> List:
    if not isinstance(tasks, list) or not tasks:
        raise RequestError("the request has no tasks")
    return tasks
