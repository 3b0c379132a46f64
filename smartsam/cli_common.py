"""What every command line of the package shares (``smartsam``, ``smartsam eval``, ``smartsam
paper``): the model flags, the environment they fall back to, the loaders. A leaf module: the
commands import it, it imports none of them. The library itself reads no environment; these do,
and pass what they read on as arguments.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="registry name of the segmenter (see `smartsam models list`); "
                   "default: $SMARTSAM_BACKBONE, else SAM 2.1 large on CUDA, SAM 2.1 small on CPU")
    p.add_argument("--checkpoint", help="local checkpoint file for --backbone (else the cached or downloaded one)")
    p.add_argument("--features", help="feature model for image references (default dinov2-base; "
                   "dinov2-tiny-random with a random backbone)")
    p.add_argument("--text-features", help="feature model for text references (default clip-base; "
                   "clip-tiny-random with a random backbone)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="the one seed; same inputs, same mask (default 0)")
    p.add_argument("--fast-path", choices=["auto", "on", "off"], help="skip chains whose initial mask duplicates a "
                   "better one: auto (default, $SMARTSAM_FAST_PATH) = off (the paper's literal path) on CUDA and on a CPU "
                   "with bf16 hardware and the shared decoder (SAM 2.1, SAM), on elsewhere")
    p.add_argument("--literal", action="store_true", help="the same as --fast-path off")
    p.add_argument("--allow-anywhere", action="store_true", help="reference mode: candidates that do not contain the "
                   "click may win too (Eq. 2's plain argmax; default: $SMARTSAM_REQUIRE_CLICK, on)")
    from .masks import REFERENCE_PREPS

    p.add_argument("--reference-prep", choices=REFERENCE_PREPS, help="image + mask references: paper (default, "
                   "$SMARTSAM_REFERENCE_PREP) = background removed, object cropped to ~70 %% of the image, as the "
                   "paper's section 4.1; none = the raw image and mask")


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
    v = os.environ.get(name)
    return default if v is None or v.strip() == "" else v


def cli_sources():
    """Where checkpoints live and come from: ``SMARTSAM_HOME``, ``SMARTSAM_MIRROR``, ``HF_ENDPOINT``, ``HF_TOKEN``."""
    from .sources import Sources

    return Sources.from_environ(os.environ)


def cli_load_backbone(args, **kwargs):
    """The backbone the flags (else the environment) name, built with the CLI's backbone knobs."""
    from .models import load_backbone

    try:
        cache_bytes = int(_env("SMARTSAM_EMBED_CACHE_BYTES", str(10 << 30)))
    except ValueError:
        raise UsageError("SMARTSAM_EMBED_CACHE_BYTES must be a whole number of bytes") from None
    return load_backbone(getattr(args, "backbone", None) or _env("SMARTSAM_BACKBONE"), args.checkpoint, args.device,
                         cpu_bf16=_env("SMARTSAM_CPU_BF16", "auto"), shared_decoder=_env("SMARTSAM_SHARED_DECODER", "on"),
                         compile=_env("SMARTSAM_COMPILE", "auto"),
                         embed_cache_dir=getattr(args, "cache_dir", None) or _env("SMARTSAM_EMBED_CACHE_DIR"),
                         embed_cache_bytes=cache_bytes, sources=cli_sources(), **kwargs)


def cli_load_features(args, kind: str, random_backbone: bool):
    """The image (DINOv2) or text (CLIP) extractor the flags name, else the default one."""
    from .models import default_features, load_features

    name = (args.features if kind == "image" else args.text_features) or default_features(kind, random_backbone)
    return load_features(name, args.device, _env("SMARTSAM_DINOV2_PATH" if kind == "image" else "SMARTSAM_CLIP_PATH"))


def cli_agent_options(args) -> dict:
    """Fast path, click restriction and reference preparation: the flags, else the environment."""
    from .agent import agent_options

    require = _env("SMARTSAM_REQUIRE_CLICK", "true").strip().lower() not in ("0", "false", "no", "off")
    try:
        return agent_options("off" if args.literal else (args.fast_path or _env("SMARTSAM_FAST_PATH", "auto")),
                             False if args.allow_anywhere else require,
                             getattr(args, "reference_prep", None) or _env("SMARTSAM_REFERENCE_PREP", "paper"))
    except ValueError as e:
        raise UsageError(str(e)) from None


def cli_max_pixels() -> int:
    from .io import MAX_PIXELS

    try:
        return int(_env("SMARTSAM_MAX_PIXELS", str(MAX_PIXELS)))
    except ValueError:
        raise UsageError("SMARTSAM_MAX_PIXELS must be a whole number") from None


