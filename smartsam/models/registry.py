"""The model registry: every backbone and selector by name, where its weights live and come from.

Names ending in ``-random`` are the real architectures with random weights, for tests and offline
demos: never a default, and every output made with them says so. This module reads no
environment: where weights live and come from is the ``sources`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..sources import Sources


class ModelError(RuntimeError):
    """A model cannot be had: unknown name, failed download, corrupt file. Message is for users."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry.

    Attributes:
        name: what users type (``--backbone NAME``, ``SMARTSAM_BACKBONE``).
        family: "sam", "sam2", "dinov2" or "clip".
        arch: the architecture within the family (SAM "vit_b", SAM 2.1 "hiera_t", ...).
        url: official download URL of the checkpoint (None: loaded through transformers).
        filename: file name in the cache.
        size: exact size in bytes, when published.
        sha256: SHA-256 of the file, when published; else the hash is recorded at the first
            verified download and checked from then on.
        hf_id: Hugging Face model id (DINOv2, CLIP), loaded by transformers from its cache or a
            local directory.
        note: one line on speed and memory.
        random: random weights (tests and demos only).
        files: for a model published as a Hugging Face repository in transformers' format (SAM 3,
            HQ-SAM): the files fetched from ``url`` (the repository's ``resolve/main/`` base) into
            the folder ``checkpoints/<name>/``; ``url`` then names that base, not one file.
        concept_files: files needed only by SAM 3's concept detector (its text tokenizer), fetched
            when concept proposals are asked for.
        gated: the license page of a gated repository: without an accepted license and
            ``HF_TOKEN`` the hub answers 401/403, and the message says what to do.
        folder: the cache folder of one file of a repository model (set internally).
    """

    name: str
    family: str
    arch: str
    note: str
    url: Optional[str] = None
    filename: Optional[str] = None
    size: Optional[int] = None
    sha256: Optional[str] = None
    hf_id: Optional[str] = None
    random: bool = False
    files: Tuple[str, ...] = ()
    concept_files: Tuple[str, ...] = ()
    gated: Optional[str] = None
    folder: Optional[str] = None


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
HF_HUB = "https://huggingface.co"
_HF_MODEL = ("config.json", "model.safetensors")
# SAM 3's CLIP-style BPE tokenizer, for the concept detector's text (box exemplars are "visual").
_SAM3_TOKENIZER = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

REGISTRY: Dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("sam_vit_b", "sam", "vit_b", "SAM ViT-B, 91M params; CPU encoder ~13 s on 2 cores", _SAM + "sam_vit_b_01ec64.pth",
                  "sam_vit_b_01ec64.pth", 375042383, "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        ModelSpec("sam_vit_l", "sam", "vit_l", "SAM ViT-L, 308M params; GPU recommended", _SAM + "sam_vit_l_0b3195.pth",
                  "sam_vit_l_0b3195.pth", None, "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        ModelSpec("sam_vit_h", "sam", "vit_h", "SAM ViT-H, 636M params (the paper's main backbone); GPU recommended", _SAM + "sam_vit_h_4b8939.pth",
                  "sam_vit_h_4b8939.pth", None, "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        # SAM 2.1: the published SHA-256 of the 092824 files (sizes where published)
        ModelSpec("sam2.1_hiera_tiny", "sam2", "hiera_t", "SAM 2.1 tiny, 39M params; CPU encoder ~1.5 s on 2 cores",
                  _SAM21 + "sam2.1_hiera_tiny.pt", "sam2.1_hiera_tiny.pt", 156008466,
                  "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"),
        ModelSpec("sam2.1_hiera_small", "sam2", "hiera_s", "SAM 2.1 small, 46M params",
                  _SAM21 + "sam2.1_hiera_small.pt", "sam2.1_hiera_small.pt", None,
                  "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38"),
        ModelSpec("sam2.1_hiera_base_plus", "sam2", "hiera_b+", "SAM 2.1 base+, 81M params",
                  _SAM21 + "sam2.1_hiera_base_plus.pt", "sam2.1_hiera_base_plus.pt", None,
                  "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5"),
        ModelSpec("sam2.1_hiera_large", "sam2", "hiera_l", "SAM 2.1 large, 224M params; GPU recommended",
                  _SAM21 + "sam2.1_hiera_large.pt", "sam2.1_hiera_large.pt", 898083611,
                  "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318"),
        # SAM 3 (Nov 2025) through transformers: the tracker answers clicks, the detector finds concepts. The
        # hub publishes no hash: trust on first use (the hash of the first verified download is kept).
        ModelSpec("sam3", "sam3", "sam3", "SAM 3, 848M params (tracker + concept detector), gated: accept the license, "
                  "set HF_TOKEN; GPU recommended", HF_HUB + "/facebook/sam3/resolve/main/", files=_HF_MODEL,
                  concept_files=_SAM3_TOKENIZER, gated=HF_HUB + "/facebook/sam3"),
        # HQ-SAM (paper Table 1) in transformers' format (syscv-community, converted from lkeab/hq-sam)
        ModelSpec("sam_hq_vit_b", "sam_hq", "vit_b", "HQ-SAM ViT-B, 95M params; CPU encoder like SAM ViT-B",
                  HF_HUB + "/syscv-community/sam-hq-vit-base/resolve/main/", files=_HF_MODEL),
        ModelSpec("sam_hq_vit_l", "sam_hq", "vit_l", "HQ-SAM ViT-L, 313M params; GPU recommended",
                  HF_HUB + "/syscv-community/sam-hq-vit-large/resolve/main/", files=_HF_MODEL),
        ModelSpec("sam_hq_vit_h", "sam_hq", "vit_h", "HQ-SAM ViT-H, 642M params (the paper's HQ-SAM); GPU recommended",
                  HF_HUB + "/syscv-community/sam-hq-vit-huge/resolve/main/", files=_HF_MODEL),
        ModelSpec("dinov2-base", "dinov2", "base", "DINOv2 ViT-B/14 without registers (reference selector)", hf_id="facebook/dinov2-base"),
        ModelSpec("dinov2-large", "dinov2", "large", "DINOv2 ViT-L/14 without registers", hf_id="facebook/dinov2-large"),
        ModelSpec("clip-base", "clip", "base", "CLIP ViT-B/16 (text references)", hf_id="openai/clip-vit-base-patch16"),
        # Real architectures, random weights: tests and offline demos only.
        ModelSpec("sam2.1_hiera_tiny-random", "sam2", "hiera_t", "SAM 2.1 tiny architecture, RANDOM weights (tests only)", random=True),
        ModelSpec("sam2.1_hiera_small-random", "sam2", "hiera_s", "SAM 2.1 small architecture, RANDOM weights (timing only)", random=True),
        ModelSpec("sam2.1_hiera_large-random", "sam2", "hiera_l", "SAM 2.1 large architecture, RANDOM weights (timing only)", random=True),
        ModelSpec("sam_vit_tiny-random", "sam", "vit_tiny", "SAM design with a 2-block ViT, RANDOM weights (tests only)", random=True),
        ModelSpec("sam_vit_b-random", "sam", "vit_b", "SAM ViT-B architecture, RANDOM weights (tests only)", random=True),
        ModelSpec("sam3-tiny-random", "sam3", "tiny", "SAM 3 design, 2-layer ViT of width 64 (real 1008-px input, 288 grid), "
                  "RANDOM weights (tests only)", random=True),
        ModelSpec("sam3-random", "sam3", "sam3", "SAM 3 architecture, RANDOM weights (timing only)", random=True),
        ModelSpec("sam_hq_vit_tiny-random", "sam_hq", "vit_tiny", "HQ-SAM design, 2-layer ViT of width 64, RANDOM weights (tests only)",
                  random=True),
        ModelSpec("sam_hq_vit_b-random", "sam_hq", "vit_b", "HQ-SAM ViT-B architecture, RANDOM weights (timing only)", random=True),
        ModelSpec("dinov2-tiny-random", "dinov2", "tiny", "DINOv2 architecture, 2 layers of width 32, RANDOM weights", random=True),
        ModelSpec("clip-tiny-random", "clip", "tiny", "CLIP architecture, 2 layers of width 32, RANDOM weights", random=True),
        # Not a model: draws a disk at the prompt, so tests can check where masks land.
        ModelSpec("disk-test", "test", "disk", "deterministic test backbone: a disk at the prompt (tests only)", random=True),
        # Not a model: patch features are the patch's mean colour, so tests know which instances match.
        ModelSpec("colour-test", "colour", "rgb", "deterministic test features: mean colour per patch (tests only)", random=True),
    ]
}

# Measured on 2 cores (benchmarks/latency.py): small encodes in 2.19 s, tiny in 1.92 s, same decoder;
# small is the better published model for 14 % more encoder time once per image.
DEFAULT_CPU_BACKBONE = "sam2.1_hiera_small"
DEFAULT_CUDA_BACKBONE = "sam2.1_hiera_large"
DEFAULT_IMAGE_FEATURES = "dinov2-base"
DEFAULT_TEXT_FEATURES = "clip-base"


def default_features(kind: str, random_backbone: bool = False) -> str:
    """Feature model for ``kind`` "image" (DINOv2) or "text" (CLIP) references; its random-weight
    twin beside a random backbone, so a test or offline demo never reaches for a download."""
    if kind not in ("image", "text"):
        raise ValueError(f"feature kind is 'image' or 'text', not {kind!r}")
    if random_backbone:
        return "dinov2-tiny-random" if kind == "image" else "clip-tiny-random"
    return DEFAULT_IMAGE_FEATURES if kind == "image" else DEFAULT_TEXT_FEATURES


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def default_backbone() -> str:
    """SAM 2.1 large on CUDA hosts, SAM 2.1 small on CPU hosts (callers map ``SMARTSAM_BACKBONE``
    or ``--backbone`` onto ``name`` themselves)."""
    return DEFAULT_CUDA_BACKBONE if torch.cuda.is_available() else DEFAULT_CPU_BACKBONE


def _src(sources: Optional[Sources]) -> Sources:
    return sources if sources is not None else Sources()


def home(sources: Optional[Sources] = None) -> Path:
    """The cache directory of ``sources`` (default ``~/.cache/smartsam``)."""
    return _src(sources).home


def checkpoint_path(spec: ModelSpec, sources: Optional[Sources] = None) -> Path:
    """The cached file of a one-file model; the cached folder of a repository model (``files``)."""
    root = home(sources) / "checkpoints"
    if spec.files:
        return root / spec.name
    if spec.folder:
        return root / spec.folder / spec.filename
    return root / (spec.filename or spec.name)


def _hub_url(url: str, sources: Sources) -> str:
    """The hub stand-in (``hf_endpoint``) in place of huggingface.co."""
    if sources.hf_endpoint and url.startswith(HF_HUB + "/"):
        return sources.hf_endpoint.rstrip("/") + url[len(HF_HUB):]
    return url


def _manual_hint(spec: ModelSpec) -> str:
    if spec.folder or spec.files:
        name = spec.folder or spec.name
        page = get_spec(name).url.split("/resolve/")[0] if name in REGISTRY else spec.url
        files = ", ".join(get_spec(name).files if name in REGISTRY else (spec.filename,))
        return (f"To place it by hand, download {files} from {page} on a machine with access, put them in one folder, "
                f"copy it here, then run: smartsam models download {name} --from /path/to/folder")
    return (f"To place it by hand, download {spec.url} on a machine with internet access, copy it here, then run: "
            f"smartsam models download {spec.name} --from /path/to/{spec.filename}")


def _gated_hint(spec: ModelSpec, code: int, sources: Sources) -> str:
    page = spec.gated  # a repository's files carry it too (_file_spec)
    if page is None:
        return ""
    have = "the HF_TOKEN set here has no access to it yet" if sources.hf_token else "no HF_TOKEN is set"
    return (f"{spec.folder or spec.name} is gated (HTTP {code}: {have}): accept its license at {page} while logged in, "
            f"create a read token at {HF_HUB}/settings/tokens, then run with HF_TOKEN=<token>. ")


