"""The ML backend model: Label Studio requests in, SmartSAM answers out.

One :class:`Engine` per process holds the models (loaded once, in the background, so ``/setup``
answers at once), the image fetcher and the reference store. :class:`SmartSAMBackend` is the
``label-studio-ml`` model class Label Studio's protocol is written against; it only translates.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from label_studio_ml.model import LabelStudioMLBase

from smartsam import __version__
from smartsam.agent import AgentResult, InvalidClick, SmartSAMAgent, locate
from smartsam.selector import Reference

from .config import Settings
from .images import ImageFetcher, ImageFetchError
from .references import CorruptReference, ReferenceStore

log = logging.getLogger("smartsam.backend")

REFERENCE_CHOICE = "Use as reference"


class RequestError(ValueError):
    """Bad input in a request; the message goes back to Label Studio and into the log."""


# -- label config ----------------------------------------------------------------------------
@dataclass
class LabelConfig:
    """What the backend needs from a project's labeling config."""

    image_name: str
    image_key: str
    brush_name: str
    brush_labels: List[str]

    @classmethod
    def parse(cls, parsed: Dict) -> "LabelConfig":
        for name, tag in parsed.items():
            if tag.get("type", "").lower() == "brushlabels":
                return cls(tag["to_name"][0], tag["inputs"][0]["value"], name, list(tag.get("labels", [])))
        raise RequestError("the project's labeling config has no BrushLabels: SmartSAM answers with brush masks "
                           "(use the backend's label_config.xml)")


# -- engine ----------------------------------------------------------------------------------
class Engine:
    """Per-process models and state. Build with :meth:`instance`; models load in a thread."""

    _instance: Optional["Engine"] = None
    _instance_lock = threading.Lock()

    def __init__(self, settings: Optional[Settings] = None) -> None:
        self.settings = settings or Settings()
        self.store = ReferenceStore(self.settings.data_dir)
        self.fetcher = ImageFetcher(self.settings)
        self.lock = threading.Lock()  # the models serve one request at a time
        self.agent: Optional[SmartSAMAgent] = None
        self.load_error: Optional[str] = None
        self._loaded = threading.Event()
        self._features_lock = threading.Lock()

    @classmethod
    def instance(cls) -> "Engine":
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = Engine()
                cls._instance.start_loading()
            return cls._instance

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="smartsam-load", daemon=True).start()

    def _load(self) -> None:
        from smartsam.models import ModelError, load_backbone

        s = self.settings
        try:
            bb = load_backbone(s.backbone, s.checkpoint, s.device, cache_size=s.embedding_cache)
            from smartsam.clickers import NextChainClicker

            self.agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=s.chain_length), seed=s.seed)
            log.info("model %s loaded on %s%s", bb.name, bb.device, " (RANDOM weights)" if bb.random_weights else "")
        except ModelError as e:
            self.load_error = str(e)
            log.error("model not loaded: %s", e)
        except Exception as e:  # never leave the server hanging in "loading"
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model not loaded")
        finally:
            self._loaded.set()

    def ready_agent(self, timeout: float = 300.0) -> SmartSAMAgent:
        if not self._loaded.wait(timeout):
            raise RequestError("the model is still loading; try again in a moment")
        if self.agent is None:
            raise RequestError(f"the model failed to load: {self.load_error}")
        return self.agent

    def health(self) -> Dict:
        bb = self.agent.backbone if self.agent else None
        return {
            "status": "UP",
            "model": bb.name if bb else (self.settings.backbone or "default"),
            "device": str(bb.device) if bb else None,
            "weights_loaded": bb is not None,
            "random_weights": bool(bb and bb.random_weights),
            "load_error": self.load_error,
            "encoder_calls": bb.encoder_calls if bb else 0,
            "embedding_disk_hits": bb.disk_hits if bb else 0,
            "version": __version__,
        }

    # features load on first need: pure-IS users never pay for DINOv2 / CLIP
    def features(self, kind: str):
        """The agent's "image" (DINOv2) or "text" (CLIP) feature extractor, loaded once."""
        agent = self.ready_agent()
        attr = "image_features" if kind == "image" else "text_features"
        with self._features_lock:
            if getattr(agent, attr) is None:
                from smartsam.models import default_features, load_features

                name = (self.settings.features if kind == "image" else self.settings.text_features) or \
                    default_features(kind, agent.backbone.random_weights)
                setattr(agent, attr, load_features(name, self.settings.device))
        return getattr(agent, attr)

    def model_version(self) -> str:
        bb = self.agent.backbone.name if self.agent else (self.settings.backbone or "default")
        return f"smartsam-{__version__}-{bb}"

    def reference(self, project: str, label: str) -> Tuple[Optional[Reference], Optional[str]]:
        """(reference or None, note): a damaged stored reference is reported, not used."""
        try:
            ref = self.store.get(project, label)
        except CorruptReference as e:
            log.error("project %s label %r: %s; answering without it", project, label, e)
            return None, f"stored reference for {label!r} is damaged ({e}); set it again"
        if ref is None:
            return None, None
        feats = self.features("text" if ref.kind == "text" else "image")
        if ref.extractor != feats.name:
            return None, f"reference for {label!r} was made with {ref.extractor}, this backend uses {feats.name}; set it again"
        return ref, None

    def make_reference(self, image: np.ndarray, mask: Optional[np.ndarray] = None, text: Optional[str] = None) -> Reference:
        agent = self.ready_agent()
        if text is not None:
            self.features("text")
            with self.lock:
                return agent.reference_from_text(text)
        self.features("image")
        with self.lock:
            return agent.reference_from_mask(image, mask) if mask is not None else agent.reference_from_image(image)


