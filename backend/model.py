"""The ML backend model: Label Studio requests in, SmartSAM answers out.

One :class:`Engine` per process holds the models (loaded once, in the background, so ``/setup``
answers at once), the image fetcher and the reference store. :class:`SmartSAMBackend` is the
``label-studio-ml`` model class Label Studio's protocol is written against; it only translates.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from label_studio_ml.model import LabelStudioMLBase

from smartsam import __version__
from smartsam.agent import AgentResult, InvalidClick, SmartSAMAgent, locate
from smartsam.selector import Reference

from .config import Settings
from .images import ImageFetcher, ImageFetchError
from .field_stats import FieldStats, draw_plain
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


def check_label_config(xml: str) -> List[str]:
    """What a labeling config lacks for SmartSAM, as sentences (empty when it is usable): an Image,
    a smart KeyPointLabels or RectangleLabels on it (the prompts), and a BrushLabels on it whose
    labels cover the prompt labels (the answers)."""
    if not isinstance(xml, str) or not xml.strip():
        return ["no labeling config was sent"]
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        return [f"the labeling config is not valid XML ({e})"]
    tags = list(root.iter())
    images = {t.get("name") for t in tags if t.tag == "Image" and t.get("name")}
    if not images:
        return ["no <Image> tag: SmartSAM segments images"]

    def labels(t):
        return {c.get("value") for c in t if c.tag == "Label" and c.get("value")}

    brushes = [t for t in tags if t.tag == "BrushLabels" and t.get("toName") in images]
    prompts = [t for t in tags if t.tag in ("KeyPointLabels", "RectangleLabels") and t.get("toName") in images]
    smart = [t for t in prompts if (t.get("smart") or t.get("smartOnly") or "").lower() == "true"]
    problems = []
    if not brushes:
        problems.append("no <BrushLabels> on the image: SmartSAM answers with brush masks")
    if not smart:
        problems.append('no smart <KeyPointLabels> or <RectangleLabels> (smart="true") on the image: the clicks that '
                        "reach the backend come from smart tools")
    if brushes and smart:
        missing = set().union(*(labels(t) for t in smart)) - set().union(*(labels(t) for t in brushes))
        if missing:
            problems.append(f"prompt labels {sorted(missing)} have no BrushLabels label of the same name: give both tags "
                            f"the same labels")
    return problems


# -- engine ----------------------------------------------------------------------------------
class Busy(RequestError):
    """The model stayed busy past the request's deadline."""


