"""Many agent jobs in lockstep: the agent as a batch.

A :class:`Job` is one click on one image with everything its answer depends on: its
:class:`JobPolicy` (the backbone, sampler, clicker, fast-path and selection settings, the seed,
where recent answers are kept), the reference and a deadline. :class:`BatchEngine` advances every
live job one stage per :meth:`BatchEngine.step`::

    admit   encode the job's image unless cached (the embedding is pinned for the job's life)
    explore the Priori Initial Sampler's prompts, multimask        -> 30 initial masks
    chain k every chain's next inner click, one mask each          -> k-th refined masks
    finish  select (pure-IS or reference) and upsample the chosen mask -> AgentResult

At each step the prompts of every selected job, across images, go into one decoder call per
prompt kind (:meth:`~smartsam.backbones.base.Backbone.decode_rows`: each row names its image).
A job's rows never share a forward pass with another job's, and every random stream derives from
the job's own seed and click, so an answer does not depend on which other jobs were in the
batch: a job alone, in a batch of 16 mixed jobs, and the one-call-at-a-time algorithm give the
same candidates, scores and mask (``tests/test_batch.py``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import device_masks
from .backbones.base import Backbone, Embedding, Prompt
from .chain_clicks import place_clicks
from .clickers import ADD, CUT, ChainClick, NextChainClicker
from .features import FeatureSet
from .masks import LowResFrame, batch_iou
from .results import AgentResult, Candidate
from .sampler import PrioriInitialSampler
from .selector import Reference, Selection, contains_click, select_by_score, select_by_similarity


class InvalidClick(ValueError):
    """A click that cannot be used (outside the image, not finite)."""


def check_click(xy: Sequence[float], image_hw: Tuple[int, int]) -> Tuple[float, float]:
    """``(x, y)`` as two finite floats inside an ``(H, W)`` image, else :class:`InvalidClick`."""
    h, w = image_hw
    try:
        x, y = float(xy[0]), float(xy[1])
    except (TypeError, ValueError, IndexError):
        raise InvalidClick(f"a click is two numbers (x, y), got {xy!r}") from None
    if not (np.isfinite(x) and np.isfinite(y)):
        raise InvalidClick(f"click ({x}, {y}) is not a finite point")
    if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
        raise InvalidClick(f"click ({x:g}, {y:g}) is outside the {w}x{h} image")
    return x, y


class AnswerCache:
    """An agent's recent answers, by image, click, reference and seed: outer interactions resend
    the first click, which is answered again from here (a cut-short answer is never kept).

    Args:
        size: how many answers to keep.
    """

    def __init__(self, size: int = 32) -> None:
        self.size = int(size)
        self._results: "OrderedDict[tuple, AgentResult]" = OrderedDict()
        self._lock = threading.Lock()  # jobs are built and answers kept on several threads

    @staticmethod
    def _key(job: "Job") -> tuple:
        x, y = job.click
        ref = None if job.reference is None else job.reference.feature.tobytes()
        return job.key, round(x, 2), round(y, 2), ref, job.policy.seed

    def get(self, job: "Job") -> Optional[AgentResult]:
        if job.key is None:
            return None
        with self._lock:
            hit = self._results.get(self._key(job))
            if hit is not None and (hit.candidates is not None or not job.return_candidates):
                self._results.move_to_end(self._key(job))
                return hit
        return None

    def clear(self) -> None:
        """Forget every answer (a benchmark timing the same clicks again)."""
        with self._lock:
            self._results.clear()

    def put(self, job: "Job", result: AgentResult) -> None:
        if result.partial or job.key is None:
            return
        with self._lock:
            self._results[self._key(job)] = result
            while len(self._results) > self.size:
                self._results.popitem(last=False)


@dataclass(frozen=True, eq=False)
class JobPolicy:
    """How an agent answers each of its jobs: everything but the click, the image and the
    reference (:class:`~smartsam.agent.SmartSAMAgent` builds it once from its settings).

    Attributes:
        backbone: the backbone the job's prompts are decoded on.
        sampler: the Priori Initial Sampler.
        clicker: the Next Chain Clicker (``chain_length`` steps).
        features: the feature extractors of reference mode.
        seed: every random stream derives from it and the click.
        dedupe_iou: fast path (chains whose masks overlap a better-scored one by this IoU are
            refined once); None: the paper's literal path.
        require_click: in reference mode only candidates that contain the click may win.
        chain_clicks: "host" or "device": where a step runs (see :class:`BatchEngine`).
        answers: where the agent keeps its recent answers.
    """

    backbone: Backbone
    sampler: PrioriInitialSampler
    clicker: NextChainClicker
    features: FeatureSet
    seed: int = 0
    dedupe_iou: Optional[float] = None
    require_click: bool = True
    chain_clicks: str = "host"
    answers: AnswerCache = field(default_factory=AnswerCache)

    @property
    def path(self) -> str:
        """"fast" or "literal": which agent runs (said in every output)."""
        return "literal" if self.dedupe_iou is None else "fast"

    def rows(self) -> int:
        """Decoder rows a job needs in all, at most: its initial prompts, then for each chain step
        one row per chain (up to 3 per prompt: its multimask outputs)."""
        return self.sampler.num_prompts * (1 + 3 * self.clicker.chain_length)


@dataclass(eq=False)
class Job:
    """One click for the agent on one image.

    Attributes:
        policy: how it is answered (:class:`JobPolicy`: sampler, clicker, fast path,
            ``require_click``, seed, feature extractors).
        image: ``(H, W, 3)`` uint8 RGB.
        key: the image's cache key (None: its content hash).
        click: ``(x, y)`` image pixels, checked (:func:`check_click`).
        reference: None for pure-IS, else what the user meant.
        deadline: ``time.monotonic()`` by which the answer is due: no chain step starts that
            would end past it at the pace of the job's previous stage (the answer is then chosen
            among what was explored and marked ``partial``).
        return_candidates: also return every candidate.
    """

    policy: JobPolicy
    image: np.ndarray
    click: Tuple[float, float]
    key: Optional[str] = None
    reference: Optional[Reference] = None
    deadline: Optional[float] = None
    return_candidates: bool = False

    def __post_init__(self) -> None:
        self.click = check_click(self.click, np.shape(self.image)[:2])


@dataclass(eq=False)
class _Live:
    """A job's state between steps (host arrays, or device tensors where the step runs there)."""

    job: Job
    stage: int = -1  # -1: not admitted; 0: explore; k >= 1: chain step k
    emb: Optional[Embedding] = None
    frame: Optional[LowResFrame] = None
    seed_key: List[int] = field(default_factory=list)
    initial: list = field(default_factory=list)
    cands: List[Candidate] = field(default_factory=list)
    logits: list = field(default_factory=list)  # per stage: (K, g, g) arrays (or tensors until the end)
    scores: List[np.ndarray] = field(default_factory=list)
    band: float = 0.0
    chains: List[int] = field(default_factory=list)
    state: Dict[int, tuple] = field(default_factory=dict)  # chain -> (logits, score, clicks)
    rngs: Dict[int, np.random.Generator] = field(default_factory=dict)
    rows: List[Prompt] = field(default_factory=list)
    owners: List[int] = field(default_factory=list)
    new_clicks: list = field(default_factory=list)
    # the step on the device: every chain's sign draws (chains, chain_length) float64, the band as a
    # 0-d tensor, the clicks placed for the next step (chain -> click or None), and per stage which
    # candidates contain the click
    draws: Optional[torch.Tensor] = None
    band_t: Optional[torch.Tensor] = None
    placed: Dict[int, Optional[ChainClick]] = field(default_factory=dict)
    inside: List[np.ndarray] = field(default_factory=list)
    out: Optional[tuple] = None  # this stage's (logits, scores), from the decoder to _advance
    error: Optional[BaseException] = None  # why the job could not start
    partial: bool = False
    row_seconds: float = 0.0  # the job's last stage: its step's time (less any encoding) per row of the job
    t0: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=lambda: {"encoder": 0, "decoder": 0, "features": 0})

    @property
    def on_device(self) -> bool:
        """The step stays on the device (chain clicks at the NCC point; "random" placement draws
        pixels from the chain's stream and runs on the host)."""
        policy = self.job.policy
        return policy.chain_clicks == "device" and policy.clicker.placement == "ncc"


