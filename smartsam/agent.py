"""The SmartSAM agent: one click in, the mask the user meant out.

Data path (one module per stage)::

    click --sampler.py--> 10 prompts --backbone--> 30 initial masks
          --clickers.py--> 30 chains x 3 clicks --backbone (one batch per step)--> 90 refined masks
          --selector.py--> the chosen candidate --backbone.upsample--> (H, W) mask

Everything before the last step works on SAM's 256x256 low-resolution logits; only the chosen
mask is upsampled to image size. The stages run in :class:`~smartsam.batch.BatchEngine`, which
advances many clicks (jobs) at once; :meth:`SmartSAMAgent.predict` is a batch of one.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .backbones.base import Backbone, Prompt
from .batch import AnswerCache, BatchEngine, InvalidClick, Job, JobPolicy, check_click
from .clickers import NextChainClicker
from .features import ClipFeatures, DinoV2Features, FeatureSet
from .masks import REFERENCE_PREPS, best_of_three
from .reference import ReferenceBuilder
from .results import AgentResult, Candidate
from .sampler import PrioriInitialSampler
from .selector import Reference

log = logging.getLogger("smartsam")

__all__ = ["AgentResult", "Candidate", "InvalidClick", "Job", "SmartSAMAgent", "agent_options"]


# Fast path: chains whose initial mask overlaps a better-scored one by this IoU are not refined
# (0.95: at 0.9 the fast path chose the literal path's mask on 85 % of COCO_MVal clicks, at 0.95 on 95 %).
FAST_PATH_IOU = 0.95


def agent_options(fast_path: str = "auto", require_click: bool = True, reference_prep: str = "paper") -> Dict[str, object]:
    """The agent choices every entry point (CLI, backend, eval) names the same way, checked.

    Args:
        fast_path: "auto" (the paper's literal path, except on a CPU where it was measured over
            target, see :func:`fast_path_by_default`), "on" or "off".
        require_click: reference mode only lets candidates that contain the click win (an
            annotator's click then always lies on the answer, as in pure-IS mode; Eq. 2 of the
            paper takes the argmax over all candidates, and ``smartsam eval --allow-anywhere``
            measures the difference where real weights exist).
        reference_prep: "paper" or "none" (see :class:`~smartsam.reference.ReferenceBuilder`).
    Returns:
        keyword arguments for :class:`SmartSAMAgent` (``dedupe_iou``, ``require_click``,
        ``reference_prep``).
    """
    fp = (fast_path or "auto").strip().lower()
    if fp not in ("auto", "on", "off"):
        raise ValueError(f"SMARTSAM_FAST_PATH / --fast-path must be auto, on or off, not {fp!r}")
    prep = (reference_prep or "paper").strip().lower()
    if prep not in REFERENCE_PREPS:
        raise ValueError(f"SMARTSAM_REFERENCE_PREP / --reference-prep must be paper or none, not {prep!r}")
    return {"dedupe_iou": {"auto": "auto", "on": FAST_PATH_IOU, "off": None}[fp], "require_click": bool(require_click),
            "reference_prep": prep}


def fast_path_by_default(backbone: Backbone) -> bool:
    """Where ``auto`` takes the fast path: on a CPU, unless it decodes with what was measured to
    keep the paper's literal agent within the 2.5 s target there (bf16 hardware, AMX or AVX512-BF16,
    and the shared decoder of SAM 2.1 or SAM; README "Results", docs/results.md). On CUDA the
    literal agent is cheap."""
    dev = getattr(getattr(backbone, "device", None), "type", "cpu")
    if dev != "cpu":
        return False
    return not (getattr(backbone, "cpu_bf16", False) and getattr(backbone, "shared_decoder", False)
                and getattr(backbone, "literal_within_target_on_cpu", False))


def exploration_knobs(sampler: PrioriInitialSampler, clicker: NextChainClicker) -> Dict[str, object]:
    """The exploration's knobs (sampler and clicker) by the names evaluation outputs use."""
    return {"sampler": sampler.distribution, "points": sampler.num_points, "boxes": len(sampler.box_aspects),
            "beta": sampler.beta, "gamma_shape": sampler.gamma_shape, "clicker": clicker.placement,
            "chain_length": clicker.chain_length, "band_fraction": clicker.band_fraction,
            "band_percentile": clicker.band_percentile}


