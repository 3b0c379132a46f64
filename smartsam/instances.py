"""Every instance of a reference in an image ("all like this one").

Proposals are the local maxima of the reference-similarity map over the image's patch features
(the same features, computed once per image, that the selector pools): non-maximum suppression
on the patch grid, best first. With SAM 3 they can instead come from its concept detector
(:class:`~smartsam.concepts.Sam3ConceptProposer`, ``proposals="sam3"``), prompted with exemplar
boxes on this image (the clicked object's, else the best similarity proposal's answer) or with a
text reference's text. Each proposal becomes a click through the agent (reference mode),
which resolves that instance's granularity; answers are de-duplicated by mask IoU and
containment, a proposal that falls on an instance already found is not run at all, and an
answer is kept when its selector similarity reaches ``threshold``.

A fixed similarity cannot know the image: a background merely somewhat like the reference (a
reddish wall behind red cars) passes 0.6 everywhere. So by default (``adaptive``) an instance
must also stand out from the image's own similarity distribution and stay close to the best
instance found:

1. *Background level*: the similarity map's local maxima (the proposals' own non-maximum
   suppression: a flat or noisy background tiles into many peaks, an instance gives one, an
   object's rim none), split in two by Otsu, the upper class split again while it holds two
   clear modes (a background unlike the reference, one fairly like it, the instances: three);
   the last lower class's mean ``b`` and spread ``s`` describe the background peaks just below
   the instances. A split at the histogram's valleys holds for a few instances or many, where a
   median or a percentile would be an instance's once they cover much of the image.
2. *Stands out*: a proposal's peak similarity must reach ``b + max(stand_out * s, min_contrast)``
   (at most halfway from ``b`` to the image's best patch, so the best peak always may); below it
   no agent run is spent.
3. *Close to the best*: an answer's similarity must reach ``b + closeness * (best - b)``, ``best``
   the best instance's similarity: nearer the best instance than the background (checked as
   instances come and again once all are in).

The backend uses this rule until annotators' keep / delete decisions give a learned threshold,
which replaces it. Proposal clicks go to the most interior pixel of the peak's region (the
similarity map upsampled and cut halfway between the peak and ``b``), not to a patch centre, so
the agent's click sits inside the object even where the patch grid straddles its edge.

Proposals run in rounds of ``round_size`` agent jobs, one batch each
(:class:`~smartsam.batch.BatchEngine`); the rules (skip what is covered, stop after ``patience``
misses or ``max_instances``) are applied to the answers in proposal order, so the instances found
are those of one proposal at a time, whatever the round size; a larger round only may run a
proposal that one at a time would have skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np

from .backbones.base import image_key
from .selector import Reference, cosine


# The adaptive rule's defaults (the module docstring; InstanceFinder's knobs).
STAND_OUT = 3.0  # background peaks are about normal: 3 standard deviations pass 1 in 700
MIN_CONTRAST = 0.05  # cosine; a flat background's spread is 0, DINOv2's patch noise about this size
CLOSENESS = 0.5  # nearer the best instance than the background


def rule_name(adaptive: bool = True, stand_out: float = STAND_OUT, min_contrast: float = MIN_CONTRAST,
              closeness: float = CLOSENESS) -> str:
    """The keep rule's name, for model versions and answers: ``fixed`` or
    ``adaptive-z<stand_out>-c<min_contrast>-k<closeness>``."""
    return f"adaptive-z{stand_out:g}-c{min_contrast:g}-k{closeness:g}" if adaptive else "fixed"


class LocalRunner:
    """Runs an :class:`InstanceFinder`'s model work in this thread (the library's default; the
    backend hands it its scheduler's instead, with a priority and a deadline)."""

    def __init__(self, agent) -> None:
        self.agent = agent

    def call(self, fn):
        return fn()

    def run(self, jobs):
        return self.agent.run_jobs(jobs)