class Engine:
    """Per-process models and state. Build with :meth:`instance`; models load in a thread."""

    _instance: Optional["Engine"] = None
    _instance_lock = threading.Lock()

    def __init__(self, settings: Optional[Settings] = None) -> None:
        self.settings = settings or Settings()
        self.store = ReferenceStore(self.settings.data_dir, exemplars=self.settings.exemplars)
        self.stats = FieldStats(self.settings.data_dir, self.settings.stats_max)
        self.fetcher = ImageFetcher(self.settings)
        self.lock = threading.Lock()  # the models serve one request at a time
        self.agent: Optional[SmartSAMAgent] = None
        self.load_error: Optional[str] = None
        self._loaded = threading.Event()
        self._features_lock = threading.Lock()
        self._checkpoint_tag: Optional[str] = None
        self.jobs = None  # backend.jobs.Jobs, started with the server (webhook events, background pre-labels)

    @classmethod
    def instance(cls) -> "Engine":
        with cls._instance_lock:
            if cls._instance is None:
                from .jobs import Jobs

                cls._instance = Engine()
                cls._instance.jobs = Jobs(cls._instance)
                cls._instance.start_loading()
            return cls._instance

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="smartsam-load", daemon=True).start()

    def _load(self) -> None:
        from smartsam.models import ModelError, load_backbone

        s = self.settings
        try:
            # files left by a crash between a file and its row, or by a write that changed nothing
            n = self.store.collect_garbage()
            if n:
                log.info("reference store: removed %d unused files", n)
        except OSError as e:
            log.warning("reference store garbage collection failed: %s", e)
        try:
            bb = load_backbone(s.backbone, s.checkpoint, s.device, cache_size=s.embedding_cache)
            from smartsam.clickers import NextChainClicker

            from smartsam.agent import agent_options

            # SMARTSAM_FAST_PATH and SMARTSAM_REQUIRE_CLICK: the same settings as the CLI and eval
            self.agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=s.chain_length), seed=s.seed,
                                       **agent_options(reference_prep=s.reference_prep))
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

    @contextlib.contextmanager
    def model(self, deadline: Optional[float] = None) -> Iterator[SmartSAMAgent]:
        """The agent, held for one request; waits for it no longer than ``deadline``
        (``time.monotonic()``), then raises Busy."""
        agent = self.ready_agent(max(0.0, (deadline or time.monotonic() + 300) - time.monotonic()))
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.lock.acquire(timeout=wait):
            raise Busy(f"the model stayed busy past this request's time limit (SMARTSAM_REQUEST_TIMEOUT="
                       f"{self.settings.request_timeout:g} s); try again")
        try:
            yield agent
        finally:
            self.lock.release()

    def health(self) -> Dict:
        """Never waits for the model: it answers at once even while clicks are running."""
        bb = self.agent.backbone if self.agent else None
        loading = not self._loaded.is_set()
        out = {
            "status": "ERROR" if self.load_error else "UP",
            "model": bb.name if bb else (self.settings.backbone or "default"),
            "device": str(bb.device) if bb else None,
            "weights_loaded": bb is not None,
            "loading": loading,
            "random_weights": bool(bb and bb.random_weights),
            "load_error": self.load_error,
            "encoder_calls": bb.encoder_calls if bb else 0,
            "decoder_calls": bb.decoder_calls if bb else 0,
            "embedding_disk_hits": bb.disk_hits if bb else 0,
            "version": __version__,
        }
        if self.jobs is not None:
            out["jobs"] = self.jobs.state()
        return out

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

    def checkpoint_tag(self) -> str:
        """Short digest of the weights in use, so a new checkpoint gives a new model version."""
        if self._checkpoint_tag is None:
            self._checkpoint_tag = checkpoint_tag(self.settings)
        return self._checkpoint_tag

    def model_version(self, project=None) -> str:
        """``smartsam-<version>-<backbone>-<weights digest>[-<references digest>]``: changes when the
        checkpoint or the project's references change, so Label Studio and the pre-labeler never
        keep predictions made for an old reference as current."""
        backbone = self.agent.backbone.name if self.agent else (self.settings.backbone or _default_backbone())
        v = f"smartsam-{__version__}-{backbone}-{self.checkpoint_tag()}"
        if project is not None and project != "":
            v += f"-{references_digest(self.store, project_key(project))}"
        return v

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
        if text is not None:
            self.features("text")
            with self.model() as agent:
                return agent.reference_from_text(text)
        self.features("image")
        with self.model() as agent:
            return agent.reference_from_mask(image, mask) if mask is not None else agent.reference_from_image(image)


def _default_backbone() -> str:
    from smartsam.models import default_backbone

    return default_backbone()


_TAG_CACHE: Dict[tuple, str] = {}


def checkpoint_tag(settings: Settings) -> str:
    """8 hex digits naming the weights: the published or recorded SHA-256 of the checkpoint, the
    hash of a local checkpoint file (computed once per file version), or "random"."""
    from smartsam.models import ModelError, checkpoint_path, get_spec, sha256_file

    try:
        spec = get_spec(settings.backbone or _default_backbone())
    except ModelError:
        return "unknown"
    if spec.random:
        return "random"
    path = settings.checkpoint or str(checkpoint_path(spec))
    try:
        st = os.stat(path)
    except OSError:
        return (spec.sha256 or "missing")[:8]
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _TAG_CACHE:
        if not settings.checkpoint and spec.sha256:
            _TAG_CACHE[key] = spec.sha256[:8]  # verified against it before loading
        else:
            _TAG_CACHE[key] = sha256_file(path)[:8]
    return _TAG_CACHE[key]


def references_digest(store: ReferenceStore, project: str) -> str:
    """8 hex digits over the project's references (labels and their stored features); "noref" when none."""
    refs = store.list(project)
    if not refs:
        return "noref"
    h = hashlib.sha256()
    for r in refs:
        h.update(f"{r.label}\0{r.kind}\0{r.feature_sha}\0".encode())
    return h.hexdigest()[:8]


# -- helpers ---------------------------------------------------------------------------------
def project_key(project) -> str:
    """Label Studio sends "<id>.<created-timestamp>"; references are kept per project id."""
    if project is None or project == "":
        raise RequestError("the request names no project")
    return str(project).split(".")[0]