class SmartSAMAgent:
    """Explore-then-exploit segmentation from a single click.

    An agent is its settings, fixed when it is built (:attr:`policy`, a
    :class:`~smartsam.batch.JobPolicy`): :meth:`job` makes a click a :class:`~smartsam.batch.Job`,
    and a :class:`~smartsam.batch.BatchEngine` answers jobs (many at once) in stages: explore
    (initial prompts, multimask), chain steps (inner clicks, one decoder batch per step), select
    (pure-IS or reference), finish (upsample the chosen mask, provenance, timings).
    :meth:`predict` is a batch of one on the current image (:meth:`set_image`); :meth:`refine`,
    :meth:`predict_plain` and :meth:`predict_box` answer the outer interactions the plain SAM way.

    Args:
        backbone: a :class:`~smartsam.backbones.base.Backbone` (SAM or SAM 2.1).
        sampler: the Priori Initial Sampler (defaults: 6 points, 3 boxes).
        clicker: the Next Chain Clicker (default: chains of 3 clicks).
        image_features: DINOv2 extractor for image references (needed only for them).
        text_features: CLIP extractor for text references (needed only for them).
        features: instead of the two above, a :class:`~smartsam.features.FeatureSet` (which may
            load each extractor on first need).
        seed: the one seed; the same image, click and reference give the same mask.
        dedupe_iou: fast path. Chains whose initial mask overlaps an earlier, better-scored one
            by at least this IoU (on the low-res grid) are not refined: they would mostly
            repeat it. None runs every chain (the paper's literal path); "auto" (the default) is
            the literal path, except on a CPU without bf16 hardware or without the shared
            decoder (:func:`fast_path_by_default`), where the literal click measured over target.
        require_click: in reference mode, only candidates that contain the click may win.
        result_cache: how many recent answers to keep for outer interactions.
        reference_prep: how :meth:`reference_from_mask` prepares image + mask references
            ("paper" or "none", see :class:`~smartsam.reference.ReferenceBuilder`).
        chain_clicks: where a step runs: "host" (OpenCV places the chain clicks one chain at a
            time, the logits come to the host: the faster on a CPU) or "device" (the step stays
            on the backbone's device: clicks, band, signs, de-duplication and the click test as
            tensor work, :mod:`smartsam.chain_clicks` and :mod:`smartsam.device_masks`; one read
            back per stage and one per answer); the same answers either way.
    """

    def __init__(
        self,
        backbone: Backbone,
        sampler: Optional[PrioriInitialSampler] = None,
        clicker: Optional[NextChainClicker] = None,
        image_features: Optional[DinoV2Features] = None,
        text_features: Optional[ClipFeatures] = None,
        seed: int = 0,
        dedupe_iou: Union[float, None, str] = "auto",
        require_click: bool = True,
        result_cache: int = 32,
        reference_prep: str = "paper",
        features: Optional[FeatureSet] = None,
        chain_clicks: str = "host",
    ) -> None:
        if backbone is None:
            raise ValueError("an agent needs a backbone (references alone: smartsam.reference.ReferenceBuilder)")
        if chain_clicks not in ("host", "device"):
            raise ValueError(f"chain_clicks must be host or device, not {chain_clicks!r}")
        self.chain_clicks = chain_clicks
        self.backbone = backbone
        self.sampler = sampler or PrioriInitialSampler()
        self.clicker = clicker or NextChainClicker()
        self.features = features or FeatureSet(image_features, text_features)
        self.references = ReferenceBuilder(self.features, reference_prep)
        self.seed = int(seed)
        if dedupe_iou == "auto":
            dedupe_iou = FAST_PATH_IOU if fast_path_by_default(backbone) else None
        self.dedupe_iou = dedupe_iou
        self.require_click = bool(require_click)
        self.reference_prep = reference_prep
        # what every job of this agent is answered with (its settings are fixed from here on)
        self.policy = JobPolicy(backbone=backbone, sampler=self.sampler, clicker=self.clicker, features=self.features,
                                seed=self.seed, dedupe_iou=self.dedupe_iou, require_click=self.require_click,
                                chain_clicks=chain_clicks, answers=AnswerCache(result_cache))
        self._image: Optional[np.ndarray] = None
        self._key: Optional[str] = None

    @property
    def path(self) -> str:
        """"fast" or "literal": which agent runs (say it in every output)."""
        return "literal" if self.dedupe_iou is None else "fast"

    def knobs(self) -> Dict[str, object]:
        """Every exploration knob this agent runs with (named in evaluation outputs)."""
        return {**exploration_knobs(self.sampler, self.clicker), "path": self.path}

    @property
    def image_features(self):
        """The DINOv2 extractor if loaded (None otherwise)."""
        return self.features.loaded("image")

    @property
    def text_features(self):
        """The CLIP extractor if loaded (None otherwise)."""
        return self.features.loaded("text")

    # -- image -----------------------------------------------------------------------------
    def set_image(self, image: np.ndarray, key: Optional[str] = None) -> str:
        """Make ``image`` (``(H, W, 3)`` uint8 RGB) current; encodes it once (cached)."""
        self._key = self.backbone.set_image(image, key)
        self._image = np.asarray(image)
        return self._key

    def _check_click(self, xy: Sequence[float]) -> Tuple[float, float]:
        return check_click(xy, self.backbone.image_hw)

    # -- references (built by :class:`ReferenceBuilder`, with this agent's extractors) --------
    def reference_from_mask(self, image: np.ndarray, mask: np.ndarray) -> Reference:
        """Reference from an example image and a boolean ``(H, W)`` mask of the object."""
        return self.references.from_mask(image, mask)

    def reference_from_image(self, image: np.ndarray) -> Reference:
        """Reference from an example image alone (its CLS token)."""
        return self.references.from_image(image)

    def reference_from_text(self, text: str) -> Reference:
        """Reference from a text (CLIP)."""
        return self.references.from_text(text)

    # -- the agent -------------------------------------------------------------------------
    def predict(
        self,
        click_xy: Sequence[float],
        reference: Optional[Reference] = None,
        return_candidates: bool = False,
        deadline: Optional[float] = None,
    ) -> AgentResult:
        """Answer one positive click on the current image.

        Args:
            click_xy: ``(x, y)`` in image pixels.
            reference: optional :class:`~smartsam.selector.Reference`; None is pure-IS mode.
            return_candidates: also return every candidate (for explanations and evaluation).
            deadline: ``time.monotonic()`` after which no further chain step starts; the answer is
                then selected among the candidates explored so far and marked ``partial``.
        """
        if self._key is None:
            raise RuntimeError("call set_image() first")
        job = self.job(self._image, click_xy, self._key, reference, deadline, return_candidates)
        return answer_jobs([job], BatchEngine(self.backbone).run)[0]

    def job(self, image: np.ndarray, click_xy: Sequence[float], key: Optional[str] = None,
            reference: Optional[Reference] = None, deadline: Optional[float] = None,
            return_candidates: bool = False) -> Job:
        """One click on ``image`` as a :class:`~smartsam.batch.Job` for a
        :class:`~smartsam.batch.BatchEngine` (this agent's settings answer it); stateless: the
        agent's current image is not involved."""
        return Job(self.policy, image, click_xy, key, reference, deadline, return_candidates)

    def run_jobs(self, jobs: Sequence[Job]) -> List[AgentResult]:
        """Answer many jobs at once, in lockstep on this agent's backbone."""
        return BatchEngine(self.backbone).run(jobs)

    def refine(
        self,
        points: Sequence[Sequence[float]],
        labels: Sequence[int],
        previous: Optional[AgentResult] = None,
        reference: Optional[Reference] = None,
    ) -> AgentResult:
        """Outer interaction: more clicks after the agent's answer, the ordinary SAM way.

        Args:
            points: every click so far, ``(N, 2)`` ``(x, y)``; the first positive one is the
                click the agent answered.
            labels: ``(N,)``, 1 positive, 0 negative.
            previous: the agent's earlier answer; when None it is recomputed (same seed, so the
                same answer) from the first positive click.
            reference: passed to the agent when ``previous`` must be recomputed.
        """
        pts = [self._check_click(p) for p in points]
        lab = [int(v) for v in labels]
        if len(pts) != len(lab) or not pts:
            raise InvalidClick("refine needs as many labels as points, and at least one point")
        if any(v not in (0, 1) for v in lab):
            raise InvalidClick(f"click labels must be 0 or 1, got {lab}")
        if 1 not in lab:
            raise InvalidClick("at least one positive click is needed to say which object is meant")
        if previous is None:
            previous = self.predict(pts[lab.index(1)], reference)
        bb = self.backbone
        dec0 = bb.decoder_calls
        t0 = time.perf_counter()
        res = bb.predict([Prompt(np.asarray(pts, np.float32), np.asarray(lab), mask_input=previous.low_res_logits)], multimask=False)
        lg = res.low_res_logits[0, 0]
        mask = bb.upsample(lg[None])[0] > 0
        return AgentResult(
            mask=mask,
            score=float(res.scores[0, 0]),
            similarity=None,
            mode="refine",
            candidate=Candidate(-1, "refine", 0, len(pts) - 1, tuple((tuple(p), l) for p, l in zip(pts, lab)), float(res.scores[0, 0])),
            low_res_logits=lg.copy(),
            timings={"total": time.perf_counter() - t0},
            calls={"encoder": 0, "decoder": bb.decoder_calls - dec0, "features": 0},
            path=self.path,
        )

    def warm_up(self) -> Dict[str, object]:
        """Compile the backbone's decoder step (``SMARTSAM_COMPILE``) for the kinds of call this
        agent's clicks make, before anyone clicks: two clicks on two synthetic images in one
        batch (rows of one image and, where a pass mixes images, of several), a plain click and
        a box record them; then every row bucket of each is compiled. Afterwards no click
        compiles: a kind never seen (a longer chain, a refinement with many clicks) runs eager,
        counted. A compiler that fails leaves the step eager (logged, its reason in the
        counters). Nothing to do when the step is not compiled. Run it on the thread that will
        decode (CUDA graphs belong to the thread that records them).

        Returns:
            the compiled step's counters (:meth:`CompiledDecoder.health`), {} when not compiled.
        """
        step = self.backbone.compiled_step()
        if step is None:
            return {}
        images = []
        for k in range(2):  # an object on a background: chains that run their full length
            yy, xx = np.mgrid[0:384, 0:512]
            inside = (xx - 240 - 30 * k) ** 2 / 150 ** 2 + (yy - 190) ** 2 / (90 + 20 * k) ** 2 < 1
            img = np.stack([xx * 0.3, yy * 0.4, np.full_like(xx, 60)], -1).astype(np.uint8)
            img[inside] = (200, 60 + 40 * k, 40)
            images.append(img)
        try:
            with step.recording():
                self.run_jobs([self.job(im, (240.0, 190.0)) for im in images])
                self.set_image(images[0])
                self.predict_plain((240.0, 190.0))
                self.predict_box((120.0, 110.0, 380.0, 270.0))
            step.warm_buckets()
        except Exception as e:  # no C++ compiler, an operator the compiler does not take, ...
            step.fall_back(f"{type(e).__name__}: {e}")
            log.exception("the decoder step did not compile; it runs eager")
        return step.health()

    def predict_plain(self, click_xy: Sequence[float]) -> AgentResult:
        """Plain SAM at one click, no agent: the best-scored of the backbone's 3 masks (``mode``
        "plain"). The comparison arm of field statistics, and what SmartSAM is measured against."""
        x, y = self._check_click(click_xy)
        return self._best_of_three(Prompt(np.asarray([[x, y]], np.float32), np.asarray([1], np.int64)), "plain", "click")

    def _best_of_three(self, prompt: Prompt, mode: str, kind: str) -> AgentResult:
        """One prompt in multimask mode: the best-scored of SAM's 3 masks."""
        bb = self.backbone
        dec0 = bb.decoder_calls
        t0 = time.perf_counter()
        res = bb.predict([prompt], multimask=True)
        j = best_of_three(res.scores[0])
        lg = res.low_res_logits[0, j]
        return AgentResult(
            mask=bb.upsample(lg[None])[0] > 0, score=float(res.scores[0, j]), similarity=None, mode=mode,
            candidate=Candidate(0, kind, j, 0, (), float(res.scores[0, j])), low_res_logits=lg.copy(),
            timings={"total": time.perf_counter() - t0}, calls={"encoder": 0, "decoder": bb.decoder_calls - dec0, "features": 0},
            path=self.path,
        )

    def predict_box(self, box_xyxy: Sequence[float], points: Sequence[Sequence[float]] = (), labels: Sequence[int] = ()) -> AgentResult:
        """A box prompt (``(x0, y0, x1, y1)`` image pixels), optionally with clicks: the best-scored
        of SAM's 3 masks. A box is not ambiguous enough to need the agent."""
        x0, y0 = self._check_click(box_xyxy[:2])
        x1, y1 = self._check_click(box_xyxy[2:4])
        if x1 <= x0 or y1 <= y0:
            raise InvalidClick(f"box {tuple(box_xyxy)} is empty")
        pts = np.asarray([self._check_click(p) for p in points], np.float32).reshape(-1, 2)
        return self._best_of_three(Prompt(pts, np.asarray(labels, np.int64), box=np.asarray([x0, y0, x1, y1])), "box", "box")