@dataclass
class Instance:
    """One instance found.

    Attributes:
        mask: ``(H, W)`` bool at image size.
        similarity: the selector's cosine similarity of the mask to the reference.
        score: the decoder's IoU-head score.
        click: ``(x, y)`` image pixels of the proposal the agent answered.
        proposal_similarity: the patch similarity that proposed it (the detector's score for a
            SAM 3 proposal).
        source: which proposer found it: "similarity" or "sam3".
    """

    mask: np.ndarray
    similarity: float
    score: float
    click: Tuple[float, float]
    proposal_similarity: float
    source: str = "similarity"


def similarity_map(extractor, image: np.ndarray, reference: Reference, key: Optional[str] = None) -> np.ndarray:
    """``(gh, gw)`` cosine similarity of each patch feature to the reference (its best exemplar)."""
    if reference.extractor != extractor.name:
        raise ValueError(f"reference made with {reference.extractor!r}, extractor is {extractor.name!r}: set the "
                         f"reference again with this backend's feature model")
    grid, _ = extractor.tokens(image, key)
    gh, gw, d = grid.shape
    return cosine(grid.reshape(-1, d), reference.feature).reshape(gh, gw)


def propose(sims: np.ndarray, image_hw: Tuple[int, int], max_proposals: int, min_similarity: float = -1.0,
            radius: int = 1) -> List[Tuple[float, float, float]]:
    """Local maxima of a ``(gh, gw)`` similarity map, best first, as ``(x, y, similarity)`` at
    patch centres in image pixels: greedy non-maximum suppression within ``radius`` patches
    (Chebyshev), at most ``max_proposals``, none below ``min_similarity``. (Use
    :func:`interior_point` to move a peak's click off the patch grid.)"""
    gh, gw = sims.shape
    h, w = image_hw
    order = np.argsort(-sims, axis=None, kind="stable")
    taken = np.zeros(sims.shape, bool)
    out: List[Tuple[float, float, float]] = []
    for flat in order:
        r, c = divmod(int(flat), gw)
        v = float(sims[r, c])
        if v < min_similarity or len(out) >= max_proposals:
            break
        if taken[r, c]:
            continue
        taken[max(0, r - radius):r + radius + 1, max(0, c - radius):c + radius + 1] = True
        out.append(((c + 0.5) * w / gw, (r + 0.5) * h / gh, v))
    return out


