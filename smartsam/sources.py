"""Where model weights live and where they come from (a leaf module: no torch, so the backend's
settings can hold one without loading a model library)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional


@dataclass(frozen=True)
class Sources:
    """Where checkpoints live and where they come from; every function that finds or fetches weights
    takes one (``sources=None`` is the default below). The CLI and the backend's ``Settings`` build it
    from their environment with :meth:`from_environ`; the library never reads the environment.

    Args:
        home: the cache folder (checkpoints under ``home/checkpoints``).
        mirror: a base URL serving every checkpoint as ``<mirror>/<filename>`` in place of its host.
        hf_endpoint: a Hugging Face hub stand-in (a mirror or a private hub) in place of huggingface.co.
        hf_token: a hub token, sent to the hub (or its stand-in) only; never printed.
    """

    home: Path = field(default_factory=lambda: Path.home() / ".cache" / "smartsam")
    mirror: Optional[str] = None
    hf_endpoint: Optional[str] = None
    hf_token: Optional[str] = field(default=None, repr=False)

    # The variables from_environ maps, in the meaning torch gives TORCH_HOME and huggingface_hub its own.
    ENV = ("SMARTSAM_HOME", "SMARTSAM_MIRROR", "HF_ENDPOINT", "HF_TOKEN", "XDG_CACHE_HOME")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Sources":
        """The sources a process environment names (the caller passes it: ``os.environ``)."""
        def get(k: str) -> Optional[str]:
            v = environ.get(k)
            return v if v and v.strip() else None

        home = get("SMARTSAM_HOME")
        base = Path(home) if home else Path(get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smartsam"
        return cls(base.expanduser(), get("SMARTSAM_MIRROR"), get("HF_ENDPOINT"), get("HF_TOKEN"))