def _pct_to_px(v: float, size: int) -> float:
    """Label Studio's percent of the displayed image -> our pixel coordinate. 100 % (the right or
    bottom edge, which Label Studio allows) is the last pixel; beyond it stays outside."""
    px = float(v) / 100.0 * size
    return min(px, size - 1) if size - 1 < px <= size else px


def mask_to_rle(mask: np.ndarray) -> List[int]:
    from label_studio_sdk.converter.brush import mask2rle

    return mask2rle(np.where(mask, 255, 0).astype(np.uint8))


def _size(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) <= 0:
        raise RequestError(f"{what} must be a positive whole number, got {v!r}")
    return int(v)


def _is_byte(b) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255


def brush_mask(region: Dict, image_hw: Tuple[int, int], max_pixels: Optional[int] = None) -> np.ndarray:
    """The ``(H, W)`` bool mask of a Label Studio brush region, at the size of our image.

    The RLE is at the size Label Studio saw (``original_width/height``); it is resized (nearest)
    when that differs from the image as we decoded it. Nothing is decoded before the RLE's header
    agrees with that size and the size is within ``max_pixels`` (SMARTSAM_MAX_PIXELS): a small
    body cannot ask for a large allocation. Bad input raises RequestError.
    """
    import cv2
    from label_studio_sdk.converter.brush import decode_rle

    from smartsam.io import MAX_PIXELS

    max_pixels = max_pixels or MAX_PIXELS
    h, w = image_hw
    value = region.get("value") if isinstance(region, dict) else None
    rle = value.get("rle") if isinstance(value, dict) else None
    if not isinstance(rle, list) or len(rle) < 5:
        raise RequestError("a brush region has no RLE list")
    oh = _size(region.get("original_height") or h, "original_height")
    ow = _size(region.get("original_width") or w, "original_width")
    if ow * oh > max_pixels:
        raise RequestError(f"a brush region of {ow}x{oh} is over the limit of {max_pixels} pixels (SMARTSAM_MAX_PIXELS)")
    if not all(map(_is_byte, rle[:4])):
        raise RequestError("a brush RLE must be a list of bytes (0-255)")
    claimed = int.from_bytes(bytes(rle[:4]), "big")  # the header's element count (RGBA values)
    if claimed != ow * oh * 4:
        raise RequestError(f"a brush RLE claims {claimed} values, not the {ow}x{oh}x4 of its region")
    if not all(map(_is_byte, rle)):  # the header first: a bad size is refused before this pass
        raise RequestError("a brush RLE must be a list of bytes (0-255)")
    try:
        mask = decode_rle(rle).reshape(oh, ow, 4)[:, :, 3] > 0
    except (ValueError, IndexError, TypeError) as e:
        raise RequestError(f"a brush RLE is malformed ({type(e).__name__})") from None
    if mask.shape != (h, w):
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return mask


