"""Verified downloads and the cache of weights.

Weights come from their official hosts (no package ships them): downloaded once into a
:class:`~smartsam.sources.Sources` home (default ``~/.cache/smartsam``; the CLI and the backend
map ``SMARTSAM_HOME`` onto it), resumed when interrupted, and checked (size and SHA-256) before
anything loads them. A file that fails the check is removed and never loaded.
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
from dataclasses import replace
from pathlib import Path
from typing import Optional, Tuple
from urllib.parse import urlsplit

from ..sources import Sources
from .registry import HF_HUB, ModelError, ModelSpec, _gated_hint, _hub_url, _manual_hint, _src, checkpoint_path


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