@dataclass
class StepReport:
    """What one :meth:`BatchEngine.step` did: jobs advanced, rows decoded, decoder calls, images
    encoded, seconds spent encoding, decoding and finishing (selection and upsampling), finished
    jobs as ``(job, result or exception)``."""

    jobs: int = 0
    rows: int = 0
    decoder_calls: int = 0
    encoded: int = 0
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_seconds: float = 0.0
    finished: List[Tuple[Job, object]] = field(default_factory=list)


class BatchEngine:
    """Advances many :class:`Job` objects one stage at a time on one backbone.

    A job whose policy has ``chain_clicks="device"`` keeps its step on the backbone's device:
    the logits never leave it; the band, the Cut/Add signs (each chain's draws taken from its
    stream up front), the next clicks (:mod:`smartsam.chain_clicks`), the de-duplication's IoU
    and which masks contain the click are tensor work (:mod:`smartsam.device_masks`), and each
    stage brings back one small tensor (scores, flags, IoU, the next clicks: what the host needs
    to build the next rows; one more where the clicks' bounded placement says it was not exact),
    the answer one more (the chosen mask). The same candidates, scores and mask as the host path
    (``tests/test_chain_clicks.py``).

    Args:
        backbone: the :class:`~smartsam.backbones.base.Backbone` every job's agent uses.
    """

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._live: List[_Live] = []

    # -- queue -----------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        """Admit ``job`` at the next step."""
        if job.policy.backbone is not self.backbone:
            raise ValueError("the job's agent runs another backbone")
        self._live.append(_Live(job, t0=time.perf_counter()))

    def discard(self, job: Job) -> None:
        """Drop a live job (its caller gave up); the others go on."""
        self._live = [lv for lv in self._live if lv.job is not job]

    @property
    def jobs(self) -> List[Job]:
        """The live jobs, oldest first."""
        return [lv.job for lv in self._live]

    def rows(self, job: Job) -> int:
        """How many decoder rows ``job`` brings to its next step (the scheduler's batch budget;
        0 for a job no longer live)."""
        lv = self._find(job)
        if lv is None:
            return 0
        if lv.stage < 0:
            return lv.job.policy.sampler.num_prompts
        return len(lv.chains) if lv.stage <= lv.job.policy.clicker.chain_length else 0

    def rows_left(self, job: Job) -> int:
        """Decoder rows ``job`` still needs, at most (the scheduler's expected wait): a job not
        admitted yet needs all of its policy's; a live one its next step's, for each step left."""
        lv = self._find(job)
        if lv is None or lv.stage < 0:
            return job.policy.rows()
        steps = max(0, job.policy.clicker.chain_length - lv.stage + 1)
        return self.rows(job) * max(1, steps)

    def _find(self, job: Job) -> Optional[_Live]:
        return next((lv for lv in self._live if lv.job is job), None)

    def run(self, jobs: Sequence[Job]) -> List[AgentResult]:
        """Every job to its answer, all in lockstep; raises the first job's error, if any."""
        for j in jobs:
            self.add(j)
        done: Dict[int, object] = {}
        while any(id(j) not in done for j in jobs):
            if not self._live:
                raise RuntimeError("a job left the engine unanswered (discarded?)")
            for job, res in self.step().finished:
                done[id(job)] = res
        out = [done[id(j)] for j in jobs]
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return out  # type: ignore[return-value]

    # -- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, jobs: Optional[Sequence[Job]] = None) -> StepReport:
        """Advance ``jobs`` (default: every live job) by one stage.

        A job whose settings or inputs fail ends with its exception in ``finished``; the others
        go on.
        """
        chosen = self._live if jobs is None else [self._find(j) for j in jobs]
        if any(lv is None for lv in chosen):
            raise KeyError("not a live job")
        report = StepReport(jobs=len(chosen))
        decoding: List[_Live] = []
        new = [lv for lv in chosen if lv.stage < 0]
        if new:
            t = time.perf_counter()
            report.encoded += self._admit(new)
            report.encode_seconds += time.perf_counter() - t
        t_stage = time.monotonic()
        for lv in chosen:
            try:
                if lv.stage < 0:
                    raise lv.error  # its image could not be encoded
                if self._prepare(lv):
                    decoding.append(lv)
                else:
                    self._finish_into(report, lv)
            except Exception as e:  # one bad job never fails the batch
                report.finished.append((lv.job, e))
        t = time.perf_counter()
        for multimask in (True, False):
            group = [lv for lv in decoding if (lv.stage == 0) == multimask]
            if group:
                report.rows += sum(len(lv.rows) for lv in group)
                report.decoder_calls += self._decode(group, multimask)
        report.decode_seconds = time.perf_counter() - t
        for lv in decoding:
            try:
                rows = len(lv.rows)
                self._advance(lv)
                lv.row_seconds = (time.monotonic() - t_stage) / max(1, rows)
                if not self._continues(lv):
                    self._finish_into(report, lv)
            except Exception as e:
                report.finished.append((lv.job, e))
        done = {id(job) for job, _ in report.finished}
        self._live = [lv for lv in self._live if id(lv.job) not in done]
        return report

    def _admit(self, new: List[_Live]) -> int:
        """Embed the new jobs' images, those not cached in one encoder call where the backbone can
        (pinned: an LRU eviction cannot pull one away mid-chain). Returns the encoder calls made."""
        bb = self.backbone
        enc = bb.encoder_calls
        try:
            embs, fresh = bb.embed_many([lv.job.image for lv in new], [lv.job.key for lv in new])
        except Exception:  # one image at a time, so a bad one fails only its own job
            embs, fresh = [], []
            for lv in new:
                e0 = bb.encoder_calls
                try:
                    embs.append(bb.embed(lv.job.image, lv.job.key))
                except Exception as e:
                    lv.error, embs = e, embs + [None]
                fresh.append(bb.encoder_calls > e0)
        for lv, emb, f in zip(new, embs, fresh):
            if emb is None:
                continue
            lv.emb, lv.calls["encoder"] = emb, int(f)
            with bb.using(emb):
                lv.frame = bb.frame
            lv.stage = 0
        return bb.encoder_calls - enc

    def _prepare(self, lv: _Live) -> bool:
        """This stage's prompts in ``lv.rows``; False when the job has nothing left to decode."""
        agent = lv.job.policy
        if lv.stage == 0:
            x, y = lv.job.click
            # Every random stream derives from the seed and the click: answers do not depend on
            # call order, nor on the other jobs of a batch.
            lv.seed_key = [agent.seed, int(round(x * 16)), int(round(y * 16))]
            lv.initial = agent.sampler.sample((x, y), lv.emb.image_hw, np.random.default_rng(lv.seed_key))
            lv.rows = [p.prompt for p in lv.initial]
            lv.timings["t_initial"] = time.perf_counter()
            return True
        if lv.stage > agent.clicker.chain_length or not lv.chains:
            return False
        # A step that starts before the deadline but ends after it comes too late: the caller stops
        # waiting at the deadline (the backend's SMARTSAM_REQUEST_TIMEOUT) and answers "try again"
        # instead of the partial answer. The next stage is expected to take the last one's time per
        # row (the first chain step decodes a row per chain: 30 for the 10 prompts before it).
        if lv.job.deadline is not None and time.monotonic() + lv.row_seconds * len(lv.chains) >= lv.job.deadline:
            lv.partial = True
            return False
        if lv.on_device:  # placed with the last stage's outputs
            placed = [lv.placed[c] for c in lv.chains]
        else:
            placed = agent.clicker.next_clicks([lv.state[c][0] for c in lv.chains], [lv.state[c][1] for c in lv.chains],
                                               lv.band, lv.frame, [lv.rngs[c] for c in lv.chains])
        lv.rows, lv.owners, lv.new_clicks = [], [], []
        for c, click in zip(lv.chains, placed):
            lg, _, clicks = lv.state[c]
            if click is None:
                continue
            clicks = clicks + ((click.xy, click.label),)
            base = lv.initial[lv.cands[c].prompt_index].prompt
            pts = np.concatenate([base.points, np.asarray([k[0] for k in clicks], np.float32)])
            lab = np.concatenate([base.labels, np.asarray([k[1] for k in clicks], np.int64)])
            lv.rows.append(Prompt(pts, lab, box=base.box, mask_input=lg))
            lv.owners.append(c)
            lv.new_clicks.append(clicks)
        return bool(lv.rows)

    def _decode(self, group: List[_Live], multimask: bool) -> int:
        """One decoder call per prompt kind for every job of ``group``; each job's share of the
        output goes to its ``out``. Returns the decoder calls made."""
        bb = self.backbone
        embs, prompts, segments = [], [], []
        for k, lv in enumerate(group):
            embs += [lv.emb] * len(lv.rows)
            prompts += lv.rows
            segments += [k] * len(lv.rows)
        calls = bb.decoder_calls
        logits, scores = bb.decode_rows(embs, prompts, multimask, segments)
        start = 0
        for lv in group:
            n = len(lv.rows)
            lv.calls["decoder"] += len({p.kind for p in lv.rows})
            lg, sc = logits[start:start + n], scores[start:start + n]
            lv.out = (lg, sc) if lv.on_device else (lg.cpu().numpy(), sc.cpu().numpy())
            start += n
        return bb.decoder_calls - calls

    def _advance(self, lv: _Live) -> None:
        """Take this stage's decoder output into the job's state."""
        if lv.on_device:
            return self._advance_on_device(lv)
        agent, g = lv.job.policy, self.backbone.grid
        logits, scores = lv.out
        lv.out = None
        if lv.stage == 0:
            n_prompts, n_masks = scores.shape
            lv.cands = [Candidate(i, lv.initial[i].kind, j, 0, (), float(scores[i, j]))
                        for i in range(n_prompts) for j in range(n_masks)]
            flat = logits.reshape(-1, g, g)
            lv.logits, lv.scores = [flat], [scores.reshape(-1)]
            self._chains_start(lv)
            lv.band = agent.clicker.band(flat, lv.frame)
            lv.chains = list(range(len(lv.cands)))
            if agent.dedupe_iou is not None and len(lv.chains) > 1:
                lv.chains = distinct(flat, lv.scores[0], lv.frame, agent.dedupe_iou)
            lv.state = {c: (flat[c], float(lv.scores[0][c]), ()) for c in lv.chains}
            # Each chain draws from its own stream (seed, click, chain): a chain's clicks do not
            # depend on which other chains run, so the fast path explores a subset of the literal
            # path's candidates, the same ones, instead of a reshuffled set.
            lv.rngs = {c: np.random.default_rng(lv.seed_key + [c + 1]) for c in lv.chains}
        else:
            logits, scores = logits[:, 0], scores[:, 0]
            lv.logits.append(logits)
            lv.scores.append(scores)
            self._chains_grow(lv, logits, scores)
            if agent.dedupe_iou is not None and len(lv.chains) > 1:
                # Chains that converged onto the same mask would keep repeating each other.
                keep = distinct(logits, scores, lv.frame, agent.dedupe_iou)
                lv.chains = [lv.chains[k] for k in keep]
        lv.stage += 1

    @staticmethod
    def _chains_start(lv: _Live) -> None:
        now = time.perf_counter()
        lv.timings["initial"] = now - lv.timings.pop("t_initial")
        lv.timings["t_chains"] = now

    @staticmethod
    def _chains_grow(lv: _Live, logits, scores: np.ndarray) -> None:
        """A chain step's candidates and chain states (``logits`` host arrays or device tensors)."""
        lv.chains = list(lv.owners)
        for k, c in enumerate(lv.owners):
            lv.state[c] = (logits[k], float(scores[k]), lv.new_clicks[k])
            root = lv.cands[c]
            lv.cands.append(Candidate(root.prompt_index, root.prompt_kind, root.mask_index, lv.stage,
                                      lv.new_clicks[k], float(scores[k])))

    def _advance_on_device(self, lv: _Live) -> None:
        """:meth:`_advance` with the step's work on the device and one copy back: this stage's
        scores, which masks contain the click, their IoU (fast path) and the next step's clicks."""
        agent, g = lv.job.policy, self.backbone.grid
        clicker = agent.clicker
        logits, scores = lv.out
        lv.out = None
        if lv.stage == 0:
            flat, sc = logits.reshape(-1, g, g), scores.reshape(-1)
            owners = list(range(flat.shape[0]))  # chain c starts from initial mask c
            lv.band_t = device_masks.uncertainty_band(lv.frame.crop(flat), clicker.band_fraction, clicker.band_percentile)
            # each chain's sign draws, all at once: the same stream and order as the host path's one per step
            draws = [np.random.default_rng(lv.seed_key + [c + 1]).random(clicker.chain_length) for c in owners]
            lv.draws = torch.as_tensor(np.stack(draws), device=flat.device)
        else:
            flat, sc = logits[:, 0], scores[:, 0]
            owners = list(lv.owners)
        n = len(owners)
        dedupe = agent.dedupe_iou is not None and n > 1
        more = lv.stage < clicker.chain_length
        parts = [sc.double(), device_masks.contains_click(flat, lv.frame, lv.job.click).double()]
        if dedupe:
            parts.append(device_masks.batch_iou(lv.frame.crop(flat) > 0).double().reshape(-1))
        if more:  # every chain's next click (those the de-duplication drops are not used)
            cut = lv.draws[owners, lv.stage] < sc.clamp(0.0, 1.0).double()  # Cut with probability = score
            xy, ok, exact = place_clicks(flat, cut, lv.band_t, lv.frame.valid_hw)
            parts += [cut.double(), xy.double().reshape(-1), ok.double(), exact.double().reshape(1)]
        host = torch.cat(parts).cpu().numpy()  # the stage's one copy back (float64 holds each exactly)
        if more and not host[-1]:  # the bounded placement was not exact (rare): place again, unbounded
            xy, ok, _ = place_clicks(flat, cut, lv.band_t, lv.frame.valid_hw, bounded=False)
            host[-1 - 3 * n:-1] = torch.cat([xy.double().reshape(-1), ok.double()]).cpu().numpy()
        sc_h, inside = host[:n].astype(np.float32), host[n:2 * n] > 0
        at = 2 * n
        if dedupe:
            iou, at = host[at:at + n * n].astype(np.float32).reshape(n, n), at + n * n
        if lv.stage == 0:
            n_masks = scores.shape[1]
            lv.cands = [Candidate(k // n_masks, lv.initial[k // n_masks].kind, k % n_masks, 0, (), float(sc_h[k]))
                        for k in range(n)]
            lv.logits, lv.scores, lv.inside = [flat], [sc_h], [inside]
            self._chains_start(lv)
            lv.chains = distinct_by_iou(iou, sc_h, agent.dedupe_iou) if dedupe else owners
            lv.state = {c: (flat[c], float(sc_h[c]), ()) for c in lv.chains}
        else:
            lv.logits.append(flat)
            lv.scores.append(sc_h)
            lv.inside.append(inside)
            self._chains_grow(lv, flat, sc_h)
            if dedupe:
                lv.chains = [lv.chains[k] for k in distinct_by_iou(iou, sc_h, agent.dedupe_iou)]
        if more:
            cut, ok = host[at:at + n] > 0, host[at + 3 * n:at + 4 * n] > 0
            pts = lv.frame.to_image(host[at + n:at + 3 * n].reshape(n, 2))
            lv.placed = {c: ChainClick((float(pts[k, 0]), float(pts[k, 1])), CUT if cut[k] else ADD) if ok[k] else None
                         for k, c in enumerate(owners)}
        lv.stage += 1

    def _finish_into(self, report: StepReport, lv: _Live) -> None:
        t = time.perf_counter()
        report.finished.append((lv.job, self._finish(lv)))
        report.finish_seconds += time.perf_counter() - t

    def _continues(self, lv: _Live) -> bool:
        return lv.stage <= lv.job.policy.clicker.chain_length and bool(lv.chains)

    def _finish(self, lv: _Live) -> AgentResult:
        """Select among the candidates, upsample only the chosen mask."""
        job, bb = lv.job, self.backbone
        lv.timings["chains"] = time.perf_counter() - lv.timings.pop("t_chains", time.perf_counter())
        scores = np.concatenate(lv.scores)
        t = time.perf_counter()
        if lv.on_device:
            # the candidates come to the host only where the choice needs their masks (reference
            # features) or the caller asked for them; which hold the click came with each stage
            logits = torch.cat(lv.logits).cpu().numpy() if job.reference is not None or job.return_candidates else None
            inside = np.concatenate(lv.inside)
        else:
            logits, inside = np.concatenate(lv.logits), None
        sel, lv.calls["features"] = select(job, logits, scores, lv.frame, lv.emb.key, inside)
        lv.timings["select"] = time.perf_counter() - t
        t = time.perf_counter()
        if lv.on_device:  # the chosen logits and their upsampled mask: the answer's one copy back
            g, chosen_t = bb.grid, _candidate(lv.logits, sel.index)
            with bb.using(lv.emb):
                up = bb.upsample_tensor(chosen_t[None])[0]
            both = torch.cat([chosen_t.reshape(-1), up.reshape(-1)]).cpu().numpy()
            chosen, mask = both[:g * g].reshape(g, g), both[g * g:].reshape(up.shape) > 0
        else:
            chosen = logits[sel.index]
            with bb.using(lv.emb):
                mask = bb.upsample(chosen[None])[0] > 0
        lv.timings["upsample"] = time.perf_counter() - t
        result = AgentResult(mask=mask, score=float(scores[sel.index]), similarity=sel.similarity, mode=sel.mode,
                             candidate=lv.cands[sel.index], low_res_logits=chosen.copy(), timings=dict(lv.timings),
                             partial=lv.partial, path=job.policy.path)
        if job.return_candidates:
            result.candidates = lv.cands
            result.candidate_logits = logits
            result.candidate_scores = scores
            result.prompts = lv.initial
            result.frame = lv.frame
        result.timings["total"] = time.perf_counter() - lv.t0
        result.calls = dict(lv.calls)
        return result


def _candidate(stages: List[torch.Tensor], index: int) -> torch.Tensor:
    """Candidate ``index`` of stages' ``(K_s, g, g)`` logits, counted across them in order."""
    for t in stages:
        if index < t.shape[0]:
            return t[index]
        index -= t.shape[0]
    raise IndexError("no such candidate")


def distinct(logits: np.ndarray, scores: np.ndarray, frame: LowResFrame, dedupe_iou: float) -> List[int]:
    """Indices of masks worth a chain: best-scored first, those overlapping a kept one by at least
    ``dedupe_iou`` (IoU on the low-res grid) dropped; returned in index order."""
    masks = frame.crop(logits) > 0
    return distinct_by_iou(batch_iou(masks, masks), scores, dedupe_iou)


def distinct_by_iou(iou: np.ndarray, scores: np.ndarray, dedupe_iou: float) -> List[int]:
    """:func:`distinct` from the masks' ``(N, N)`` float32 IoU."""
    order = np.argsort(-scores, kind="stable")
    kept: List[int] = []
    for i in order:
        if all(iou[i, k] < dedupe_iou for k in kept):
            kept.append(int(i))
    return sorted(kept)


def select(job: Job, logits: Optional[np.ndarray], scores: np.ndarray, frame: LowResFrame, key: str,
           inside: Optional[np.ndarray] = None) -> Tuple[Selection, int]:
    """Exploit: the best-scored candidate containing the click (pure-IS), or the one most similar
    to the reference. Returns the selection and the feature calls it made. ``inside``: which
    candidates contain the click, where already known (else from ``logits``, which a reference
    always needs)."""
    if inside is None:
        inside = contains_click(logits, frame, job.click)
    ref = job.reference
    if ref is None:
        return Selection(select_by_score(scores, inside), "pure-is"), 0
    agent = job.policy
    try:
        extractor = agent.features.for_reference(ref.kind)
    except RuntimeError:
        raise RuntimeError(f"a {ref.kind} reference needs its feature extractor") from None
    if ref.extractor != extractor.name:
        raise ValueError(f"reference made with {ref.extractor!r}, agent uses {extractor.name!r}")
    before = extractor.forward_calls
    feats = extractor.mask_features(job.image, frame.crop(logits) > 0, key)
    allowed = inside if agent.require_click else np.ones(len(scores), bool)
    idx, sims = select_by_similarity(feats, ref.feature, allowed)
    return Selection(idx, f"reference-{ref.kind}", float(sims[idx]), sims), extractor.forward_calls - before
