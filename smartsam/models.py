"""Model registry, verified download and cache, and builders.

Every backbone and selector is picked by name. Weights come from their official hosts (no
package ships them): downloaded once into a :class:`Sources` home (default ``~/.cache/smartsam``;
the CLI and the backend map ``SMARTSAM_HOME`` onto it), resumed when interrupted, and checked (size
and SHA-256) before anything loads them. A file that fails the check is removed and never loaded.
This module reads no environment: where weights live and come from is the ``sources`` argument.

Names ending in ``-random`` are the real architectures with random weights, for tests and offline
demos: never a default, and every output made with them says so.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Tuple
from urllib.parse import urlsplit

import torch

from ._tiny import tiny_clip_tokenizer
from .sources import Sources


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


# -- verification -------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def verify(spec: ModelSpec, path: Path, expected_sha256: Optional[str] = None) -> str:
    """Check ``path`` against the spec; return its SHA-256. Raises ModelError when it fails.

    Size and SHA-256 are compared when published (``expected_sha256`` stands in for a hash
    recorded at an earlier verified download). A checkpoint without a published hash must also
    be a complete archive (torch checkpoints are zip files with a CRC per member, so a truncated
    or bit-flipped file fails).
    """
    expected_sha256 = spec.sha256 or expected_sha256
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist")
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        raise ModelError(f"{path.name} has {size} bytes, expected {spec.size}: the file is truncated or not {spec.name}")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelError(f"{path.name} has SHA-256 {digest}, expected {expected_sha256}: the file is corrupt or not {spec.name}")
    kind = Path(spec.filename or path.name).suffix  # the file's own name: a download is checked as <name>.part
    if spec.sha256 is None and kind in (".safetensors", ".json", ".txt"):
        _check_complete(path, kind)
    elif spec.sha256 is None:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelError(f"{path.name} is not a complete checkpoint archive ({e})") from None
        if bad is not None:
            raise ModelError(f"{path.name} is corrupt (member {bad} fails its CRC)")
    return digest


def _check_complete(path: Path, kind: str) -> None:
    """A file without a published hash is at least whole: a safetensors file's header and its last
    tensor's end match its size; a JSON file parses; a text file is UTF-8."""
    try:
        if kind == ".safetensors":
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= 100 << 20:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            if 8 + n + max(ends, default=0) != path.stat().st_size:
                raise ValueError(f"{path.stat().st_size} bytes, its header says {8 + n + max(ends, default=0)}")
        elif kind == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        else:
            path.read_text(encoding="utf-8")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelError(f"{path.name} is not a complete {kind[1:]} file ({str(e)[:200]})") from None


def _recorded_sha256(path: Path) -> Optional[str]:
    """The SHA-256 written when ``path`` was last verified, if any."""
    try:
        return json.loads(_marker(path).read_text()).get("sha256")
    except (OSError, ValueError):
        return None


