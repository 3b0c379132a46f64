"""The engine: the models, their scheduler, references and model versions, per process.

Built once per process by the composition root (:mod:`backend.server`) from :class:`Settings`;
the protocol adapter, the jobs, the admin API and pre-labeling all use the same one. The models
load in a background thread so ``/setup`` and ``/health`` answer at once; then one thread owns
them (:class:`~backend.scheduler.Scheduler`): requests submit work with a priority and wait for
it no longer than their deadline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from smartsam import __version__
from smartsam.agent import AgentResult, SmartSAMAgent, agent_options, answer_jobs
from smartsam.batch import Job
from smartsam.clickers import NextChainClicker
from smartsam.features import FeatureSet
from smartsam.instances import InstanceFinder, rule_name
from smartsam.reference import ReferenceBuilder
from smartsam.selector import Reference

from .config import AgentSettings, Settings
from .db import DatabaseUnavailable
from .errors import Busy, RequestError
from .field_stats import FieldStats, calibrate_threshold
from .images import ImageFetcher
from .ls_client import LabelStudioClient
from .project_settings import ProjectSettings
from .references import CorruptReference, ReferenceStore
from .scheduler import INTERACTIVE, Scheduler, scheduler_rows
from .threads import ThreadGovernor

log = logging.getLogger("smartsam.backend")

# Instance thresholds before a project's annotators have decided on 30 pre-labeled instances of a
# label (SMARTSAM_INSTANCE_THRESHOLD=auto). Starting points, not measured with real weights here:
# DINOv2 mask-pooled features of one category score high against each other; CLIP text
# similarities live on a much lower scale.
DEFAULT_INSTANCE_THRESHOLD = {"mask": 0.6, "image": 0.6, "text": 0.2}
MIN_DECISIONS = 30


def project_key(project) -> Optional[str]:
    """Label Studio sends "<id>.<created-timestamp>"; references are kept per project id. None
    when the request names no project (the SDK, scripts): pure-IS for that request."""
    if project is None or project == "":
        return None
    key = str(project).split(".")[0]
    if not (key.isascii() and key.isdigit()) or len(key) > 18:  # "²".isdigit() is true
        raise RequestError(f"project must be a Label Studio project id, got {str(project)[:40]!r}")
    return key


class Engine:
    """Per-process models and state.

    Args:
        settings: the backend's settings, read once by the caller.
        client: the Label Studio client (built from the settings when not given).
    """

    def __init__(self, settings: Settings, client: Optional[LabelStudioClient] = None,
                 governor: Optional[ThreadGovernor] = None) -> None:
        self.settings = settings
        self.governor = governor  # compute threads that follow the free cores (backend.threads)
        self.client = client or LabelStudioClient(settings)
        self.fetcher = ImageFetcher(settings, self.client)
        self.store = ReferenceStore(settings.data_dir, exemplars=settings.exemplars, database_url=settings.database_url)
        self.project_settings = ProjectSettings(settings.data_dir, settings.database_url)
        self.store.exemplars_for = lambda project: self.agent_settings(project).exemplars
        self.stats = FieldStats(settings.data_dir, settings.stats_max, settings.database_url)
        self.features = FeatureSet(loader=self._load_features)
        self.references = ReferenceBuilder(self.features, settings.reference_prep)
        self.scheduler: Optional[Scheduler] = None  # the model's one thread, once loaded
        self._agents_lock = threading.Lock()
        self.backbone = None
        self.concepts = None  # SAM 3's concept detector (SMARTSAM_PROPOSALS=sam3)
        self.load_error: Optional[str] = None
        self._loaded = threading.Event()
        self._agents: Dict[AgentSettings, SmartSAMAgent] = {}
        self._checkpoint_tag: Optional[str] = None
        # what the monitor saw last (health answers from these, never asking the database itself)
        self._db_seen: Dict = {"ok": None, "at": None, "error": None}
        self._version_seen: Optional[str] = None

    # -- loading ---------------------------------------------------------------------------
    def start_loading(self) -> None:
        threading.Thread(target=self.load, name="smartsam-load", daemon=True).start()

    def load(self) -> None:
        """Load the backbone (synchronously; :meth:`start_loading` runs it in a thread)."""
        from smartsam.models import ModelError, load_backbone

        try:
            # blobs no version names (e.g. copied from an earlier release's files)
            n = self.store.collect_garbage()
            if n:
                log.info("reference store: removed %d unused blobs", n)
        except (OSError, DatabaseUnavailable) as e:
            log.warning("reference store garbage collection failed: %s", e)
        try:
            bb = load_backbone(**self.settings.backbone_kwargs())
            if self.settings.proposals == "sam3":
                from smartsam.models import load_concept_proposer

                self.concepts = load_concept_proposer(bb, self.settings.checkpoint, sources=self.settings.sources)
            self.scheduler = Scheduler(bb, **scheduler_rows(self.settings.batch_rows, bb.device.type),
                                       before_work=self.governor.apply if self.governor is not None else None)
            self.backbone = bb
            log.info("model %s loaded on %s%s", bb.name, bb.device, " (RANDOM weights)" if bb.random_weights else "")
        except ModelError as e:
            self.load_error = str(e)
            log.error("model not loaded: %s", e)
        except Exception as e:  # never leave the server hanging in "loading"
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model not loaded")
        finally:
            self._loaded.set()

    def _load_features(self, kind: str):
        # features load on first need: pure-IS users never pay for DINOv2 / CLIP
        from smartsam.models import default_features, load_features

        s = self.settings
        random = bool(self.backbone is not None and self.backbone.random_weights) or s.backbone_name.endswith("-random") \
            or s.backbone_name == "disk-test"
        name = (s.features if kind == "image" else s.text_features) or default_features(kind, random)
        return load_features(name, s.device, s.dinov2_path if kind == "image" else s.clip_path)

    def ready(self, timeout: float = 300.0):
        """The loaded backbone (waits for loading up to ``timeout`` seconds). Busy while it is
        loading or when it failed to load: work that may wait (the background queue) is tried
        again later, by this process or another replica."""
        if not self._loaded.wait(max(0.0, timeout)):
            raise Busy("the model is still loading; try again in a moment")
        if self.backbone is None:
            raise Busy(f"the model failed to load: {self.load_error}")
        return self.backbone

    # -- agents ----------------------------------------------------------------------------
    def agent_settings(self, project: Optional[str]) -> AgentSettings:
        """The agent settings of a project: the backend's, with the project's confirmed extra
        params applied."""
        try:
            return self.project_settings.agent(self.settings.agent, project)
        except DatabaseUnavailable as e:  # the backend's own settings until the database is back
            log.warning("project %s: its agent settings are not readable (%s)", project, e)
            return self.settings.agent

    def agent(self, agent_settings: Optional[AgentSettings] = None, deadline: Optional[float] = None) -> SmartSAMAgent:
        """The agent for these settings (one per distinct settings, sharing the backbone); waits
        for the model to load until ``deadline`` (``time.monotonic()``) at most."""
        a = agent_settings or self.settings.agent
        bb = self.ready(300.0 if deadline is None else deadline - time.monotonic())
        with self._agents_lock:
            agent = self._agents.get(a)
            if agent is None:
                s = self.settings
                # SMARTSAM_FAST_PATH and SMARTSAM_REQUIRE_CLICK: the same settings as the CLI and eval
                agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=a.chain_length), seed=s.seed,
                                      features=self.features,
                                      **agent_options(a.fast_path, a.require_click, s.reference_prep))
                self._agents[a] = agent
        return agent

    def _scheduler(self, deadline: Optional[float]) -> Scheduler:
        self.ready(max(0.0, (deadline or time.monotonic() + 300) - time.monotonic()))
        return self.scheduler

    def call(self, fn: Callable[[], object], priority: int = INTERACTIVE, deadline: Optional[float] = None):
        """Run ``fn()`` on the model's thread (it may use the backbone, the agents and the feature
        extractors); waits no longer than ``deadline`` (``time.monotonic()``): Busy, or QueueFull
        at once when the work ahead would not finish by then."""
        return self._scheduler(deadline).call(fn, priority, deadline)

    def run_jobs(self, jobs: Sequence[Job], priority: int = INTERACTIVE, deadline: Optional[float] = None) -> List[AgentResult]:
        """Answer agent jobs on the model's thread, in lockstep with everything else live there; an
        answer given before to the same click on the same image is served again."""
        return answer_jobs(jobs, lambda todo: self._scheduler(deadline).run(todo, priority, deadline))

    def health(self) -> Dict:
        """Never waits for the model or the database: it answers at once even while clicks are
        running and while the database does not answer (its state as last seen, with its age)."""
        bb = self.backbone
        return {
            "status": "ERROR" if self.load_error else "UP",
            "model": bb.name if bb else self.settings.backbone_name,
            "device": str(bb.device) if bb else None,
            "weights_loaded": bb is not None,
            "loading": not self._loaded.is_set(),
            "random_weights": bool(bb and bb.random_weights),
            "load_error": self.load_error,
            "encoder_calls": bb.encoder_calls if bb else 0,
            "decoder_calls": bb.decoder_calls if bb else 0,
            "decoder_passes": bb.decoder_passes if bb else 0,
            "scheduler": self.scheduler.health() if self.scheduler is not None else None,
            "embedding_disk_hits": bb.disk_hits if bb else 0,
            "proposals": self.settings.proposals,
            "version": __version__,
            "model_version": self._version_seen,
            "database": self.database_health(),
            "statistics": {"waiting": self.stats.pending, "dropped": self.stats.dropped, "lost": self.stats.lost},
            "compute_threads": self.governor.health() if self.governor is not None else None,
        }

    def database_health(self) -> Dict:
        """The store's engine and whether it answered when last asked (:meth:`probe_database`,
        every second from the composition root's monitor), with the age of that answer."""
        db = self.store.db
        seen = self._db_seen
        out = {"engine": db.dialect, "url": db.where(), "ok": seen["ok"],
               "age_s": None if seen["at"] is None else round(time.monotonic() - seen["at"], 1)}
        if seen["error"]:
            out["error"] = f"{seen['error']}: clicks answer without references until it is back"
        return out

    def probe_database(self) -> None:
        """Ask the database a short query now (the monitor thread; never a request)."""
        try:
            self.store.db.ping()
            self._db_seen = {"ok": True, "at": time.monotonic(), "error": None}
        except DatabaseUnavailable as e:
            self._db_seen = {"ok": False, "at": time.monotonic(), "error": str(e)}
        if self.backbone is not None and self._version_seen is None:
            self._version_seen = self.base_version()  # the weights' digest: once, off any request

    # -- versions --------------------------------------------------------------------------
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

    def model_version(self, project: Optional[str] = None, agent_settings: Optional[AgentSettings] = None,
                      strict: bool = False) -> str:
        """``smartsam-<version>-<backbone>-<weights digest>[-<references digest>][-<settings>]``:
        changes when the checkpoint, the project's references or its agent settings change, so
        Label Studio and the pre-labeler never keep predictions made for an old reference as
        current. Compute it once per request (it reads the reference store). With the database
        away it ends in ``-nodb``, or, ``strict`` (background work, which waits for it), raises
        DatabaseUnavailable."""
        v = self.base_version()
        if project is not None:
            try:
                refs = self.store.list(project)
            except DatabaseUnavailable:  # answers without references meanwhile: say so in the version
                if strict:
                    raise
                return v + "-nodb"
            v += f"-{references_digest(self.store, project, refs)}"
            thresholds = [(m.label, self.instance_threshold(project, m.label, m.kind)) for m in refs]
            if self.settings.proposals == "similarity" and any(how == "default" for _, (_, how) in thresholds):
                v += "-" + rule_name().replace("adaptive-", "ad")  # the image-adaptive keep rule in force
            tag = (agent_settings or self.agent_settings(project)).tag(self.settings.agent)
            if tag:
                v += f"-{tag}"
            learned = [(label, t) for label, (t, how) in sorted(set(thresholds)) if how == "learned"]
            if learned:  # a new threshold pre-labels again
                v += "-thr" + hashlib.sha256(repr(learned).encode()).hexdigest()[:6]
        return v

    def instance_finder(self, agent: SmartSAMAgent, threshold: float, how: str, priority: int = INTERACTIVE,
                        deadline: Optional[float] = None) -> InstanceFinder:
        """"All like this one" with this backend's proposals (SMARTSAM_PROPOSALS), its model work
        on the scheduler at ``priority``; ``threshold, how`` from :meth:`instance_threshold`: the
        default threshold comes with the image-adaptive rule (smartsam.instances), a learned or
        set one alone. Proposals run in rounds of 16 jobs on CUDA (a round costs about one job
        there) and one at a time on a CPU (where a round costs all its jobs and patience would
        have stopped after three misses)."""
        rounds = 1 if self.ready().device.type == "cpu" else 16
        return InstanceFinder(agent, self.settings.max_instances, threshold, concepts=self.concepts, round_size=rounds,
                              runner=ScheduledRunner(self, priority, deadline), adaptive=how == "default")

    def instance_threshold(self, project: str, label: str, kind: str = "mask") -> Tuple[float, str]:
        """``(similarity threshold, how)`` for "all like this one" on a project's label: the
        setting ("fixed"), the one learned from the annotators' keep / delete decisions once there
        are 30 ("learned", at SMARTSAM_INSTANCE_PRECISION), else the default ("default")."""
        try:
            return instance_threshold(self.stats, self.settings, project, label, kind)[:2]
        except DatabaseUnavailable:
            return instance_threshold(None, self.settings, project, label, kind)[:2]

    # -- references ------------------------------------------------------------------------
    def reference(self, project: str, label: str, strict: bool = False) -> Tuple[Optional[Reference], Optional[str]]:
        """(reference or None, note): a damaged stored reference is reported, not used; with the
        database away, a click goes on without it (``strict``: DatabaseUnavailable)."""
        try:
            ref = self.store.get(project, label)
        except DatabaseUnavailable as e:
            if strict:
                raise
            log.error("project %s label %r: %s; answering without its reference", project, label, e)
            return None, f"{e}: answered without the reference of {label!r} until it is back"
        except CorruptReference as e:
            log.error("project %s label %r: %s; answering without it", project, label, e)
            return None, f"stored reference for {label!r} is damaged ({e}); set it again"
        if ref is None:
            return None, None
        feats = self.features.for_reference(ref.kind)
        if ref.extractor != feats.name:
            return None, f"reference for {label!r} was made with {ref.extractor}, this backend uses {feats.name}; set it again"
        return ref, None

    def make_reference(self, image: Optional[np.ndarray], mask: Optional[np.ndarray] = None,
                       text: Optional[str] = None) -> Reference:
        """A reference from a text, an image + mask or an image (on the model's thread: the
        extractors are not thread-safe)."""
        if text is not None:
            self.features.get("text")
            return self.call(lambda: self.references.from_text(text))
        self.features.get("image")
        return self.call(lambda: self.references.from_mask(image, mask) if mask is not None else
                         self.references.from_image(image))


class ScheduledRunner:
    """An :class:`~smartsam.instances.InstanceFinder`'s model work on the engine's scheduler."""

    def __init__(self, engine: Engine, priority: int, deadline: Optional[float]) -> None:
        self.engine, self.priority, self.deadline = engine, priority, deadline

    def call(self, fn):
        return self.engine.call(fn, self.priority, self.deadline)

    def run(self, jobs):
        return self.engine.run_jobs(jobs, self.priority, self.deadline)


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
    ``python -m backend.admin stats`` show it)."""
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
