"""Models by name: the registry (:mod:`.registry`), verified downloads and the cache of weights
(:mod:`.downloads`), and the builders that load them (:mod:`.builders`). Callers import from here."""

from ..sources import Sources
from .builders import load_backbone, load_concept_proposer, load_features
from .downloads import (
                        download,
                        ensure_checkpoint,
                        ensure_concept_files,
                        is_downloaded,
                        register_local,
                        sha256_file,
                        verify,
)
from .registry import (
                        DEFAULT_CPU_BACKBONE,
                        DEFAULT_CUDA_BACKBONE,
                        DEFAULT_IMAGE_FEATURES,
                        DEFAULT_TEXT_FEATURES,
                        HF_HUB,
                        REGISTRY,
                        ModelError,
                        ModelSpec,
                        checkpoint_path,
                        default_backbone,
                        default_features,
                        get_spec,
                        home,
)

__all__ = ["DEFAULT_CPU_BACKBONE", "DEFAULT_CUDA_BACKBONE", "DEFAULT_IMAGE_FEATURES", "DEFAULT_TEXT_FEATURES", "HF_HUB",
           "REGISTRY", "ModelError", "ModelSpec", "Sources", "checkpoint_path", "default_backbone", "default_features", "download",
           "ensure_checkpoint", "ensure_concept_files", "get_spec", "home", "is_downloaded", "load_backbone",
           "load_concept_proposer", "load_features", "register_local", "sha256_file", "verify"]