def _is_verified(spec: ModelSpec, path: Path) -> bool:
    """True when a marker written at verification still matches the file (skips re-hashing GBs)."""
    m = _marker(path)
    try:
        info = json.loads(m.read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    if info.get("size") != st.st_size or info.get("mtime_ns") != st.st_mtime_ns:
        return False
    return spec.sha256 is None or info.get("sha256") == spec.sha256


def _write_marker(path: Path, digest: str) -> None:
    st = path.stat()
    tmp = _marker(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, _marker(path))


# -- download -----------------------------------------------------------------------------
def download(spec: ModelSpec, url: Optional[str] = None, progress: bool = True, timeout: float = 15.0,
             chunk: int = 1 << 20, sources: Optional[Sources] = None) -> Path:
    """Download ``spec``'s checkpoint into the cache, resuming a partial file; verify; return its path.

    Args:
        url: override the official URL (a mirror). ``sources.mirror`` replaces the host part
            for every model (``<mirror>/<filename>``).
        timeout: seconds without data before giving up (a dead network fails fast).
    """
    if spec.url is None:
        raise ModelError(f"{spec.name} has no checkpoint to download")
    sources = _src(sources)
    if spec.files:
        return _download_repository(spec, spec.files, url, progress, timeout, chunk, sources)
    dest = checkpoint_path(spec, sources)
    if dest.exists() and _is_verified(spec, dest):
        return dest
    mirror = sources.mirror
    remote = f"{spec.folder}/{spec.filename}" if spec.folder else spec.filename
    url = url or (f"{mirror.rstrip('/')}/{remote}" if mirror else _hub_url(spec.url, sources))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            # A file changed since its last check must still be the file that was checked.
            digest = verify(spec, dest, _recorded_sha256(dest))
            _write_marker(dest, digest)
            return dest
        except ModelError:
            dest.unlink()
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "smartsam"})
    token = sources.hf_token
    if token and (spec.gated or _is_hub(url, sources)):  # the token goes to the hub (or its stand-in), nowhere else
        req.add_header("Authorization", f"Bearer {token}")
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete
            resp = None
        else:
            gated = _gated_hint(spec, e.code, sources) if e.code in (401, 403) else ""
            raise ModelError(f"Could not download {spec.filename} from {url}: HTTP {e.code} {e.reason}. {gated}"
                             f"{_manual_hint(spec)}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ModelError(f"Could not download {spec.filename} from {url}: {reason}. "
                         f"This machine may be offline. {_manual_hint(spec)}") from None
    if resp is not None:
        with resp:
            if have and resp.status != 206:
                have = 0  # the server ignored the range: start over
            total = resp.headers.get("Content-Length")
            total = int(total) + have if total is not None else spec.size
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=spec.filename)
            got = 0
            try:
                with open(part, "ab" if have else "wb") as f:
                    for block in iter(lambda: resp.read(chunk), b""):
                        f.write(block)
                        got += len(block)
                        if bar is not None:
                            bar.update(len(block))
                if total is not None and have + got < total:
                    raise OSError(f"connection closed after {have + got} of {total} bytes")
            except (OSError, socket.timeout, http.client.HTTPException) as e:
                raise ModelError(f"Download of {spec.filename} from {url} broke off ({e}); the partial file is kept: "
                                 f"run the same command again to resume. {_manual_hint(spec)}") from None
            finally:
                if bar is not None:
                    bar.close()
    try:
        digest = verify(spec, part)
    except ModelError as e:
        part.unlink(missing_ok=True)
        raise ModelError(f"Downloaded {spec.filename} failed its check and was removed: {e}") from None
    os.replace(part, dest)
    _write_marker(dest, digest)
    return dest


def _is_hub(url: str, sources: Sources) -> bool:
    host = urlsplit(url).netloc
    return host == urlsplit(HF_HUB).netloc or (bool(sources.hf_endpoint) and host == urlsplit(sources.hf_endpoint).netloc)


def _file_spec(spec: ModelSpec, filename: str) -> ModelSpec:
    """One file of a repository model, checked like a one-file checkpoint."""
    return replace(spec, url=spec.url + filename, filename=filename, files=(), concept_files=(), folder=spec.name,
                   size=None, sha256=None)


def _download_repository(spec: ModelSpec, files: Tuple[str, ...], url: Optional[str] = None, progress: bool = True,
                         timeout: float = 15.0, chunk: int = 1 << 20, sources: Optional[Sources] = None) -> Path:
    """Each of ``files`` of a repository model, verified (trust on first use), into its folder."""
    for f in files:
        download(_file_spec(spec, f), url=url.rstrip("/") + "/" + f if url else None, progress=progress,
                 timeout=timeout, chunk=chunk, sources=sources)
    return checkpoint_path(spec, sources)


def ensure_concept_files(spec: ModelSpec, allow_download: bool = True, sources: Optional[Sources] = None) -> Path:
    """The folder of a SAM 3 model with its concept detector's tokenizer too."""
    if not spec.concept_files:
        raise ModelError(f"{spec.name} has no concept detector")
    folder = ensure_checkpoint(spec, allow_download, sources)
    missing = [f for f in spec.concept_files if not (folder / f).exists()]
    if missing and not allow_download:
        raise ModelError(f"{', '.join(missing)} not in {folder}. {_manual_hint(spec)}")
    return _download_repository(spec, spec.concept_files, sources=sources)


