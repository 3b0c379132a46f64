"""The process's models and the one thread that owns them.

Built once per process by the composition root (:mod:`backend.server`) from :class:`Settings`.
The backbone loads in a background thread so ``/setup`` and ``/health`` answer at once; then one
thread owns it (:class:`~backend.serving.scheduler.Scheduler`): requests submit work with a
priority and wait for it no longer than their deadline. The feature extractors (DINOv2, CLIP)
load on first need, on the same thread. What a project's answers depend on besides the models
(its agent settings, references, thresholds, model version) is :mod:`backend.serving.versions`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from backend.config import AgentSettings, Settings
from backend.errors import Busy
from backend.serving.scheduler import INTERACTIVE, Scheduler, scheduler_rows
from backend.serving.threads import ThreadGovernor
from smartsam import __version__
from smartsam.agent import AgentResult, SmartSAMAgent, agent_options, answer_jobs
from smartsam.batch import Job
from smartsam.clickers import NextChainClicker
from smartsam.features import FeatureSet
from smartsam.instances import InstanceFinder
from smartsam.reference import ReferenceBuilder
from smartsam.selector import Reference

log = logging.getLogger("smartsam.backend")


class Models:
    """The backbone, the agents over it, the feature extractors and the scheduler.

    Args:
        settings: the backend's settings, read once by the caller.
        governor: compute threads that follow the free cores (:mod:`backend.serving.threads`),
            applied on the model's thread before each step.
        on_loaded: called on the loading thread once the weights are in, before the backbone is
            published (the composition root computes the base model version there, so the first
            health answer that says ``weights_loaded`` also names the version).
    """

    def __init__(self, settings: Settings, governor: Optional[ThreadGovernor] = None,
                 on_loaded: Optional[Callable[[], None]] = None) -> None:
        self.settings = settings
        self.governor = governor
        self.on_loaded = on_loaded
        self.features = FeatureSet(loader=self._load_features)
        self.references = ReferenceBuilder(self.features, settings.reference_prep)
        self.scheduler: Optional[Scheduler] = None  # the model's one thread, once loaded
        self._agents_lock = threading.Lock()
        self.backbone = None
        self.concepts = None  # SAM 3's concept detector (SMARTSAM_PROPOSALS=sam3)
        self.load_error: Optional[str] = None
        self.warming = False  # compiling the decoder step before the model serves (SMARTSAM_COMPILE)
        self._loaded = threading.Event()
        self._agents: Dict[AgentSettings, SmartSAMAgent] = {}

    # -- loading ---------------------------------------------------------------------------
    def start_loading(self) -> None:
        threading.Thread(target=self.load, name="smartsam-load", daemon=True).start()

    def load(self) -> None:
        """Load the backbone (synchronously; :meth:`start_loading` runs it in a thread)."""
        from smartsam.models import ModelError, load_backbone

        try:
            bb = load_backbone(**self.settings.backbone_kwargs())
            if self.settings.proposals == "sam3":
                from smartsam.models import load_concept_proposer

                self.concepts = load_concept_proposer(bb, self.settings.checkpoint, sources=self.settings.sources)
            self.scheduler = Scheduler(bb, **scheduler_rows(self.settings.batch_rows, bb.device.type),
                                       before_work=self.governor.apply if self.governor is not None else None)
            if bb.compiled_step() is not None:
                self._warm_up(bb, self.scheduler)
            if self.on_loaded is not None:
                self.on_loaded()
            self.backbone = bb
            log.info("model %s loaded on %s%s", bb.name, bb.device, " (RANDOM weights)" if bb.random_weights else "")
        except ModelError as e:
            self.load_error = str(e)
            log.error("model not loaded: %s", e)
        except Exception as e:  # never leave the server hanging in "loading"
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model not loaded")
        finally:
            self.warming = False
            self._loaded.set()

    def _warm_up(self, bb, scheduler: Scheduler) -> None:
        """The decoder step compiled for the default agent's kinds of call now, on the model's
        thread (CUDA graphs belong to the thread that records them), before the backbone is
        published: no annotator's click pays a compilation (health says "warming" meanwhile). A
        compiler that fails (no C++ compiler, an unsupported operator) leaves the model eager,
        said in health (``compiled_step.error``)."""
        self.warming = True
        t = time.monotonic()
        try:
            agent = self._make_agent(bb, self.settings.agent)
            log.info("decoder step compiled in %.0f s: %s", time.monotonic() - t, scheduler.call(agent.warm_up))
        finally:
            self.warming = False

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
    def agent(self, agent_settings: Optional[AgentSettings] = None, deadline: Optional[float] = None) -> SmartSAMAgent:
        """The agent for these settings (one per distinct settings, sharing the backbone); waits
        for the model to load until ``deadline`` (``time.monotonic()``) at most."""
        a = agent_settings or self.settings.agent
        bb = self.ready(300.0 if deadline is None else deadline - time.monotonic())
        with self._agents_lock:
            agent = self._agents.get(a)
            if agent is None:
                agent = self._agents[a] = self._make_agent(bb, a)
        return agent

    def _make_agent(self, bb, a: AgentSettings) -> SmartSAMAgent:
        s = self.settings
        # SMARTSAM_FAST_PATH and SMARTSAM_REQUIRE_CLICK: the same settings as the CLI and eval
        return SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=a.chain_length), seed=s.seed, features=self.features,
                             **agent_options(a.fast_path, a.require_click, s.reference_prep))

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
        step = bb.compiled_step() if bb is not None else None
        return {
            "status": "ERROR" if self.load_error else "UP",
            "model": bb.name if bb else self.settings.backbone_name,
            "device": str(bb.device) if bb else None,
            "weights_loaded": bb is not None,
            "loading": not self._loaded.is_set(),
            "warming": self.warming,
            "compiled_step": step.health() if step is not None else None,
            "random_weights": bool(bb and bb.random_weights),
            "load_error": self.load_error,
            "encoder_calls": bb.encoder_calls if bb else 0,
            "decoder_calls": bb.decoder_calls if bb else 0,
            "decoder_passes": bb.decoder_passes if bb else 0,
            "scheduler": self.scheduler.health() if self.scheduler is not None else None,
            "embedding_disk_hits": bb.disk_hits if bb else 0,
            "proposals": self.settings.proposals,
            "version": __version__,
            "compute_threads": self.governor.health() if self.governor is not None else None,
        }

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
    """An :class:`~smartsam.instances.InstanceFinder`'s model work on the scheduler."""

    def __init__(self, models: Models, priority: int, deadline: Optional[float]) -> None:
        self.models, self.priority, self.deadline = models, priority, deadline

    def call(self, fn):
        return self.models.call(fn, self.priority, self.deadline)

    def run(self, jobs):
        return self.models.run_jobs(jobs, self.priority, self.deadline)
