"""What a project's answers depend on besides the models: its agent settings (the Connect form's
extra params), its references, the "all like this" thresholds learned from its annotators, and
the model version that names all of them.

The model version (``smartsam-<version>-<backbone>-<weights digest>[-<references digest>]
[-<settings>]``) changes whenever one of them does, so Label Studio and the pre-labeler never keep
predictions made for an old reference as current.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from backend.config import AgentSettings, Settings
from backend.serving.models import Models
from backend.store.db import DatabaseUnavailable
from backend.store.field_stats import FieldStats, calibrate_threshold
from backend.store.project_settings import ProjectSettings
from backend.store.references import CorruptReference, ReferenceStore
from smartsam import __version__
from smartsam.instances import rule_name
from smartsam.selector import Reference

log = logging.getLogger("smartsam.backend")

# Instance thresholds before a project's annotators have decided on 30 pre-labeled instances of a
# label (SMARTSAM_INSTANCE_THRESHOLD=auto). Starting points, not measured with real weights here:
# DINOv2 mask-pooled features of one category score high against each other; CLIP text
# similarities live on a much lower scale.
DEFAULT_INSTANCE_THRESHOLD = {"mask": 0.6, "image": 0.6, "text": 0.2}
MIN_DECISIONS = 30


@dataclass
class ProjectState:
    """What one request knows of a project, read at once: its agent settings, its references (or
    why there are none), its thresholds and the model version that names them. ``generation`` is
    the store's counter it was read at (None: the database did not answer)."""

    project: Optional[str]
    generation: Optional[int]
    agent_settings: AgentSettings
    version: str
    references: Dict[str, Tuple[Optional[Reference], Optional[str]]] = field(default_factory=dict)
    thresholds: Dict[Tuple[str, str], Tuple[float, str]] = field(default_factory=dict)
    unavailable: Optional[str] = None  # the database's error, when it did not answer

    def reference(self, label: str) -> Tuple[Optional[Reference], Optional[str]]:
        """``(reference or None, note)`` of a label."""
        if self.unavailable is not None:
            return None, f"{self.unavailable}: answered without the reference of {label!r} until it is back"
        return self.references.get(label, (None, None))


class Versions:
    """A project's agent settings, references, thresholds and model version, cached per project.

    A click reads the project's generation (one database read) and, when it has not moved since
    the last read, answers from what was cached then: the store's writes (references, settings,
    the annotators' decisions) bump it, on whichever replica they happen, so no process keeps
    what another changed.

    Args:
        settings: the backend's settings.
        models: the process's models (the feature extractors name what a reference needs).
        store: the reference store (and the projects' generations).
        project_settings: the projects' confirmed extra params.
        stats: the field statistics (the annotators' keep / delete decisions).
    """

    def __init__(self, settings: Settings, models: Models, store: ReferenceStore, project_settings: ProjectSettings,
                 stats: FieldStats) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.project_settings = project_settings
        self.stats = stats
        self._checkpoint_tag: Optional[str] = None
        self._cache: Dict[str, ProjectState] = {}
        self._lock = threading.Lock()
        self.refreshes = 0  # projects read again because their generation moved (or first seen)

    # -- the project as one request sees it ---------------------------------------------------
    def state(self, project: Optional[str], strict: bool = False) -> ProjectState:
        """The project as it stands now: one database read when nothing changed since the last
        request. With the database away: no references (each lookup says why), the backend's own
        agent settings and a version ending in ``-nodb``; ``strict`` (background work, which waits
        for the database) raises DatabaseUnavailable instead."""
        if project is None:
            return ProjectState(None, None, self.settings.agent, self.base_version())
        try:
            gen = self.store.generation(project)
            with self._lock:
                cached = self._cache.get(project)
            if cached is not None and cached.generation == gen:
                return cached
            state = self._read(project, gen)
        except DatabaseUnavailable as e:
            if strict:
                raise
            log.warning("project %s: the store is not readable (%s); answering without its references", project, e)
            return ProjectState(project, None, self.settings.agent, self.base_version() + "-nodb", unavailable=str(e))
        with self._lock:
            self._cache[project] = state
            self.refreshes += 1
        return state

    def _read(self, project: str, gen: int) -> ProjectState:
        agent = self.project_settings.agent(self.settings.agent, project)
        refs = self.store.list(project)
        references = {label: self._reference(project, label) for label in sorted({m.label for m in refs})}
        # raises DatabaseUnavailable like the reads above (state() decides what a request does then)
        thresholds = {(m.label, m.kind): instance_threshold(self.stats, self.settings, project, m.label, m.kind)[:2]
                      for m in refs}
        v = self.base_version() + f"-{references_digest(self.store, project, refs)}"
        if self.settings.proposals == "similarity" and any(how == "default" for _, how in thresholds.values()):
            v += "-" + rule_name().replace("adaptive-", "ad")  # the image-adaptive keep rule in force
        tag = agent.tag(self.settings.agent)
        if tag:
            v += f"-{tag}"
        learned = [(label, t) for (label, _), (t, how) in sorted(thresholds.items()) if how == "learned"]
        if learned:  # a new threshold pre-labels again
            v += "-thr" + hashlib.sha256(repr(sorted(set(learned))).encode()).hexdigest()[:6]
        return ProjectState(project, gen, agent, v, references, thresholds)

    def threshold(self, state: ProjectState, label: str, kind: str = "mask") -> Tuple[float, str]:
        """``(similarity threshold, how)`` for "all like this one" on a label of the project: the
        setting ("fixed"), the one learned from the annotators' keep / delete decisions once there
        are 30 ("learned", at SMARTSAM_INSTANCE_PRECISION), else the default ("default"). Read
        once per generation (a label without a reference is read at its first use)."""
        got = state.thresholds.get((label, kind))
        if got is not None:
            return got
        if state.unavailable is None:
            try:
                got = state.thresholds[(label, kind)] = instance_threshold(self.stats, self.settings, state.project,
                                                                           label, kind)[:2]
                return got
            except DatabaseUnavailable:
                pass  # answered with the fallback below, never cached: the next click reads again
        return instance_threshold(None, self.settings, state.project, label, kind)[:2]

    def _reference(self, project: str, label: str) -> Tuple[Optional[Reference], Optional[str]]:
        try:
            ref = self.store.get(project, label)
        except CorruptReference as e:
            log.error("project %s label %r: %s; answering without it", project, label, e)
            return None, f"stored reference for {label!r} is damaged ({e}); set it again"
        if ref is None:
            return None, None
        feats = self.models.features.for_reference(ref.kind)
        if ref.extractor != feats.name:
            return None, f"reference for {label!r} was made with {ref.extractor}, this backend uses {feats.name}; set it again"
        return ref, None

    # -- one at a time (tools, the admin page, the background) ---------------------------------
    def agent_settings(self, project: Optional[str]) -> AgentSettings:
        """The agent settings of a project: the backend's, with the project's confirmed extra
        params applied (the backend's own while the database does not answer)."""
        return self.state(project).agent_settings

    def model_version(self, project: Optional[str] = None, strict: bool = False) -> str:
        """``smartsam-<version>-<backbone>-<weights digest>[-<references digest>][-<settings>]``:
        changes when the checkpoint, the project's references, its thresholds or its agent
        settings change, so Label Studio and the pre-labeler never keep predictions made for an
        old reference as current. With the database away it ends in ``-nodb``, or, ``strict``,
        raises DatabaseUnavailable."""
        return self.state(project, strict).version

    def instance_threshold(self, project: str, label: str, kind: str = "mask") -> Tuple[float, str]:
        return self.threshold(self.state(project), label, kind)

    def reference(self, project: str, label: str) -> Tuple[Optional[Reference], Optional[str]]:
        return self.state(project).reference(label)

    def checkpoint_tag(self) -> str:
        """Short digest of the weights in use, so a new checkpoint gives a new model version."""
        if self._checkpoint_tag is None:
            self._checkpoint_tag = checkpoint_tag(self.settings)
        return self._checkpoint_tag

    def base_version(self) -> str:
        """The model version before any project's references or settings: the weights and the proposals."""
        v = f"smartsam-{__version__}-{self.settings.backbone_name}-{self.checkpoint_tag()}"
        if self.settings.proposals != "similarity":  # other proposals, other pre-labels
            v += f"-prop{self.settings.proposals}"
        return v


