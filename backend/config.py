"""The backend's settings: read from the environment once, then passed down as one object.

:meth:`Settings.from_env` is the only reader of the backend's environment variables (listed in the
README, "Operating it"). The launcher, the gunicorn configuration, the app, the jobs and
pre-labeling take the same object; Ray workers get the driver's, pickled. ``smartsam`` (the
library) reads none of them: :meth:`Settings.backbone_kwargs` and :meth:`agent` turn them into
its constructor arguments, and ``SMARTSAM_HOME``, ``SMARTSAM_MIRROR``, ``HF_ENDPOINT``, ``HF_TOKEN``
into :class:`smartsam.sources.Sources` (:attr:`Settings.sources`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple
from urllib.parse import urlparse

from backend.errors import SettingsError
from smartsam.sources import Sources

FAST_PATHS = ("auto", "on", "off")
REFERENCE_PREPS = ("paper", "none")
ON_OFF_AUTO = ("auto", "on", "off")


@dataclass(frozen=True)
class AgentSettings:
    """The agent's knobs a project may set for itself (Label Studio's Connect form, "Extra params").

    Attributes:
        chain_length: clicks per chain (paper: 3; 0: no chains).
        exemplars: K, references kept per label at once (paper: 1).
        fast_path: "auto", "on" or "off" (see :func:`smartsam.agent.agent_options`).
        require_click: reference mode only lets candidates containing the click win.
    """

    chain_length: int = 3
    exemplars: int = 1
    fast_path: str = "auto"
    require_click: bool = True

    KEYS = ("chain_length", "exemplars", "fast_path", "require_click")

    def __post_init__(self) -> None:
        if isinstance(self.chain_length, bool) or not isinstance(self.chain_length, int) or not 0 <= self.chain_length <= 10:
            raise SettingsError(f"chain_length must be a whole number from 0 to 10, not {self.chain_length!r}")
        if isinstance(self.exemplars, bool) or not isinstance(self.exemplars, int) or not 1 <= self.exemplars <= 16:
            raise SettingsError(f"exemplars must be a whole number from 1 to 16, not {self.exemplars!r}")
        if self.fast_path not in FAST_PATHS:
            raise SettingsError(f"fast_path must be auto, on or off, not {self.fast_path!r}")
        if not isinstance(self.require_click, bool):
            raise SettingsError(f"require_click must be true or false, not {self.require_click!r}")

    def with_extra_params(self, extra: Optional[Mapping]) -> "AgentSettings":
        """These settings with a project's ``extra_params`` applied (validated; unknown keys and bad
        values raise SettingsError naming them)."""
        if not extra:
            return self
        if not isinstance(extra, Mapping):
            raise SettingsError("extra params must be a JSON object, e.g. {\"chain_length\": 1}")
        unknown = sorted(set(extra) - set(self.KEYS))
        if unknown:
            raise SettingsError(f"unknown extra params {unknown}: SmartSAM takes {list(self.KEYS)}")
        values = dict(extra)
        if isinstance(values.get("fast_path"), str):
            values["fast_path"] = values["fast_path"].strip().lower()
        return dataclasses.replace(self, **values)

    def overrides(self, base: "AgentSettings") -> Dict[str, object]:
        """The settings that differ from ``base`` (what a project changed)."""
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k) != getattr(base, k)}

    def tag(self, base: "AgentSettings") -> str:
        """A model-version suffix naming what differs from ``base`` ("" when nothing does)."""
        short = {"chain_length": "chain", "exemplars": "k", "fast_path": "fast", "require_click": "click"}
        parts = []
        for k, v in self.overrides(base).items():
            parts.append(f"{short[k]}{({True: 'on', False: 'off'}.get(v, v) if isinstance(v, bool) else v)}")
        return "-".join(parts)


def compare_share(spec: Optional[str]) -> float:
    """``SMARTSAM_COMPARE``: ``plain:0.2`` -> 0.2 (the share of first clicks the plain backbone
    answers); unset -> 0. ValueError when malformed."""
    if not spec:
        return 0.0
    arm, _, share = spec.partition(":")
    if arm.strip().lower() != "plain":
        raise ValueError(f"SMARTSAM_COMPARE must look like plain:0.2, not {spec!r}")
    try:
        v = float(share)
    except ValueError:
        raise ValueError(f"SMARTSAM_COMPARE must look like plain:0.2, not {spec!r}") from None
    if not 0 <= v <= 1:
        raise ValueError("SMARTSAM_COMPARE's share must be between 0 and 1")
    return v


def valid_wait_policy(value: str) -> bool:
    """``SMARTSAM_WAIT_POLICY``: adaptive, passive, active or spin:<count> (backend/serving/threads.py)."""
    if value in ("adaptive", "passive", "active"):
        return True
    kind, _, n = value.partition(":")
    return kind == "spin" and n.isascii() and n.isdigit() and len(n) <= 12


def _flag(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Every setting of the backend, with its default. Build with :meth:`from_env` (the service)
    or directly with keyword arguments (tests, tools)."""

    label_studio_url: Optional[str] = None
    label_studio_api_key: Optional[str] = None
    data_dir: Path = Path("./smartsam-data")
    # postgresql://user:password@host:port/db: one database for every replica; None: SQLite files in data_dir
    database_url: Optional[str] = field(default=None, repr=False)  # never printed: it may hold a password
    # a replica's claim on a queued task or notice lasts this long without renewal (renewed every third)
    queue_lease: float = 30.0
    # background work that fails for a reason that may pass (Label Studio or the database away) is
    # tried again, waiting twice as long each time up to retry_max_delay, for retry_for seconds,
    # then given up and kept on the admin page (Label Studio never resends a webhook)
    retry_for: float = 86400.0
    retry_max_delay: float = 300.0
    # balancers whose X-Forwarded-For names the sender (webhook notices are queued per sender)
    trusted_proxies: Tuple = ()
    backbone: Optional[str] = None  # None: the registry's default for this host
    checkpoint: Optional[str] = None
    features: Optional[str] = None
    text_features: Optional[str] = None
    dinov2_path: Optional[str] = None
    clip_path: Optional[str] = None
    device: Optional[str] = None
    admin_token: Optional[str] = None
    basic_auth_user: Optional[str] = None
    basic_auth_pass: Optional[str] = None
    allowed_hosts: Tuple[str, ...] = ()
    local_files_root: Optional[str] = None
    max_request_bytes: int = 8 << 20
    image_max_bytes: int = 50 << 20
    image_timeout: float = 20.0
    # how long a prediction write may wait for Label Studio's answer (at least image_timeout); a
    # write with no answer is looked for again only after it plus 5 s, never written twice
    write_timeout: float = 30.0
    max_pixels: int = 40_000_000
    embedding_cache: int = 8
    image_cache: int = 16
    seed: int = 0
    # Clicks per chain (paper: 3). Fewer trades quality for speed on small CPUs; 0 = no chains.
    chain_length: int = 3
    fast_path: str = "auto"
    require_click: bool = True
    # K: references kept per label at once (the first K submitted masks); 1 is the paper
    exemplars: int = 1
    # "paper": image + mask references cropped (object ~70 %) with the background removed; "none": raw
    reference_prep: str = "paper"
    cpu_bf16: str = "auto"
    shared_decoder: str = "on"
    # the shared decoder's step through torch.compile, warmed up before the model serves
    compile: str = "auto"
    embed_cache_dir: Optional[str] = None
    embed_cache_bytes: int = 10 << 30
    # A task's image as a data: URL is anything the sender wants; off unless a deployment needs it.
    allow_data_urls: bool = False
    # Every request (fetch, wait for the model, agent) ends by then; Label Studio gives up at 100 s.
    request_timeout: float = 90.0
    # A /predict with many tasks answers after this many seconds; the rest go on in the background.
    predict_budget: float = 60.0
    # Shared secret Label Studio sends with each webhook (a custom header); required when set.
    webhook_secret: Optional[str] = None
    # gunicorn: worker processes (each holds a model) and threads per worker (model requests use
    # at most threads - 1, so /health always has one). A request waiting for the model's thread
    # only holds an idle thread, so there are enough for a team clicking at once.
    workers: int = 1
    threads: int = 32
    # compute threads (torch, OpenCV) per worker; 0: the cores this process may use (affinity and
    # cgroup quota) shared out among the workers (backend/serving/threads.py)
    torch_threads: int = 0
    # "adaptive": OpenMP's own spin while the cores are free, fewer compute threads while other
    # processes use them; or a fixed "passive", "active", "spin:<count>" (backend/serving/threads.py)
    wait_policy: str = "adaptive"
    # tasks ahead whose images are encoded while an annotator works (backend/serving/prefetch.py); 0: off
    prefetch: int = 2
    # decoder rows per step of the model's scheduler; 0: 256 on a CPU, 1024 on CUDA (backend/serving/scheduler.py, scheduler_rows)
    batch_rows: int = 0
    host: str = "0.0.0.0"
    port: int = 9090
    log_level: str = "INFO"
    # polygon answers: every connected component of at least this many pixels ("all"), or the largest
    polygon_parts: str = "all"
    polygon_min_area: int = 16
    # pre-labels: every instance like the reference, at most this many per label per task
    max_instances: int = 20
    # "auto" (learned from the annotators' keep / delete decisions) or a similarity in [-1, 1]
    instance_threshold: str = "auto"
    # "auto" picks the threshold that keeps this precision with the most recall
    instance_precision: float = 0.9
    # where "all like this one" finds instances: "similarity" (DINOv2 / CLIP peaks) or "sam3"
    # (SAM 3's concept detector; needs SMARTSAM_BACKBONE=sam3)
    proposals: str = "similarity"
    # field statistics: "plain:0.2" answers that share of first clicks with the plain backbone
    compare: Optional[str] = None
    stats_max: int = 20000
    # where checkpoints are cached and fetched from (SMARTSAM_HOME, SMARTSAM_MIRROR, HF_ENDPOINT, HF_TOKEN)
    sources: Sources = field(default_factory=Sources)

    # environment variable -> field (the README's table, in its order)
    ENV = {
        "LABEL_STUDIO_URL": "label_studio_url", "LABEL_STUDIO_API_KEY": "label_studio_api_key",
        "SMARTSAM_BACKBONE": "backbone", "SMARTSAM_CHECKPOINT": "checkpoint", "SMARTSAM_DEVICE": "device",
        "SMARTSAM_FEATURES": "features", "SMARTSAM_TEXT_FEATURES": "text_features",
        "SMARTSAM_DINOV2_PATH": "dinov2_path", "SMARTSAM_CLIP_PATH": "clip_path", "SMARTSAM_DATA_DIR": "data_dir",
        "SMARTSAM_DATABASE_URL": "database_url", "SMARTSAM_QUEUE_LEASE": "queue_lease",
        "SMARTSAM_RETRY_FOR": "retry_for", "SMARTSAM_RETRY_MAX_DELAY": "retry_max_delay",
        "SMARTSAM_TRUSTED_PROXIES": "trusted_proxies",
        "SMARTSAM_ADMIN_TOKEN": "admin_token", "BASIC_AUTH_USER": "basic_auth_user", "BASIC_AUTH_PASS": "basic_auth_pass",
        "SMARTSAM_WEBHOOK_SECRET": "webhook_secret", "SMARTSAM_ALLOW_DATA_URLS": "allow_data_urls",
        "SMARTSAM_PREDICT_BUDGET": "predict_budget", "SMARTSAM_ALLOWED_HOSTS": "allowed_hosts",
        "LOCAL_FILES_DOCUMENT_ROOT": "local_files_root", "SMARTSAM_MAX_REQUEST_BYTES": "max_request_bytes",
        "SMARTSAM_IMAGE_MAX_BYTES": "image_max_bytes", "SMARTSAM_IMAGE_TIMEOUT": "image_timeout", "SMARTSAM_WRITE_TIMEOUT": "write_timeout",
        "SMARTSAM_MAX_PIXELS": "max_pixels", "SMARTSAM_EMBEDDING_CACHE": "embedding_cache",
        "SMARTSAM_IMAGE_CACHE": "image_cache", "SMARTSAM_WORKERS": "workers", "SMARTSAM_THREADS": "threads",
        "SMARTSAM_TORCH_THREADS": "torch_threads", "SMARTSAM_WAIT_POLICY": "wait_policy",
        "SMARTSAM_BATCH_ROWS": "batch_rows", "SMARTSAM_PREFETCH": "prefetch", "SMARTSAM_REQUEST_TIMEOUT": "request_timeout", "SMARTSAM_SEED": "seed", "SMARTSAM_CHAIN_LENGTH": "chain_length",
        "SMARTSAM_FAST_PATH": "fast_path", "SMARTSAM_REQUIRE_CLICK": "require_click", "SMARTSAM_COMPARE": "compare",
        "SMARTSAM_STATS_MAX": "stats_max", "SMARTSAM_EXEMPLARS": "exemplars", "SMARTSAM_REFERENCE_PREP": "reference_prep",
        "SMARTSAM_CPU_BF16": "cpu_bf16", "SMARTSAM_SHARED_DECODER": "shared_decoder", "SMARTSAM_COMPILE": "compile",
        "SMARTSAM_EMBED_CACHE_DIR": "embed_cache_dir", "SMARTSAM_EMBED_CACHE_BYTES": "embed_cache_bytes",
        "SMARTSAM_POLYGON_PARTS": "polygon_parts", "SMARTSAM_POLYGON_MIN_AREA": "polygon_min_area",
        "SMARTSAM_MAX_INSTANCES": "max_instances", "SMARTSAM_INSTANCE_THRESHOLD": "instance_threshold",
        "SMARTSAM_INSTANCE_PRECISION": "instance_precision", "SMARTSAM_PROPOSALS": "proposals",
        "HOST": "host", "PORT": "port", "LOG_LEVEL": "log_level",
    }

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides) -> "Settings":
        """The settings the environment gives (unset or empty variables keep their defaults)."""
        environ = os.environ if environ is None else environ
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values: Dict[str, object] = {}
        for var, name in cls.ENV.items():
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            kind = types[name]
            try:
                if name == "allowed_hosts":
                    v: object = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
                elif name == "trusted_proxies":
                    v = tuple(ipaddress.ip_network(h.strip(), strict=False) for h in raw.split(",") if h.strip())
                elif name == "data_dir":
                    v = Path(raw)
                elif kind in ("int", int):
                    v = int(raw)
                elif kind in ("float", float):
                    v = float(raw)
                elif kind in ("bool", bool):
                    v = _flag(raw)
                elif name in ("fast_path", "reference_prep", "cpu_bf16", "shared_decoder", "compile", "polygon_parts", "instance_threshold",
                              "proposals", "wait_policy"):
                    v = raw.strip().lower()
                else:
                    v = raw
            except ValueError:
                if name == "trusted_proxies":
                    raise SettingsError(f"{var}={raw!r}: give addresses or networks (127.0.0.1,10.0.0.0/8)") from None
                raise SettingsError(f"{var}={raw!r} is not a {'whole number' if kind in ('int', int) else 'number'}") from None
            values[name] = v
        values["sources"] = Sources.from_environ(environ)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        if self.local_files_root is not None and Path(self.local_files_root).resolve() == Path("/"):
            raise SettingsError("LOCAL_FILES_DOCUMENT_ROOT=/ would let any task read any file of this machine: set it "
                                "to the folder that holds the images")
        if self.exemplars < 1:
            raise SettingsError("SMARTSAM_EXEMPLARS must be at least 1")
        if self.database_url is not None and not self.database_url.split("://", 1)[0].split("+")[0] in (
                "postgresql", "postgres", "sqlite"):
            raise SettingsError("SMARTSAM_DATABASE_URL must start with postgresql:// (or sqlite:///)")
        if self.queue_lease <= 0:
            raise SettingsError("SMARTSAM_QUEUE_LEASE must be more than 0 seconds")
        if not (self.retry_for >= 0 and self.retry_max_delay > 0):
            raise SettingsError("SMARTSAM_RETRY_FOR must be 0 or more seconds and SMARTSAM_RETRY_MAX_DELAY more than 0")
        if self.reference_prep not in REFERENCE_PREPS:
            raise SettingsError("SMARTSAM_REFERENCE_PREP must be paper or none")
        if self.fast_path not in FAST_PATHS:
            raise SettingsError(f"SMARTSAM_FAST_PATH must be auto, on or off, not {self.fast_path!r}")
        if self.cpu_bf16 not in ON_OFF_AUTO:
            raise SettingsError(f"SMARTSAM_CPU_BF16 must be auto, on or off, not {self.cpu_bf16!r}")
        if self.compile not in ON_OFF_AUTO:
            raise SettingsError(f"SMARTSAM_COMPILE must be auto, on or off, not {self.compile!r}")
        if self.shared_decoder not in ("on", "off"):
            raise SettingsError(f"SMARTSAM_SHARED_DECODER must be on or off, not {self.shared_decoder!r}")
        if self.chain_length < 0:
            raise SettingsError("SMARTSAM_CHAIN_LENGTH must be 0 or more")
        if not self.write_timeout > 0:
            raise SettingsError("SMARTSAM_WRITE_TIMEOUT must be more than 0 seconds")
        if self.request_timeout <= 0 or self.predict_budget <= 0:
            raise SettingsError("SMARTSAM_REQUEST_TIMEOUT and SMARTSAM_PREDICT_BUDGET must be positive seconds")
        if self.threads < 2:
            raise SettingsError("SMARTSAM_THREADS must be at least 2 (one thread stays free for /health)")
        if self.workers < 1:
            raise SettingsError("SMARTSAM_WORKERS must be at least 1")
        if self.torch_threads < 0:
            raise SettingsError("SMARTSAM_TORCH_THREADS must be 0 (from the usable cores) or a number of threads")
        if not valid_wait_policy(self.wait_policy):
            raise SettingsError(f"SMARTSAM_WAIT_POLICY must be adaptive, passive, active or spin:<count>, not "
                                f"{self.wait_policy!r}")
        if self.prefetch < 0:
            raise SettingsError("SMARTSAM_PREFETCH must be 0 (off) or a number of tasks")
        if self.batch_rows < 0:
            raise SettingsError("SMARTSAM_BATCH_ROWS must be 0 (by device) or a number of decoder rows")
        if self.polygon_parts not in ("all", "largest"):
            raise SettingsError(f"SMARTSAM_POLYGON_PARTS must be all or largest, not {self.polygon_parts!r}")
        if self.polygon_min_area < 1:
            raise SettingsError("SMARTSAM_POLYGON_MIN_AREA must be at least 1 pixel")
        if not 1 <= self.max_instances <= 1000:
            raise SettingsError(f"SMARTSAM_MAX_INSTANCES must be from 1 to 1000, not {self.max_instances}")
        if self.instance_threshold != "auto":
            try:
                t = float(self.instance_threshold)
            except ValueError:
                t = float("nan")
            if not -1.0 <= t <= 1.0:
                raise SettingsError(f"SMARTSAM_INSTANCE_THRESHOLD must be auto or a similarity in [-1, 1], not "
                                    f"{self.instance_threshold!r}")
        if self.proposals not in ("similarity", "sam3"):
            raise SettingsError(f"SMARTSAM_PROPOSALS must be similarity or sam3, not {self.proposals!r}")
        if self.proposals == "sam3" and self.backbone and not self.backbone.startswith(("sam3", "disk-test")):
            raise SettingsError(f"SMARTSAM_PROPOSALS=sam3 uses SAM 3's concept detector: set SMARTSAM_BACKBONE=sam3 "
                                f"(it is {self.backbone}), or SMARTSAM_PROPOSALS=similarity")
        if not 0.0 < self.instance_precision <= 1.0:
            raise SettingsError("SMARTSAM_INSTANCE_PRECISION must be in (0, 1]")
        if self.max_pixels < 1:
            raise SettingsError("SMARTSAM_MAX_PIXELS must be positive")
        try:
            self.agent  # the agent knobs' own ranges (the same checks as a project's extra params)
        except SettingsError as e:
            raise SettingsError(f"SMARTSAM_CHAIN_LENGTH / SMARTSAM_EXEMPLARS: {e}") from None
        try:
            compare_share(self.compare)
        except ValueError as e:
            raise SettingsError(str(e)) from None

    # -- derived ---------------------------------------------------------------------------
    @property
    def compare_share(self) -> float:
        return compare_share(self.compare)

    @property
    def label_studio_host(self) -> Optional[str]:
        return urlparse(self.label_studio_url).netloc.lower() if self.label_studio_url else None

    @property
    def backbone_name(self) -> str:
        """The backbone's registry name: the setting, else the registry's default for this host."""
        if self.backbone:
            return self.backbone
        from smartsam.models import default_backbone

        return default_backbone()

    def resolved(self) -> "Settings":
        """These settings with the backbone named (the launcher resolves it once, so every worker
        and the model version agree)."""
        return dataclasses.replace(self, backbone=self.backbone_name)

    def backbone_kwargs(self) -> Dict[str, object]:
        """Keyword arguments of :func:`smartsam.models.load_backbone`."""
        return dict(name=self.backbone_name, checkpoint=self.checkpoint, device=self.device, cache_size=self.embedding_cache,
                    cpu_bf16=self.cpu_bf16, shared_decoder=self.shared_decoder, compile=self.compile,
                    embed_cache_dir=self.embed_cache_dir,
                    embed_cache_bytes=self.embed_cache_bytes, concepts=self.proposals == "sam3",
                    sources=self.sources)

    @property
    def agent(self) -> AgentSettings:
        """The agent settings every project starts from."""
        return AgentSettings(self.chain_length, self.exemplars, self.fast_path, self.require_click)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)