# -- helpers ---------------------------------------------------------------------------------
def project_key(project) -> str:
    """Label Studio sends "<id>.<created-timestamp>"; references are kept per project id."""
    if project is None or project == "":
        raise RequestError("the request names no project")
    return str(project).split(".")[0]


def _pct_to_px(v: float, size: int) -> float:
    return float(v) / 100.0 * size


def mask_to_rle(mask: np.ndarray) -> List[int]:
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(np.where(mask, 255, 0).astype(np.uint8))


def brush_mask(region: Dict, image_hw: Tuple[int, int]) -> np.ndarray:
    """The ``(H, W)`` bool mask of a Label Studio brush region, at the size of our image.

    The RLE is at the size Label Studio saw (``original_width/height``); it is resized (nearest)
    when that differs from the image as we decoded it.
    """
    import cv2
    from label_studio_sdk.converter.brush import decode_rle

    h, w = image_hw
    oh, ow = int(region.get("original_height") or h), int(region.get("original_width") or w)
    mask = decode_rle(region["value"]["rle"]).reshape(oh, ow, 4)[:, :, 3] > 0
    if mask.shape != (h, w):
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return mask


class SmartSAMBackend(LabelStudioMLBase):
    """``label-studio-ml`` model: interactive clicks, pre-labeling and reference events."""

    def __init__(self, label_config=None, train_output=None, engine: Optional[Engine] = None, **kwargs):
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        self.engine = engine or Engine.instance()

    # -- predict ---------------------------------------------------------------------------
    def predict(self, tasks, context=None, project=None, **kwargs) -> List[Dict]:
        """One entry per task: ``{"result": [...], "score", "model_version", "mode"}``. An
        interactive request that fails gets an empty result with its reason in ``errors``; a
        pre-labeling task that cannot be labelled gets ``[]`` (no prediction). Every reason is also
        in ``self.errors`` and the log."""
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("the request has no tasks")
        cfg = LabelConfig.parse(self.parsed_label_config)
        proj = project_key(project)
        interactive = bool(context and context.get("result"))
        out: List = []
        self.errors: List[str] = []
        for task in tasks:
            tid = task.get("id") if isinstance(task, dict) else None
            try:
                pred = self._interactive(task, context["result"], cfg, proj) if interactive else self._prelabel(task, cfg, proj)
                self.errors.extend(f"task {tid}: {m}" for m in pred.get("errors", []))
                out.append(pred)
            except (RequestError, ImageFetchError, InvalidClick, ValueError) as e:
                log.warning("project %s task %s: %s", proj, tid, e)
                self.errors.append(f"task {tid}: {e}")
                if interactive:
                    out.append({"result": [], "score": 0.0, "model_version": self.engine.model_version(), "errors": [str(e)]})
                else:
                    # An empty list is "no prediction for this task" to Label Studio: nothing is
                    # stored, so a task without a reference shows no empty prediction tab.
                    out.append([])
        return out

    def _image(self, task, cfg: LabelConfig) -> np.ndarray:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise RequestError("a task has no data")
        ref = task["data"].get(cfg.image_key)
        if not ref:
            raise RequestError(f"task {task.get('id')} has no image in data.{cfg.image_key}")
        return self.engine.fetcher.fetch(ref)

    def _interactive(self, task, context_result, cfg: LabelConfig, proj: str) -> Dict:
        if not isinstance(context_result, list):
            raise RequestError("context.result must be a list of regions")
        image = self._image(task, cfg)
        h, w = image.shape[:2]
        points, labels, box, label = [], [], None, None
        for r in context_result:
            if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
                raise RequestError("a context region has no value")
            v, kind = r["value"], r.get("type", "")
            ow, oh = r.get("original_width") or w, r.get("original_height") or h
            try:
                # percentages of the image as the annotator sees it, scaled to our pixels
                x, y = _pct_to_px(v["x"], w), _pct_to_px(v["y"], h)
            except (KeyError, TypeError, ValueError):
                raise RequestError("a context region has no numeric x/y") from None
            if (ow, oh) != (w, h):
                log.info("task %s: Label Studio sees %sx%s, image is %sx%s; scaling", task.get("id"), ow, oh, w, h)
            if kind == "keypointlabels":
                points.append((x, y))
                positive = r.get("is_positive", True) is not False
                labels.append(1 if positive else 0)
                if v.get("keypointlabels") and (positive or label is None):
                    label = v["keypointlabels"][0]  # the newest positive keypoint's label wins
            elif kind == "rectanglelabels":
                try:
                    box = (x, y, x + _pct_to_px(v["width"], w), y + _pct_to_px(v["height"], h))
                except (KeyError, TypeError, ValueError):
                    raise RequestError("a rectangle has no numeric width/height") from None
                if v.get("rectanglelabels"):
                    label = v["rectanglelabels"][0]
            else:
                raise RequestError(f"unsupported prompt type {kind!r}: use the smart KeyPointLabels or RectangleLabels")
        if label is None:
            label = cfg.brush_labels[0] if len(cfg.brush_labels) == 1 else None
        if label is None:
            raise RequestError("the prompt carries no label: pick a keypoint label before clicking")
        if label not in cfg.brush_labels:
            raise RequestError(f"label {label!r} is not among the BrushLabels {cfg.brush_labels}: give both tags the same labels")
        if box is None and 1 not in labels:
            raise RequestError("only negative clicks: click the object once (without Alt) first")
        ref, note = self.engine.reference(proj, label) if box is None else (None, None)
        agent = self.engine.ready_agent()
        with self.engine.lock:
            agent.set_image(image)
            if box is not None:
                res = agent.predict_box(box, points, labels)
            elif len(points) == 1:
                res = agent.predict(points[0], ref)
            else:
                # outer interaction: the agent's answer for the first positive click (cached), refined
                res = agent.refine(points, labels, agent.predict(points[labels.index(1)], ref))
        log.info("project %s task %s label %r: %s, %d clicks, score %.3f, %.2f s", proj, task.get("id"), label,
                 res.mode, len(points), res.score, res.timings.get("total", 0))
        return self._prediction(res, cfg, label, w, h, note)

    def _prediction(self, res: AgentResult, cfg: LabelConfig, label: str, w: int, h: int, note: Optional[str]) -> Dict:
        result = {
            "from_name": cfg.brush_name, "to_name": cfg.image_name, "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(res.mask), "brushlabels": [label]},
            "score": round(float(res.score), 4),
        }
        pred = {"result": [result], "score": round(float(res.score), 4), "model_version": self.engine.model_version(),
                "mode": res.mode}
        if res.similarity is not None:
            pred["similarity"] = round(float(res.similarity), 4)
        if self.engine.agent and self.engine.agent.backbone.random_weights:
            pred["note"] = "RANDOM weights (test configuration)"
        if note:
            pred["errors"] = [note]
        return pred

    def _prelabel(self, task, cfg: LabelConfig, proj: str) -> Dict:
        """No click: for each label with a reference, find the object and segment it."""
        refs = {}
        reasons = []
        for label in cfg.brush_labels:
            ref, note = self.engine.reference(proj, label)
            if ref is not None:
                refs[label] = ref
            else:
                reasons.append(note or f"no reference for label {label!r}: set one to pre-label it")
        if not refs:
            raise RequestError("; ".join(reasons))
        image = self._image(task, cfg)
        h, w = image.shape[:2]
        agent = self.engine.ready_agent()
        results, scores = [], []
        for label, ref in refs.items():
            extractor = self.engine.features("text" if ref.kind == "text" else "image")
            with self.engine.lock:
                key = agent.set_image(image)
                click = locate(extractor, image, ref, key)
                res = agent.predict(click, ref)
            pred = self._prediction(res, cfg, label, w, h, None)
            results.extend(pred["result"])
            scores.append(res.score)
        out = {"result": results, "score": round(float(np.mean(scores)), 4), "model_version": self.engine.model_version(),
               "mode": "prelabel"}
        if reasons:
            out["errors"] = reasons
            log.info("project %s task %s: %s", proj, task.get("id"), "; ".join(reasons))
        return out

    # -- events ----------------------------------------------------------------------------
    def process_event(self, event, data, job_id=None, additional_params=None):
        """ANNOTATION_CREATED / ANNOTATION_UPDATED: the first confirmed mask of a label becomes its
        reference; one submitted with "Use as reference" ticked replaces it."""
        if event not in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            return {"ignored": event}
        ann, task, project = data.get("annotation"), data.get("task"), data.get("project")
        if not isinstance(ann, dict) or not isinstance(task, dict):
            raise RequestError(f"{event} without annotation and task (turn on 'send payload' for the webhook)")
        proj = project_key(project.get("id") if isinstance(project, dict) else project or task.get("project"))
        cfg = LabelConfig.parse(self.parsed_label_config)
        results = ann.get("result") or []
        force = any(r.get("type") == "choices" and REFERENCE_CHOICE in (r.get("value", {}).get("choices") or [])
                    for r in results if isinstance(r, dict))
        brushes = [r for r in results if isinstance(r, dict) and r.get("type") == "brushlabels" and r.get("value", {}).get("rle")]
        if not brushes:
            return {"reference": None, "reason": "no brush region in the annotation"}
        image = None
        done = []
        for r in brushes:
            label = (r["value"].get("brushlabels") or [None])[0]
            if label is None:
                continue
            if not force and self.engine.store.meta(proj, label) is not None:
                continue
            if image is None:
                image = self._image(task, cfg)
            mask = brush_mask(r, image.shape[:2])
            if not mask.any():
                continue
            ref = self.engine.make_reference(image, mask)
            source = {"event": event, "task": task.get("id"), "annotation": ann.get("id"), "forced": force}
            if self.engine.store.put(proj, label, ref, source, mask=mask, only_if_absent=not force):
                done.append(label)
        return {"reference": done}

    def fit(self, tasks, workdir=None, **kwargs):
        return {}