def otsu_split(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
    """Otsu's two-class split of ``values``: ``(lower, upper, effectiveness)``, both classes sorted;
    effectiveness is the between-class share of the variance (1: two spikes; 0.75: a uniform
    spread; about 0.64: one normal mode). All in ``lower`` (effectiveness 0) when they are equal."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    n = v.size
    if n < 2 or v[-1] - v[0] < 1e-9:
        return v, v[:0], 0.0
    csum = np.cumsum(v)
    k = np.arange(1, n)  # the lower class holds v[:k]
    m0, m1 = csum[:-1] / k, (csum[-1] - csum[:-1]) / (n - k)
    between = k * (n - k) * (m1 - m0) ** 2
    between[v[1:] == v[:-1]] = -1.0  # a split between equal values is no split
    best = int(np.argmax(between))
    return v[:best + 1], v[best + 1:], float(between[best] / (n * n * v.var()))


def background_level(sims: np.ndarray, radius: int = 2, separation: float = 0.9,
                     min_gap: float = 0.05) -> Tuple[float, float]:
    """``(mean, std)`` of an image's background peaks (the module's rule 1): the local maxima of
    the ``(gh, gw)`` similarity map (:func:`propose` with ``radius``: a flat region tiles into many,
    an instance is one, an object's rim none), split by Otsu, the upper class split again while it
    holds two clear modes (effectiveness at least ``separation``, means ``min_gap`` apart); the
    last lower class."""
    return peak_level(np.array([v for _, _, v in propose(sims, sims.shape, sims.size, -np.inf, radius)]),
                      separation, min_gap)


def peak_level(peaks: np.ndarray, separation: float = 0.9, min_gap: float = 0.05) -> Tuple[float, float]:
    """:func:`background_level` from the map's local-maximum values already found."""
    low, high, _ = otsu_split(peaks)
    while high.size >= 2:
        l2, h2, eff = otsu_split(high)
        if h2.size == 0 or eff < separation or h2.mean() - l2.mean() < min_gap:
            break
        low, high = l2, h2
    return float(low.mean()), float(low.std())


def interior_point(sims: np.ndarray, peak: Tuple[int, int], level: float, image_hw: Tuple[int, int],
                   window: int = 3, max_side: int = 512) -> Tuple[float, float]:
    """``(x, y)`` image pixels of the most interior point of a similarity peak's region: the
    ``(gh, gw)`` map upsampled (bilinear, at most ``max_side`` pixels a side), cut at ``level``,
    the connected part holding the peak ``(row, col)`` within ``window`` patches of it, and its
    farthest pixel from the outside (a distance transform). The patch centre when the cut leaves
    the peak outside."""
    gh, gw = sims.shape
    h, w = image_hw
    r, c = peak
    centre = ((c + 0.5) * w / gw, (r + 0.5) * h / gh)
    s = min(1.0, max_side / max(h, w))
    ow, oh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    up = cv2.resize(np.asarray(sims, np.float32), (ow, oh), interpolation=cv2.INTER_LINEAR)
    px, py = min(int(centre[0] * s), ow - 1), min(int(centre[1] * s), oh - 1)
    region = (up >= level).astype(np.uint8)
    if not region[py, px]:
        return centre
    # only near the peak: a large region (a cut too low) must not pull the click to another object
    half_x, half_y = (window + 0.5) * ow / gw, (window + 0.5) * oh / gh
    keep = np.zeros_like(region)
    keep[max(0, int(py - half_y)):int(py + half_y) + 1, max(0, int(px - half_x)):int(px + half_x) + 1] = 1
    region &= keep
    _, labels = cv2.connectedComponents(region, connectivity=8)
    part = np.pad((labels == labels[py, px]).astype(np.uint8), 1)  # the image's edge is outside too
    dist = cv2.distanceTransform(part, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (float((x + 0.5) / s), float((y + 0.5) / s))


def overlaps(a: np.ndarray, b: np.ndarray, iou: float, containment: float) -> bool:
    """Whether two masks are one instance: IoU at least ``iou``, or one mostly inside the other."""
    inter = float(np.logical_and(a, b).sum())
    if inter == 0:
        return False
    sa, sb = float(a.sum()), float(b.sum())
    return inter / (sa + sb - inter) >= iou or inter / max(min(sa, sb), 1.0) >= containment


class InstanceFinder:
    """Finds every instance like a reference with an agent.

    Args:
        agent: a :class:`~smartsam.agent.SmartSAMAgent` (its image must be set by the caller).
        max_instances: at most this many instances per image and reference.
        threshold: an answer is kept when its selector similarity is at least this.
        dedupe_iou: answers overlapping a kept one by this IoU are the same instance.
        containment: ... or lying this much inside one (or around one).
        nms_radius: proposals suppress their neighbours within this many patches (2: about 6 % of
            the image at DINOv2's 448-pixel side; closer peaks are one object).
        proposals_per_instance: proposals looked at per instance allowed.
        patience: stop after this many proposals in a row gave no instance (proposals come best
            first: after a few misses the rest is background; bounds the agent runs per image).
        skip_covered: a proposal on an instance already found is not run (off only to time one
            agent run per proposal, as ``benchmarks/instances.py`` does).
        concepts: a :class:`~smartsam.concepts.Sam3ConceptProposer` on the agent's SAM 3 backbone:
            proposals come from SAM 3's concept detector instead of the similarity peaks.
        round_size: proposals run as one batch of agent jobs (1: one at a time; a GPU runs a
            round in about the time of one, a CPU in the time of all).
        runner: where the model work runs: ``call(fn)`` and ``run(jobs)`` (default
            :class:`LocalRunner`: here).
        adaptive: the image-adaptive rule of the module's docstring on top of ``threshold``
            (similarity proposals; the backend turns it off once a threshold is learned or set).
        stand_out: a proposal's peak must reach the background peaks' mean plus this many of
            their standard deviations (:data:`STAND_OUT`) ...
        min_contrast: ... and at least this much above the mean (:data:`MIN_CONTRAST`).
        closeness: an answer must lie this far from the background level towards the best
            instance's similarity (:data:`CLOSENESS`).
    """

    def __init__(self, agent, max_instances: int = 20, threshold: float = 0.5, dedupe_iou: float = 0.5,
                 containment: float = 0.8, nms_radius: int = 2, proposals_per_instance: int = 2,
                 patience: int = 3, skip_covered: bool = True, concepts=None, round_size: int = 8,
                 runner=None, adaptive: bool = True, stand_out: float = STAND_OUT,
                 min_contrast: float = MIN_CONTRAST, closeness: float = CLOSENESS) -> None:
        if int(round_size) < 1:
            raise ValueError(f"round_size must be at least 1, not {round_size!r}")
        self.round_size = int(round_size)
        self.runner = runner or LocalRunner(agent)
        if not 1 <= int(max_instances) <= 1000:
            raise ValueError(f"max_instances must be from 1 to 1000, not {max_instances!r}")
        if not -1.0 <= float(threshold) <= 1.0:
            raise ValueError(f"an instance threshold is a cosine similarity in [-1, 1], not {threshold!r}")
        self.agent = agent
        self.max_instances = int(max_instances)
        self.threshold = float(threshold)
        self.dedupe_iou = float(dedupe_iou)
        self.containment = float(containment)
        self.nms_radius = int(nms_radius)
        self.proposals_per_instance = int(proposals_per_instance)
        self.patience = int(patience)
        self.skip_covered = bool(skip_covered)
        self.concepts = concepts
        if stand_out < 0 or min_contrast < 0 or not 0.0 <= closeness <= 1.0:
            raise ValueError(f"stand_out and min_contrast must be 0 or more and closeness in [0, 1], not "
                             f"{stand_out!r}, {min_contrast!r}, {closeness!r}")
        self.adaptive = bool(adaptive)
        self.stand_out, self.min_contrast, self.closeness = float(stand_out), float(min_contrast), float(closeness)
        self._level: Optional[float] = None  # the current image's background level (adaptive, similarity)

    @property
    def rule(self) -> str:
        """The keep rule's name (:func:`rule_name`; SAM 3's detector proposals keep the fixed one)."""
        return rule_name(self.adaptive and self.concepts is None, self.stand_out, self.min_contrast, self.closeness)

    @property
    def source(self) -> str:
        """Where proposals come from: "sam3" (the concept detector) or "similarity"."""
        return "sam3" if self.concepts is not None else "similarity"

    def find(self, image: np.ndarray, reference: Reference, key: Optional[str] = None,
             exclude: Optional[List[np.ndarray]] = None, deadline: Optional[float] = None) -> List[Instance]:
        """The instances of ``reference`` in ``image``, best first.

        Args:
            exclude: masks of instances already known (the clicked object): not found again.
            deadline: ``time.monotonic()`` after which no further proposal is run.
        """
        key = key or image_key(image)
        known = list(exclude or [])
        found: List[Instance] = []
        self._level = None
        n = self.max_instances * self.proposals_per_instance + len(known)
        if self.concepts is None:
            proposals = self._similarity_proposals(image, reference, key, n)
        else:
            proposals = self._concept_proposals(image, reference, key, known, found, n, deadline)
        misses, i = 0, 0
        while i < len(proposals):
            if self._done(found, misses, deadline):
                break
            batch = []  # the next proposals not on an instance already found
            while i < len(proposals) and len(batch) < self.round_size:
                if not self._covered(proposals[i], known, image.shape):
                    batch.append(proposals[i])
                i += 1
            if not batch:
                break
            results = self.runner.run([self.agent.job(image, (x, y), key, reference, deadline) for x, y, _ in batch])
            for proposal, res in zip(batch, results):  # one proposal at a time's rules, in order
                if self._done(found, misses, deadline=None) or self._covered(proposal, known, image.shape):
                    continue
                misses = 0 if self._keep(proposal, res, known, found) else misses + 1
        if self._level is not None and found:  # the best came later than some: check them all against it
            floor = self._close_floor(found)
            found = [f for f in found if f.similarity >= floor]
        return found

    def _close_floor(self, found: List[Instance], candidate: float = -1.0) -> float:
        best = max([f.similarity for f in found] + [candidate])
        return self._level + self.closeness * (best - self._level)

    def _done(self, found: List[Instance], misses: int, deadline: Optional[float]) -> bool:
        return len(found) >= self.max_instances or misses >= self.patience or \
            (deadline is not None and time.monotonic() >= deadline)

    def _covered(self, proposal, known: List[np.ndarray], shape) -> bool:
        """A proposal on an instance already found is not run (``skip_covered``)."""
        x, y = proposal[:2]
        xi, yi = min(int(x), shape[1] - 1), min(int(y), shape[0] - 1)
        return self.skip_covered and any(m[yi, xi] for m in known)

    def _similarity_proposals(self, image, reference: Reference, key, n: int) -> List[Tuple[float, float, float]]:
        extractor = self.agent.features.for_reference(reference.kind)
        sims = self.runner.call(lambda: similarity_map(extractor, image, reference, key))
        # every local maximum once: the background level comes from them, the proposals are their head
        peaks = propose(sims, image.shape[:2], sims.size, -np.inf, self.nms_radius)
        level, spread = peak_level(np.array([v for _, _, v in peaks]), min_gap=self.min_contrast)
        floor = -np.inf
        if self.adaptive:
            self._level = level
            floor = min(level + max(self.stand_out * spread, self.min_contrast), (level + float(sims.max())) / 2)
        out = []
        gh, gw = sims.shape
        for x, y, v in [p for p in peaks if p[2] >= floor][:n]:
            rc = (min(int(y * gh / image.shape[0]), gh - 1), min(int(x * gw / image.shape[1]), gw - 1))
            out.append(interior_point(sims, rc, (v + level) / 2, image.shape[:2], self.nms_radius + 1) + (v,))
        return out

    def _keep(self, proposal: Tuple[float, float, float], res, known: List[np.ndarray], found: List[Instance],
              nonempty: bool = False) -> bool:
        """The agent's answer at a proposal is kept (appended to ``known`` and ``found``) when it
        reaches the threshold and is no instance already known (and, ``nonempty``, has pixels)."""
        x, y, v = proposal
        if res.similarity is None or res.similarity < self.threshold or (nonempty and not res.mask.any()) or \
                any(overlaps(res.mask, m, self.dedupe_iou, self.containment) for m in known):
            return False
        if self._level is not None and res.similarity < self._close_floor(found, float(res.similarity)):
            return False
        known.append(res.mask)
        found.append(Instance(res.mask, float(res.similarity), float(res.score), (x, y), v, self.source))
        return True

    def _concept_proposals(self, image, reference: Reference, key, known: List[np.ndarray], found: List[Instance],
                           n: int, deadline) -> List[Tuple[float, float, float]]:
        """SAM 3's detections as proposals. Its exemplars are boxes on *this* image: the known
        instances' (the clicked object), else the answer at the best similarity peak (kept as the
        first instance when it passes); a text reference prompts with its text as well."""
        from .masks import mask_box

        text = reference.text if reference.kind == "text" else None
        exemplars = [m for m in known if m.any()]
        if not exemplars and text is None:
            top = self._similarity_proposals(image, reference, key, 1)
            if top:
                res = self.runner.run([self.agent.job(image, top[0][:2], key, reference, deadline)])[0]
                if self._keep(top[0], res, known, found, nonempty=True):
                    exemplars = [found[-1].mask]
        if not exemplars and text is None:
            return []
        def detect():  # the detector reads the backbone's current image
            self.agent.backbone.set_image(image, key)
            return self.concepts.detect(boxes=[mask_box(m) for m in exemplars], text=text, image=image)

        dets = self.runner.call(detect)
        return [(d.click[0], d.click[1], d.score) for d in dets[:n]]