class SmartSAMBackend(LabelStudioMLBase):
    """``label-studio-ml`` model: interactive clicks, pre-labeling and reference events."""

    def __init__(self, label_config=None, train_output=None, engine: Optional[Engine] = None, **kwargs):
        super().__init__(label_config=label_config, train_output=train_output, **kwargs)
        self.engine = engine or Engine.instance()
        self.errors: List[str] = []
        self.version = self.engine.model_version()

    # -- predict ---------------------------------------------------------------------------
    def predict(self, tasks, context=None, project=None, deadline: Optional[float] = None,
                budget: Optional[float] = None, **kwargs) -> List:
        """One entry per task: ``{"result": [...], "score", "model_version", "mode"}``. An
        interactive request that fails gets an empty result with its reason in ``errors``; a
        pre-labeling task that cannot be labelled gets ``[]`` (no prediction). Every reason is also
        in ``self.errors`` and the log.

        Args:
            deadline: ``time.monotonic()`` by which this request must answer (fetch, model, agent).
            budget: pre-labeling several tasks: after this many seconds the tasks not done yet
                are handed to the background queue (they get ``[]`` here and are written to
                Label Studio when done).
        """
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("the request has no tasks")
        cfg = LabelConfig.parse(self.parsed_label_config)
        proj = project_key(project)
        # one model version per request: it reads the project's references from the store
        self.version = self.engine.model_version(proj)
        interactive = bool(context and context.get("result"))
        deadline = deadline or time.monotonic() + self.engine.settings.request_timeout
        stop_at = min(deadline, time.monotonic() + budget) if budget else deadline
        out: List = []
        self.errors = []
        leftover: List[Dict] = []
        jobs = self.engine.jobs
        for task in tasks:
            tid = task.get("id") if isinstance(task, dict) else None
            if not interactive and len(tasks) > 1 and jobs is not None:
                if jobs.pending(proj, tid):
                    out.append([])  # already queued in the background: it will be written once
                    continue
                if time.monotonic() >= stop_at:
                    leftover.append(task)
                    out.append([])
                    continue
            try:
                if interactive:
                    pred = self._interactive(task, context["result"], cfg, proj, deadline)
                else:
                    pred = self._prelabel(task, cfg, proj, deadline)
                self.errors.extend(f"task {tid}: {m}" for m in pred.get("errors", []))
                out.append(pred)
            except (RequestError, ImageFetchError, InvalidClick, ValueError) as e:
                log.warning("project %s task %s: %s", proj, tid, e)
                self.errors.append(f"task {tid}: {e}")
                if interactive:
                    out.append({"result": [], "score": 0.0, "model_version": self.version, "errors": [str(e)]})
                else:
                    # An empty list is "no prediction for this task" to Label Studio: nothing is
                    # stored, so a task without a reference shows no empty prediction tab.
                    out.append([])
        if leftover:
            n = jobs.submit(proj, leftover, self.label_config)
            msg = f"{n} of {len(tasks)} tasks continue in the background (SMARTSAM_PREDICT_BUDGET); see /health jobs"
            log.info("project %s: %s", proj, msg)
            self.errors.append(msg)
        return out

    def _image(self, task, cfg: LabelConfig, deadline: Optional[float] = None) -> np.ndarray:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise RequestError("a task has no data")
        ref = task["data"].get(cfg.image_key)
        if not ref:
            raise RequestError(f"task {task.get('id')} has no image in data.{cfg.image_key}")
        tid = task.get("id")
        return self.engine.fetcher.fetch(ref, task_id=tid if isinstance(tid, int) and not isinstance(tid, bool) else None,
                                         deadline=deadline)

    def _interactive(self, task, context_result, cfg: LabelConfig, proj: str, deadline: float) -> Dict:
        if not isinstance(context_result, list):
            raise RequestError("context.result must be a list of regions")
        image = self._image(task, cfg, deadline)
        h, w = image.shape[:2]
        points, labels, box, label, shown = [], [], None, None, None
        for r in context_result:
            if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
                raise RequestError("a context region has no value")
            v, kind = r["value"], r.get("type", "")
            if shown is None and r.get("original_width") and r.get("original_height"):
                shown = (_size(r["original_width"], "original_width"), _size(r["original_height"], "original_height"))
            try:
                # percentages of the image as the annotator sees it, scaled to our pixels
                x, y = _pct_to_px(v["x"], w), _pct_to_px(v["y"], h)
            except (KeyError, TypeError, ValueError):
                raise RequestError("a context region has no numeric x/y") from None
            if kind == "keypointlabels":
                points.append((x, y))
                positive = r.get("is_positive", True) is not False
                labels.append(1 if positive else 0)
                if v.get("keypointlabels") and (positive or label is None):
                    label = v["keypointlabels"][0]  # the newest positive keypoint's label wins
            elif kind == "rectanglelabels":
                try:
                    box = (x, y, _edge(float(v["x"]) + float(v["width"]), w), _edge(float(v["y"]) + float(v["height"]), h))
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
        s = self.engine.settings
        first = labels.index(1) if box is None else None
        # SMARTSAM_COMPARE: a seeded share of first clicks goes to plain SAM; the draw depends on
        # the first click only, so the chain's later requests stay in the same arm
        plain = first is not None and draw_plain(s.seed, s.compare_share, proj, task.get("id"), label, points[first])
        t0 = time.monotonic()
        with self.engine.model(deadline) as agent:
            agent.set_image(image)
            if box is not None:
                res = agent.predict_box(box, points, labels)
            elif plain:
                res = agent.predict_plain(points[first])
            else:
                res = agent.predict(points[first], ref, deadline=deadline)
                # outer interactions, the ordinary SAM way: each further click refines the previous
                # answer's logits with every click so far
                for k in range(first + 1, len(points)):
                    res = agent.refine(points[: k + 1], labels[: k + 1], res)
        log.info("project %s task %s label %r: %s, %d clicks, score %.3f, %.2f s%s", proj, task.get("id"), label,
                 res.mode, len(points), res.score, res.timings.get("total", 0), " (cut at the deadline)" if res.partial else "")
        pred, shown_mask = self._prediction(res, cfg, label, w, h, note, proj, shown)
        if plain:
            pred["arm"] = "plain"  # the first answer came from plain SAM (SMARTSAM_COMPARE)
        self._record(proj, task, label, res.mode, "plain" if plain else "smartsam",
                     len(points) + (box is not None), time.monotonic() - t0, shown_mask)
        return pred

    def _record(self, proj: str, task, label: str, mode: str, arm: str, clicks: int, seconds: float,
                mask: np.ndarray) -> None:
        """Field statistics: one suggestion served, ``mask`` as Label Studio shows it (never fails
        the request)."""
        try:
            self.engine.stats.record(proj, task.get("id"), label, mode, arm, clicks, seconds, mask, self.version)
        except Exception as e:  # statistics must not cost an annotator an answer
            log.warning("field statistics: suggestion not recorded (%s)", e)

    def _prediction(self, res: AgentResult, cfg: LabelConfig, label: str, w: int, h: int, note: Optional[str], proj: str,
                    shown: Optional[Tuple[int, int]] = None) -> Tuple[Dict, np.ndarray]:
        """The prediction Label Studio stores, and its mask at the displayed size (what the RLE says)."""
        mask = res.mask
        if shown is not None and shown != (w, h):
            # the RLE must be at the size Label Studio displays, or the brush comes out garbled
            import cv2

            from smartsam.io import MAX_PIXELS

            if shown[0] * shown[1] > MAX_PIXELS:
                raise RequestError(f"Label Studio's displayed size {shown[0]}x{shown[1]} is over SMARTSAM_MAX_PIXELS")
            log.info("Label Studio shows %dx%d, the image decodes as %dx%d: mask resized", shown[0], shown[1], w, h)
            mask = cv2.resize(mask.astype(np.uint8), shown, interpolation=cv2.INTER_NEAREST) > 0
            w, h = shown
        result = {
            "from_name": cfg.brush_name, "to_name": cfg.image_name, "type": "brushlabels",
            "original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
            "score": round(float(res.score), 4),
        }
        pred = {"result": [result], "score": round(float(res.score), 4), "model_version": self.version,
                "mode": res.mode, "path": res.path}
        if self.engine.agent is not None and res.mode.startswith("reference"):
            pred["require_click"] = self.engine.agent.require_click
        if res.similarity is not None:
            pred["similarity"] = round(float(res.similarity), 4)
        if res.partial:
            pred["partial"] = True
            note = "; ".join(x for x in (note, "the agent was cut short at SMARTSAM_REQUEST_TIMEOUT: best answer so far") if x)
        if self.engine.agent and self.engine.agent.backbone.random_weights:
            pred["note"] = "RANDOM weights (test configuration)"
        if note:
            pred["errors"] = [note]
        return pred, mask

    def _prelabel(self, task, cfg: LabelConfig, proj: str, deadline: Optional[float] = None) -> Dict:
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
        image = self._image(task, cfg, deadline)
        h, w = image.shape[:2]
        results, scores = [], []
        for label, ref in refs.items():
            extractor = self.engine.features("text" if ref.kind == "text" else "image")
            with self.engine.model(deadline) as agent:
                key = agent.set_image(image)
                click = locate(extractor, image, ref, key)
                t0 = time.monotonic()
                res = agent.predict(click, ref, deadline=deadline)
            pred, shown_mask = self._prediction(res, cfg, label, w, h, None, proj)
            self._record(proj, task, label, "prelabel", "prelabel", 0, time.monotonic() - t0, shown_mask)
            results.extend(pred["result"])
            scores.append(res.score)
        out = {"result": results, "score": round(float(np.mean(scores)), 4), "model_version": self.version,
               "mode": "prelabel"}
        if reasons:
            out["errors"] = reasons
            log.info("project %s task %s: %s", proj, task.get("id"), "; ".join(reasons))
        return out

    # -- references from annotations -------------------------------------------------------
    def apply_annotation(self, ann: Dict, task: Dict, proj: str, event: str) -> Dict:
        """Reference rules for one annotation *as Label Studio holds it* (read back by id, never
        taken from a webhook body). The README's table:

        - a skipped annotation (``was_cancelled``) changes nothing;
        - each label's mask is its first brush region in the annotation (:func:`first_regions`,
          the same rule on every path);
        - a label with a free exemplar slot takes the mask (the first K submitted, K = 1 by default);
        - the annotation a reference came from updates it when edited (and withdraws it when the
          label's mask is removed from it);
        - "Use as reference" acts when it becomes ticked (the transition), replacing the label's
          references; an annotation that stays ticked changes nothing on later edits.
        """
        cfg = LabelConfig.parse(self.parsed_label_config)
        aid = ann.get("id")
        if ann.get("was_cancelled"):
            return {"reference": [], "reason": "skipped annotation"}
        results = [r for r in (ann.get("result") or []) if isinstance(r, dict)]
        ticked = any(r.get("type") == "choices" and REFERENCE_CHOICE in ((r.get("value") or {}).get("choices") or [])
                     for r in results)
        store = self.engine.store
        force = ticked and not store.annotation_forced(aid)
        first = first_regions(results)
        image = None
        done = []
        for label, r in first.items():
            cur = store.current(proj, label)
            own = any(m.annotation == aid for m in cur)
            if not (force or own or len(cur) < store.exemplars):
                continue
            if image is None:
                image = self._image(task, cfg)
            mask = brush_mask(r, image.shape[:2])
            if not mask.any():
                continue
            ref = self.engine.make_reference(image, mask)
            how = "forced" if force else ("edited" if own else "first")
            source = {"event": event, "task": task.get("id"), "annotation": aid, "forced": force,
                      "user": ann.get("completed_by"), "prep": self.engine.settings.reference_prep}
            if store.put(proj, label, ref, source, mask=mask, image=image, annotation=aid, how=how,
                         policy="replace" if force else "auto") is not None:
                done.append(label)
        for m in store.list(proj):
            if m.annotation == aid and m.label not in first:
                # the annotator removed this label's mask from the annotation the reference came from
                store.withdraw_annotation(aid, "mask removed from the annotation in Label Studio", proj, m.label)
                done.append(m.label)
        store.set_annotation_forced(aid, proj, ticked)
        if not first:
            return {"reference": done, "reason": "no brush region in the annotation"}
        return {"reference": done}

    def observe_annotation(self, ann: Dict, task: Dict, proj: str) -> List[Dict]:
        """Field statistics: match the annotation's brush regions (as Label Studio holds them) to
        the suggestions served for its task; a skipped annotation counts for nothing."""
        aid = ann.get("id")
        if ann.get("was_cancelled"):
            self.engine.stats.forget(aid)
            return []
        regions = []
        for k, label, r in brush_regions(ann.get("result") or []):
            try:
                hw = (_size(r.get("original_height"), "original_height"), _size(r.get("original_width"), "original_width"))
                mask = brush_mask(r, hw)  # bounded by SMARTSAM_MAX_PIXELS before decoding
            except (RequestError, ValueError) as e:
                log.warning("annotation %s region %s: not counted in the statistics (%s)", aid, r.get("id"), e)
                continue
            regions.append((str(r.get("id") or k), label, mask))
        lead = ann.get("lead_time")
        return self.engine.stats.observe(proj, task.get("id"), aid, regions,
                                         lead_time=lead if isinstance(lead, (int, float)) and lead > 0 else None,
                                         user=ann.get("completed_by"))

    def fit(self, tasks, workdir=None, **kwargs):
        return {}


def brush_regions(results: List[Dict]) -> List[Tuple[int, str, Dict]]:
    """``(index in result, label, region)`` of each brush region with an RLE and a label, in Label
    Studio's order: what every reader of an annotation (references, statistics, evaluation) counts."""
    out = []
    for k, r in enumerate(results):
        if not isinstance(r, dict):
            continue
        v = r.get("value") if isinstance(r.get("value"), dict) else {}
        labels = v.get("brushlabels") if isinstance(v.get("brushlabels"), list) else []
        if r.get("type") == "brushlabels" and v.get("rle") and labels and isinstance(labels[0], str):
            out.append((k, labels[0], r))
    return out


def first_regions(results: List[Dict]) -> Dict[str, Dict]:
    """Label -> its first brush region in an annotation's result (Label Studio's order). One rule
    for several regions of one label, on every path (webhooks, the admin's "from task")."""
    first: Dict[str, Dict] = {}
    for _, label, r in brush_regions(results):
        first.setdefault(label, r)
    return first


def _edge(pct: float, size: int) -> float:
    """A rectangle's far edge in pixels, kept on the image (Label Studio allows 100 %)."""
    return min(_pct_to_px(pct, size), size - 1)