def answer_jobs(jobs: Sequence[Job], run: Callable[[List[Job]], List[AgentResult]]) -> List[AgentResult]:
    """Answers to ``jobs``: those given before to the same click on the same image (each job's
    agent keeps its recent ones: outer interactions resend the first click) served again, the
    rest from ``run(todo)`` (a batch engine here, the backend's scheduler there) and kept."""
    out: List[Optional[AgentResult]] = [j.policy.answers.get(j) for j in jobs]
    todo = [j for j, r in zip(jobs, out) if r is None]
    fresh = iter(run(todo) if todo else [])
    for k, j in enumerate(jobs):
        if out[k] is None:
            out[k] = next(fresh)
            j.policy.answers.put(j, out[k])
    return out  # type: ignore[return-value]


def locate(extractor, image: np.ndarray, reference: Reference, key: Optional[str] = None) -> Tuple[float, float]:
    """Where in ``image`` the reference's object most likely is, without a click.

    The patch whose feature is most cosine-similar to the reference's becomes the click (its
    centre, in image pixels ``(x, y)``). Used for pre-labeling queues with a reference.
    """
    from .selector import cosine

    if reference.extractor != extractor.name:
        raise ValueError(f"reference made with {reference.extractor!r}, extractor is {extractor.name!r}")
    grid, _ = extractor.tokens(image, key)
    gh, gw, d = grid.shape
    sims = cosine(grid.reshape(-1, d), reference.feature).reshape(gh, gw)
    r, c = np.unravel_index(int(np.argmax(sims)), sims.shape)
    h, w = image.shape[:2]
    return float((c + 0.5) * w / gw), float((r + 0.5) * h / gh)
