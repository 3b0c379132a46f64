"""Every setting is an environment variable (listed in the README, "Operating it")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlparse


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


def _flag(name: str, default: bool = False) -> bool:
    v = _env(name)
    return default if v is None else v.strip().lower() in ("1", "true", "yes", "on")


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
    v = os.environ.get(name)
    return default if v is None or v == "" else v


@dataclass
class Settings:
    label_studio_url: Optional[str] = field(default_factory=lambda: _env("LABEL_STUDIO_URL"))
    label_studio_api_key: Optional[str] = field(default_factory=lambda: _env("LABEL_STUDIO_API_KEY"))
    data_dir: Path = field(default_factory=lambda: Path(_env("SMARTSAM_DATA_DIR", "./smartsam-data")))
    backbone: Optional[str] = field(default_factory=lambda: _env("SMARTSAM_BACKBONE"))
    checkpoint: Optional[str] = field(default_factory=lambda: _env("SMARTSAM_CHECKPOINT"))
    features: Optional[str] = field(default_factory=lambda: _env("SMARTSAM_FEATURES"))
    text_features: Optional[str] = field(default_factory=lambda: _env("SMARTSAM_TEXT_FEATURES"))
    device: Optional[str] = field(default_factory=lambda: _env("SMARTSAM_DEVICE"))
    admin_token: Optional[str] = field(default_factory=lambda: _env("SMARTSAM_ADMIN_TOKEN"))
    basic_auth_user: Optional[str] = field(default_factory=lambda: _env("BASIC_AUTH_USER"))
    basic_auth_pass: Optional[str] = field(default_factory=lambda: _env("BASIC_AUTH_PASS"))
    allowed_hosts: Tuple[str, ...] = field(default_factory=lambda: tuple(
        h.strip().lower() for h in (_env("SMARTSAM_ALLOWED_HOSTS", "") or "").split(",") if h.strip()))
    local_files_root: Optional[str] = field(default_factory=lambda: _env("LOCAL_FILES_DOCUMENT_ROOT"))
    max_request_bytes: int = field(default_factory=lambda: int(_env("SMARTSAM_MAX_REQUEST_BYTES", str(8 << 20))))
    image_max_bytes: int = field(default_factory=lambda: int(_env("SMARTSAM_IMAGE_MAX_BYTES", str(50 << 20))))
    image_timeout: float = field(default_factory=lambda: float(_env("SMARTSAM_IMAGE_TIMEOUT", "20")))
    embedding_cache: int = field(default_factory=lambda: int(_env("SMARTSAM_EMBEDDING_CACHE", "8")))
    image_cache: int = field(default_factory=lambda: int(_env("SMARTSAM_IMAGE_CACHE", "16")))
    seed: int = field(default_factory=lambda: int(_env("SMARTSAM_SEED", "0")))
    # Clicks per chain (paper: 3). Fewer trades quality for speed on small CPUs; 0 = no chains.
    chain_length: int = field(default_factory=lambda: int(_env("SMARTSAM_CHAIN_LENGTH", "3")))
    # A task's image as a data: URL is anything the sender wants; off unless a deployment needs it.
    allow_data_urls: bool = field(default_factory=lambda: _flag("SMARTSAM_ALLOW_DATA_URLS"))
    # Every request (fetch, wait for the model, agent) ends by then; Label Studio gives up at 100 s.
    request_timeout: float = field(default_factory=lambda: float(_env("SMARTSAM_REQUEST_TIMEOUT", "90")))
    # A /predict with many tasks answers after this many seconds; the rest go on in the background.
    predict_budget: float = field(default_factory=lambda: float(_env("SMARTSAM_PREDICT_BUDGET", "60")))
    # Shared secret Label Studio sends with each webhook (a custom header); required when set.
    webhook_secret: Optional[str] = field(default_factory=lambda: _env("SMARTSAM_WEBHOOK_SECRET"))
    threads: int = field(default_factory=lambda: int(_env("SMARTSAM_THREADS", "8")))
    # K: references kept per label at once (the first K submitted masks); 1 is the paper
    exemplars: int = field(default_factory=lambda: int(_env("SMARTSAM_EXEMPLARS", "1")))
    # field statistics: "plain:0.2" answers that share of first clicks with the plain backbone
    compare: Optional[str] = field(default_factory=lambda: _env("SMARTSAM_COMPARE"))
    stats_max: int = field(default_factory=lambda: int(_env("SMARTSAM_STATS_MAX", "20000")))
    # "paper": image + mask references cropped (object ~70 %) with the background removed; "none": raw
    reference_prep: str = field(default_factory=lambda: (_env("SMARTSAM_REFERENCE_PREP", "paper") or "").strip().lower())

    def __post_init__(self) -> None:
        if self.local_files_root is not None and Path(self.local_files_root).resolve() == Path("/"):
            raise SettingsError("LOCAL_FILES_DOCUMENT_ROOT=/ would let any task read any file of this machine: set it "
                                "to the folder that holds the images")
        if self.exemplars < 1:
            raise SettingsError("SMARTSAM_EXEMPLARS must be at least 1")
        from smartsam.masks import REFERENCE_PREPS

        if self.reference_prep not in REFERENCE_PREPS:
            raise SettingsError("SMARTSAM_REFERENCE_PREP must be paper or none")
        from .field_stats import compare_share

        try:
            self.compare_share = compare_share(self.compare)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if self.request_timeout <= 0 or self.predict_budget <= 0:
            raise SettingsError("SMARTSAM_REQUEST_TIMEOUT and SMARTSAM_PREDICT_BUDGET must be positive seconds")

    @property
    def label_studio_host(self) -> Optional[str]:
        return urlparse(self.label_studio_url).netloc.lower() if self.label_studio_url else None
