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

from backend.config import AgentSettings, Settings
from backend.errors import RequestError
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import ALL_LIKE_THIS, LabelConfig
from backend.labelstudio.prompts import parse_prompt
from backend.labelstudio.regions import PolygonOptions, answer_results, ls_score
from backend.serving.models import Models
from backend.serving.scheduler import INTERACTIVE, PRELABEL
from backend.serving.versions import ProjectState, Versions
from backend.store.field_stats import FieldStats, draw_plain
from smartsam.agent import AgentResult
from smartsam.backbones.base import image_key

log = logging.getLogger("smartsam.backend")


@dataclass(frozen=True)
class RequestContext:
    """What one request reads once and every task of it shares.

    Attributes:
        project: the Label Studio project id, or None (pure-IS: no references, no statistics).
        cfg: the project's labeling config.
        state: the project as it stood when the request came (its agent settings, references,
            thresholds, model version: :class:`~backend.serving.versions.ProjectState`).
        deadline: ``time.monotonic()`` by which the request must answer.
        strict: background work: a store that cannot be read raises DatabaseUnavailable (the
            work is tried again) instead of answering without references.
    """

    project: Optional[str]
    cfg: LabelConfig
    state: ProjectState
    deadline: float
    proposals: str = "similarity"
    strict: bool = False

    @classmethod
    def build(cls, versions: Versions, project: Optional[str], cfg: LabelConfig, deadline: float,
              strict: bool = False) -> "RequestContext":
        return cls(project, cfg, versions.state(project, strict), deadline, versions.settings.proposals, strict)

    @property
    def agent_settings(self) -> AgentSettings:
        """The project's agent settings (its extra params applied)."""
        return self.state.agent_settings

    @property
    def version(self) -> str:
        """The model version of every prediction in the answer."""
        return self.state.version

    def settings_named(self) -> Dict[str, object]:
        """The agent settings this answer ran with (every answer names them)."""
        a = self.agent_settings
        return {"chain_length": a.chain_length, "exemplars": a.exemplars, "fast_path": a.fast_path,
                "require_click": a.require_click, "proposals": self.proposals}