def register_local(spec: ModelSpec, source: Path, sources: Optional[Sources] = None) -> Path:
    """Copy a checkpoint the user already has into the cache, after the same checks (a folder
    holding a repository model's files, for SAM 3 and HQ-SAM)."""
    source = Path(source)
    if spec.url is None:
        raise ModelError(f"{spec.name} is not a checkpoint file")
    if spec.files:
        if not source.is_dir():
            raise ModelError(f"{spec.name} is a folder of files ({', '.join(spec.files)}): give that folder")
        missing = [f for f in spec.files if not (source / f).is_file()]
        if missing:
            raise ModelError(f"{source} lacks {', '.join(missing)} of {spec.name}")
        for f in spec.files + tuple(f for f in spec.concept_files if (source / f).is_file()):
            register_local(_file_spec(spec, f), source / f, sources)
        return checkpoint_path(spec, sources)
    digest = verify(spec, source)
    dest = checkpoint_path(spec, sources)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".copy")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    _write_marker(dest, digest)
    return dest


def ensure_checkpoint(spec: ModelSpec, allow_download: bool = True, sources: Optional[Sources] = None) -> Path:
    """The verified local checkpoint of ``spec``, downloading it when missing and allowed."""
    dest = checkpoint_path(spec, sources)
    if not is_downloaded(spec, sources) and not allow_download:
        where = dest if spec.files else dest.parent
        raise ModelError(f"{spec.filename or ', '.join(spec.files)} is not in {where}. {_manual_hint(spec)}")
    return download(spec, sources=sources)  # a verified file at once; re-checks or re-downloads a changed one


def is_downloaded(spec: ModelSpec, sources: Optional[Sources] = None) -> bool:
    if spec.files:
        return all(checkpoint_path(_file_spec(spec, f), sources).exists() for f in spec.files)
    return spec.url is not None and checkpoint_path(spec, sources).exists()


# -- builders -----------------------------------------------------------------------------
def load_backbone(name: "Optional[str | ModelSpec]" = None, checkpoint: Optional[str] = None, device: Optional[str] = None,
                  cache_size: int = 8, allow_download: bool = True, cpu_bf16: "str | bool" = "auto",
                  shared_decoder: "str | bool" = "on", embed_cache_dir: "Optional[str | Path]" = None,
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
        shared_decoder: SAM 2.1 only: "on" decodes through
            :class:`~smartsam.backbones.sam2_decoder.Sam2SharedDecoder`, "off" through sam2's module.
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
            from .backbones.disk import DiskBackbone

            bb = DiskBackbone(spec.name, cache_size)
        elif spec.family == "sam":
            from .backbones.sam import SamBackbone, build_sam_model

            bb = SamBackbone(build_sam_model(spec.arch, str(path) if path else None), spec.name, cache_size, device,
                             cpu_bf16=cpu_bf16)
        elif spec.family == "sam_hq":
            from .backbones.hf_sam import SamHQBackbone, build_sam_hq_model

            bb = SamHQBackbone(build_sam_hq_model(spec.arch, str(path) if path else None), spec.name, cache_size, device,
                               cpu_bf16=cpu_bf16)
        elif spec.family == "sam3":
            from .backbones.hf_sam import Sam3Backbone, build_sam3_models

            tracker, detector = build_sam3_models(spec.arch, str(path) if path else None, concepts)
            bb = Sam3Backbone(tracker, spec.name, cache_size, device, cpu_bf16=cpu_bf16, detector=detector)
        else:
            from .backbones.sam2 import Sam2Backbone, build_sam2_model

            bb = Sam2Backbone(build_sam2_model(spec.arch, str(path) if path else None), spec.name, cache_size, device,
                              cpu_bf16=cpu_bf16, shared_decoder=shared_decoder, batch_encode=batch_encode)
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
        from .embed_cache import EmbeddingDiskCache

        bb.disk_cache = EmbeddingDiskCache(Path(embed_cache_dir), int(embed_cache_bytes))
    return bb


def load_features(name: str, device: Optional[str] = None, path: Optional[str] = None):
    """Build a DINOv2 or CLIP feature extractor by registry name.

    Args:
        path: a local directory holding the model (``SMARTSAM_DINOV2_PATH`` / ``SMARTSAM_CLIP_PATH``
            of the CLI and the backend); None loads the registry's Hugging Face id.
    """
    from .features import ClipFeatures, DinoV2Features

    spec = get_spec(name)
    if spec.family == "colour":
        from .features import ColourFeatures

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
    from .concepts import Sam3ConceptProposer

    spec = get_spec(backbone.name)
    if spec.family == "test":
        from .concepts import ColourConcepts

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