def instance_threshold(stats: Optional[FieldStats], settings: Settings, project: str, label: str, kind: str = "mask"):
    """``(threshold, how, calibration)``: see :meth:`Engine.instance_threshold` (``stats`` None:
    nothing learned is readable)."""
    cal = (stats.calibrate(project, label, settings.instance_precision, MIN_DECISIONS) if stats is not None else
           calibrate_threshold([], settings.instance_precision, MIN_DECISIONS))
    if settings.instance_threshold != "auto":
        return float(settings.instance_threshold), "fixed", cal
    if cal["threshold"] is not None:
        return float(cal["threshold"]), "learned", cal
    return DEFAULT_INSTANCE_THRESHOLD.get(kind, 0.6), "default", cal


def instance_report(stats: FieldStats, store: ReferenceStore, settings: Settings, project: Optional[str] = None):
    """Per project and label with a reference: the pre-labeled instances decided (kept / deleted),
    the precision / recall curve over them and the threshold in force (the admin page and
    ``python -m backend.cli.references stats`` show it)."""
    out = []
    for m in sorted({(m.project, m.label, m.kind) for m in store.list(project)}):
        t, how, cal = instance_threshold(stats, settings, m[0], m[1], m[2])
        out.append({"project": m[0], "label": m[1], "threshold": round(t, 4), "how": how, "decisions": cal["decisions"],
                    "kept": cal["kept"], "curve": cal["curve"]})
    return out


_TAG_CACHE: Dict[tuple, str] = {}


def checkpoint_tag(settings: Settings) -> str:
    """8 hex digits naming the weights: the published or recorded SHA-256 of the checkpoint, the
    hash of a local checkpoint file (computed once per file version), or "random"."""
    from smartsam.models import ModelError, checkpoint_path, get_spec, sha256_file

    try:
        spec = get_spec(settings.backbone_name)
    except ModelError:
        return "unknown"
    if spec.random:
        return "random"
    path = settings.checkpoint or str(checkpoint_path(spec, settings.sources))
    try:
        st = os.stat(path)
    except OSError:
        return (spec.sha256 or "missing")[:8]
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _TAG_CACHE:
        if not settings.checkpoint and spec.sha256:
            _TAG_CACHE[key] = spec.sha256[:8]  # verified against it before loading
        elif os.path.isdir(path):  # a repository model (SAM 3, HQ-SAM): its files' hashes together
            h = hashlib.sha256()
            for f in spec.files:
                h.update(sha256_file(os.path.join(path, f)).encode())
            _TAG_CACHE[key] = h.hexdigest()[:8]
        else:
            _TAG_CACHE[key] = sha256_file(path)[:8]
    return _TAG_CACHE[key]


def references_digest(store: ReferenceStore, project: str, refs=None) -> str:
    """8 hex digits over the project's references (labels and their stored features); "noref" when none."""
    refs = store.list(project) if refs is None else refs
    if not refs:
        return "noref"
    h = hashlib.sha256()
    for r in refs:
        h.update(f"{r.label}\0{r.kind}\0{r.feature_sha}\0".encode())
    return h.hexdigest()[:8]
