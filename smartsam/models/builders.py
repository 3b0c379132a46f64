"""Builders: a registry name (or a local checkpoint) to a loaded backbone, feature extractor or
concept proposer, on the device asked for (CUDA when present)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from .._tiny import tiny_clip_tokenizer
from ..sources import Sources
from .downloads import ensure_checkpoint, ensure_concept_files, verify
from .registry import ModelError, ModelSpec, _manual_hint, default_backbone, get_spec


# -- builders -----------------------------------------------------------------------------
def load_backbone(name: "Optional[str | ModelSpec]" = None, checkpoint: Optional[str] = None, device: Optional[str] = None,
                  cache_size: int = 8, allow_download: bool = True, cpu_bf16: "str | bool" = "auto",
                  shared_decoder: "str | bool" = "on", compile: "str | bool" = "auto", embed_cache_dir: "Optional[str | Path]" = None,
                  embed_cache_bytes: int = 10 << 30, concepts: bool = False, batch_encode: Optional[bool] = None,
                  sources: Optional[Sources] = None):
    """Build a :class:`~smartsam.backbones.base.Backbone` by registry name.

    Args:
        name: registry name (default :func:`default_backbone`).
        checkpoint: a local checkpoint path (checked against the registry when it knows the hash
            of that model); None downloads or uses the cached one.
        device: "cuda" or "cpu" (default: CUDA when present).
        cache_size: image embeddings kept in memory.
        cpu_bf16: bf16 on the CPU: "auto" (where the hardware has it), "on", "off".
        shared_decoder: SAM 2.1, SAM, HQ-SAM and SAM 3: "on" decodes through
            :class:`~smartsam.backbones.shared_decoder.SharedDecoder` (HQ-SAM:
            ``HQSharedDecoder``; SAM 3: ``Sam3SharedDecoder``), "off" through the library's own module.
        compile: every backbone with the shared decoder: its step through ``torch.compile``
            (:mod:`smartsam.backbones.compiled`): "auto" (where measured faster), "on", "off";
            warm it up before the first click (:meth:`smartsam.agent.SmartSAMAgent.warm_up`).
        embed_cache_dir: a folder for the disk cache of embeddings (None: no disk cache).
        embed_cache_bytes: the disk cache's size bound.
        concepts: SAM 3 only: build its concept detector too (sharing the vision backbone), for
            :class:`~smartsam.concepts.Sam3ConceptProposer`; fetches its tokenizer files.
        batch_encode: SAM 2.1 only: encode new images that arrive together in one encoder call
            (None: on CUDA).
        sources: where checkpoints are cached and fetched from (default :class:`Sources`).
    """
    spec = name if isinstance(name, ModelSpec) else get_spec(name or default_backbone())
    if concepts and spec.family not in ("sam3", "test"):
        raise ModelError("concept proposals need SAM 3 (--backbone sam3): this backbone has no concept detector")
    if spec.family not in ("sam", "sam2", "sam3", "sam_hq", "test"):
        raise ModelError(f"{spec.name} is not a segmentation backbone")
    path = None
    if spec.random and checkpoint is not None:
        raise ModelError(f"{spec.name} has random weights by definition; give a checkpoint with a real model name")
    if not spec.random:
        if checkpoint is not None:
            path = Path(checkpoint)
            if spec.files and not all((path / f).is_file() for f in spec.files):
                raise ModelError(f"checkpoint {path} is not a folder holding {', '.join(spec.files)} of {spec.name}")
            if not spec.files and not path.is_file():
                raise ModelError(f"checkpoint {path} does not exist")
            if spec.sha256 is not None:
                verify(spec, path)
        else:  # with concepts, the tokenizer too (ensure_concept_files ensures the checkpoint first)
            path = (ensure_concept_files if concepts else ensure_checkpoint)(spec, allow_download, sources)
    else:
        torch.manual_seed(0)  # random weights, but the same ones in every process
    try:
        if spec.family == "test":
            from ..backbones.disk import DiskBackbone

            bb = DiskBackbone(spec.name, cache_size)
        elif spec.family == "sam":
            from ..backbones.sam import SamBackbone, build_sam_model

            bb = SamBackbone(build_sam_model(spec.arch, str(path) if path else None), spec.name, cache_size, device,
                             cpu_bf16=cpu_bf16, shared_decoder=shared_decoder, compile=compile)
        elif spec.family == "sam_hq":
            from ..backbones.hf_sam import SamHQBackbone, build_sam_hq_model

            bb = SamHQBackbone(build_sam_hq_model(spec.arch, str(path) if path else None), spec.name, cache_size, device,
                               cpu_bf16=cpu_bf16, shared_decoder=shared_decoder, compile=compile)
        elif spec.family == "sam3":
            from ..backbones.hf_sam import Sam3Backbone, build_sam3_models

            tracker, detector = build_sam3_models(spec.arch, str(path) if path else None, concepts)
            bb = Sam3Backbone(tracker, spec.name, cache_size, device, cpu_bf16=cpu_bf16, detector=detector,
                              shared_decoder=shared_decoder, compile=compile)
        else:
            from ..backbones.sam2 import Sam2Backbone, build_sam2_model

            bb = Sam2Backbone(build_sam2_model(spec.arch, str(path) if path else None), spec.name, cache_size, device,
                              cpu_bf16=cpu_bf16, shared_decoder=shared_decoder, compile=compile,
                              batch_encode=batch_encode)
    except ModelError:
        raise
    except Exception as e:  # a checkpoint fails to load in many ways (pickle, zip, shapes): say which file
        raise ModelError(f"could not load {path} as {spec.name}: {str(e).splitlines()[0][:300]}") from None
    bb.random_weights = spec.random
    if checkpoint is not None and spec.sha256 is None:
        # A checkpoint of our choosing under a registry name: its embeddings are its own.
        st = Path(checkpoint).stat()
        bb.cache_id = f"{spec.name}-{hashlib.sha1(f'{Path(checkpoint).resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:10]}"
    if embed_cache_dir:
        from ..embed_cache import EmbeddingDiskCache

        bb.disk_cache = EmbeddingDiskCache(Path(embed_cache_dir), int(embed_cache_bytes))
    return bb


def load_features(name: str, device: Optional[str] = None, path: Optional[str] = None):
    """Build a DINOv2 or CLIP feature extractor by registry name.

    Args:
        path: a local directory holding the model (``SMARTSAM_DINOV2_PATH`` / ``SMARTSAM_CLIP_PATH``
            of the CLI and the backend); None loads the registry's Hugging Face id.
    """
    from ..features import ClipFeatures, DinoV2Features

    spec = get_spec(name)
    if spec.family == "colour":
        from ..features import ColourFeatures

        return ColourFeatures(device=device)
    if spec.random:
        torch.manual_seed(0)
        if spec.family == "dinov2":
            from transformers import Dinov2Config, Dinov2Model

            cfg = Dinov2Config(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
            return DinoV2Features(Dinov2Model(cfg), image_size=224, device=device, name=spec.name)
        if spec.family == "clip":
            from transformers import CLIPConfig, CLIPModel

            tok, n = tiny_clip_tokenizer()
            cfg = CLIPConfig(
                text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=16),
                projection_dim=32,
            )
            return ClipFeatures(CLIPModel(cfg), tok, device=device, name=spec.name)
    if spec.family not in ("dinov2", "clip"):
        raise ModelError(f"{spec.name} is not a feature model")
    source = path or spec.hf_id
    try:
        if spec.family == "dinov2":
            return DinoV2Features(model_name_or_path=source, device=device, name=spec.name)
        return ClipFeatures(model_name_or_path=source, device=device, name=spec.name)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load {spec.name} from {source!r} ({str(e).splitlines()[0][:200]}). "
                         f"Put the model in the Hugging Face cache (huggingface-cli download {spec.hf_id}) or point "
                         f"SMARTSAM_{spec.family.upper()}_PATH at a local directory with it.") from None


def load_concept_proposer(backbone, checkpoint: Optional[str] = None, allow_download: bool = True,
                          sources: Optional[Sources] = None, **kwargs):
    """SAM 3's concept detector over a SAM 3 backbone built with ``concepts=True``, with its
    tokenizer (from the model's folder; the byte-level stand-in for random weights). ``kwargs``
    go to :class:`~smartsam.concepts.Sam3ConceptProposer`."""
    from ..concepts import Sam3ConceptProposer

    spec = get_spec(backbone.name)
    if spec.family == "test":
        from ..concepts import ColourConcepts

        return ColourConcepts()  # known answers for tests: regions of the exemplar's colour
    if spec.family != "sam3" or getattr(backbone, "detector", None) is None:
        raise ModelError(f"concept proposals need SAM 3 with its detector; {backbone.name} has none "
                         f"(set SMARTSAM_BACKBONE=sam3, or SMARTSAM_PROPOSALS=similarity)")
    if spec.random:
        tokenizer = tiny_clip_tokenizer()[0]
    else:
        from transformers import CLIPTokenizer

        folder = Path(checkpoint) if checkpoint else ensure_concept_files(spec, allow_download, sources)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as e:
            raise ModelError(f"could not load SAM 3's tokenizer from {folder} ({str(e).splitlines()[0][:200]}). "
                             f"{_manual_hint(spec)}") from None
    return Sam3ConceptProposer(backbone, tokenizer, **kwargs)