class Answers:
    """Turns tasks into predictions with the process's models.

    Args:
        settings: the backend's settings.
        models: the models and their scheduler.
        versions: the projects' agent settings, references, thresholds and model versions.
        fetcher: the task images.
        stats: the field statistics (every suggestion served is queued there).
    """

    def __init__(self, settings: Settings, models: Models, versions: Versions, fetcher: ImageFetcher,
                 stats: FieldStats) -> None:
        self.settings = settings
        self.models = models
        self.versions = versions
        self.fetcher = fetcher
        self.stats = stats

    def image(self, task, cfg: LabelConfig, deadline: Optional[float] = None) -> np.ndarray:
        """The task's image (the config's image key), through the fetcher."""
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise RequestError("a task has no data")
        ref = task["data"].get(cfg.image_key)
        if not ref:
            raise RequestError(f"task {task.get('id')} has no image in data.{cfg.image_key}")
        tid = task.get("id")
        return self.fetcher.fetch(ref, task_id=tid if isinstance(tid, int) and not isinstance(tid, bool) else None,
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
            ref, note = ctx.state.reference(prompt.label)
        s = self.settings
        # SMARTSAM_COMPARE: a seeded share of first clicks goes to plain SAM; the draw depends on
        # the first click only, so the chain's later requests stay in the same arm
        plain = first is not None and ctx.project is not None and draw_plain(
            s.seed, s.compare_share, ctx.project, task.get("id"), prompt.label, prompt.points[first])
        if prompt.tool == ALL_LIKE_THIS and prompt.box is None:
            return self.all_like_this(task, image, prompt, ref, note, ctx)
        t0 = time.monotonic()
        agent, key = self.models.agent(ctx.agent_settings, ctx.deadline), image_key(image)
        if prompt.box is not None:
            res = self.models.call(lambda: _on(agent, image, key).predict_box(prompt.box, prompt.points, prompt.labels),
                                   INTERACTIVE, ctx.deadline)
        elif plain:
            res = self.models.call(lambda: _on(agent, image, key).predict_plain(prompt.points[first]), INTERACTIVE,
                                   ctx.deadline)
        else:
            res = self.models.run_jobs([agent.job(image, prompt.points[first], key, ref, ctx.deadline)], INTERACTIVE,
                                       ctx.deadline)[0]
            if first + 1 < len(prompt.points):
                # outer interactions, the ordinary SAM way: each further click refines the previous
                # answer's logits with every click so far
                def refine(res=res):
                    _on(agent, image, key)
                    for k in range(first + 1, len(prompt.points)):
                        res = agent.refine(prompt.points[: k + 1], prompt.labels[: k + 1], res)
                    return res

                res = self.models.call(refine, INTERACTIVE, ctx.deadline)
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
                    len(prompt.points) + (prompt.box is not None), time.monotonic() - t0, shown_mask, pred["result"])
        return pred

    def all_like_this(self, task, image: np.ndarray, prompt, ref, note: Optional[str], ctx: RequestContext) -> Dict:
        """The ``all_like_this`` tool: the clicked object (the agent, as for any click) and every
        instance like it in the image, the clicked object's mask being the reference of that
        query; a negative (Alt) click removes the instances that contain it."""
        first = prompt.first_positive
        # the one rule (without a project: no decisions, so the setting or the default)
        threshold, how = self.versions.threshold(ctx.state, prompt.label, "mask")
        t0 = time.monotonic()
        agent, key = self.models.agent(ctx.agent_settings, ctx.deadline), image_key(image)
        res = self.models.run_jobs([agent.job(image, prompt.points[first], key, ref, ctx.deadline)], INTERACTIVE,
                                   ctx.deadline)[0]
        query = self.models.call(lambda: self.models.references.from_mask(image, res.mask), INTERACTIVE, ctx.deadline)
        finder = self.models.instance_finder(agent, threshold, how, INTERACTIVE, ctx.deadline)
        found = finder.find(
            image, query, key, exclude=[res.mask], deadline=ctx.deadline)
        # an Alt-click removes the instances under it; one off the image is under none (a negative
        # index would wrap around to the other side)
        h, w = image.shape[:2]
        negatives = [(int(x), int(y)) for (x, y), lab in zip(prompt.points, prompt.labels)
                     if lab == 0 and 0 <= x < w and 0 <= y < h]
        found = [i for i in found if not any(i.mask[min(y, i.mask.shape[0] - 1), min(x, i.mask.shape[1] - 1)]
                                             for x, y in negatives)]
        pred, shown_mask = self.prediction(res, ctx, prompt.label, note, prompt.shown)
        clicked = list(pred["result"])
        for k, inst in enumerate(found, start=1):
            regions, _ = self.regions(inst.mask, ctx, prompt.label, inst.similarity, prompt.shown, instance=k)
            pred["result"].extend(regions)
        pred.update(mode="all-like-this", instances=len(found), threshold=round(threshold, 4), rule=finder.rule,
                    first_mode=res.mode)
        log.info("project %s task %s label %r: all like this, %d instances (threshold %.3f, %s), %.2f s", ctx.project,
                 task.get("id"), prompt.label, len(found), threshold, how, time.monotonic() - t0)
        self.record(ctx, task, prompt.label, "all-like-this", "smartsam", len(prompt.points), time.monotonic() - t0,
                    shown_mask, clicked)
        return pred

    def record(self, ctx: RequestContext, task, label: str, mode: str, arm: str, clicks: int, seconds: float,
               mask: np.ndarray, regions: List[Dict], similarity: Optional[float] = None) -> None:
        """Field statistics: one suggestion served, ``mask`` as Label Studio shows it (queued, and
        never fails the request)."""
        if ctx.project is None:
            return
        try:
            self.stats.record(ctx.project, task.get("id"), label, mode, arm, clicks, seconds, mask, ctx.version,
                                     regions, similarity)
        except Exception as e:  # statistics must not cost an annotator an answer
            log.warning("field statistics: suggestion not recorded (%s)", e)

    def regions(self, mask: np.ndarray, ctx: RequestContext, label: str, score: float, shown=None, instance: int = 0):
        """The answer regions of one mask in the project's answer tags, and the displayed mask."""
        s = self.settings
        return answer_results(mask, ctx.cfg, label, score, shown, s.max_pixels,
                              PolygonOptions(s.polygon_parts, s.polygon_min_area), instance)

    def prediction(self, res: AgentResult, ctx: RequestContext, label: str, note: Optional[str],
                   shown=None) -> tuple:
        """The prediction Label Studio stores, and its mask at the displayed size."""
        results, mask = self.regions(res.mask, ctx, label, res.score, shown)
        pred = {"result": results, "score": ls_score(res.score), "model_version": ctx.version,
                "mode": res.mode, "path": res.path, "settings": ctx.settings_named()}
        if res.similarity is not None:
            pred["similarity"] = round(float(res.similarity), 4)
        if res.partial:
            pred["partial"] = True
            note = "; ".join(x for x in (note, "the agent was cut short at SMARTSAM_REQUEST_TIMEOUT: best answer so far") if x)
        if self.models.backbone is not None and self.models.backbone.random_weights:
            pred["note"] = "RANDOM weights (test configuration)"
        if note:
            pred["errors"] = [note]
        return pred, mask

    # -- pre-labeling ----------------------------------------------------------------------
    def prelabel(self, task, ctx: RequestContext) -> Dict:
        """No click: for each label with a reference, every instance like it ("all like this
        one", :class:`~smartsam.instances.InstanceFinder`). One prediction holds every kept
        region; each region's score is its similarity to the reference, the prediction's the
        lowest of them (Label Studio's Data Manager then sorts the doubtful tasks first)."""
        if ctx.project is None:
            raise RequestError("pre-labeling needs the project (its references): Label Studio sends it")
        refs, reasons = {}, []
        for label in ctx.cfg.labels:
            ref, note = ctx.state.reference(label)
            if ref is not None:
                refs[label] = ref
            else:
                reasons.append(note or f"no reference for label {label!r}: set one to pre-label it")
        if not refs:
            raise RequestError("; ".join(reasons))
        image = self.image(task, ctx.cfg, ctx.deadline)
        agent, key = self.models.agent(ctx.agent_settings, ctx.deadline), image_key(image)
        results, sims, counts, rules = [], [], {}, {}
        for label, ref in refs.items():
            threshold, how = self.versions.threshold(ctx.state, label, ref.kind)
            t0 = time.monotonic()
            finder = self.models.instance_finder(agent, threshold, how, PRELABEL, ctx.deadline)
            found = finder.find(image, ref, key, deadline=ctx.deadline)
            rules[label] = finder.rule
            seconds = (time.monotonic() - t0) / max(len(found), 1)
            counts[label] = len(found)
            if not found:
                reasons.append(f"no instance like the reference of {label!r} at similarity >= {threshold:.3f} ({how}, "
                               f"{finder.rule} rule)")
            for k, inst in enumerate(found):
                regions, shown_mask = self.regions(inst.mask, ctx, label, inst.similarity, instance=k)
                self.record(ctx, task, label, "prelabel", "prelabel", 0, seconds, shown_mask, regions, inst.similarity)
                results.extend(regions)
                sims.append(inst.similarity)
        if not results:
            raise RequestError("; ".join(reasons))
        out = {"result": results, "score": ls_score(min(sims)), "model_version": ctx.version,
               "mode": "prelabel", "instances": counts, "rules": rules, "settings": ctx.settings_named()}
        if reasons:
            out["errors"] = reasons
            log.info("project %s task %s: %s", ctx.project, task.get("id"), "; ".join(reasons))
        return out

    def embed(self, task, cfg: LabelConfig) -> None:
        """Encode the task's image only (fills the embedding caches)."""
        image = self.image(task, cfg)
        self.models.call(lambda: self.models.backbone.embed(image), PRELABEL)


def _on(agent, image: np.ndarray, key: str):
    """``agent`` with ``image`` current (on the model's thread, where calls run)."""
    agent.set_image(image, key)
    return agent


def tasks_list(tasks) -> List:
    if not isinstance(tasks, list) or not tasks:
        raise RequestError("the request has no tasks")
    return tasks
