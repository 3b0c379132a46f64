"""A disk cache of image embeddings, so a pre-embedded image's first click costs no encoder call.

Content-addressed: the key is the image's content hash; the folder is the backbone's name and
the adapter's embedding format version, so an embedding from another model or format is never
used. Tensors are stored in fp16 (half the bytes; the decoder gets them back in fp32). The cache
is bounded in bytes: the least recently used files go first. Writes are atomic (temp + rename),
so concurrent writers (pre-labeling workers, the backend) never see half a file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT_VERSION = 1


def _to(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _to(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, fn) for v in obj)
    return obj


class EmbeddingDiskCache:
    """Args:
        root: cache directory (shared by every backbone; each gets a subfolder).
        max_bytes: size bound of the whole cache (default 10 GB).
    """

    def __init__(self, root: Path, max_bytes: int = 10 << 30) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()

    def _path(self, backbone: str, key: str) -> Path:
        return self.root / f"{backbone}-v{FORMAT_VERSION}" / key[:2] / f"{key}.pt"

    def get(self, backbone: str, key: str, device: torch.device) -> Optional[Any]:
        p = self._path(backbone, key)
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except Exception:  # a damaged file is dropped and recomputed, never used
            p.unlink(missing_ok=True)
            return None
        try:
            os.utime(p)  # recently used: evicted last
        except OSError:
            pass
        return _to(state, lambda t: t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t.to(device))

    def put(self, backbone: str, key: str, state: Any) -> Path:
        p = self._path(backbone, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        torch.save(_to(state, lambda t: t.detach().to("cpu", torch.float16) if t.is_floating_point() else t.cpu()), tmp)
        os.replace(tmp, p)
        self.evict()
        return p

    def has(self, backbone: str, key: str) -> bool:
        return self._path(backbone, key).exists()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*.pt"))

    def evict(self) -> int:
        """Delete least recently used files until the cache fits ``max_bytes``."""
        with self._lock:
            files = []
            for f in self.root.rglob("*.pt"):
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, f))
            total = sum(s for _, s, _ in files)
            n = 0
            for _, size, f in sorted(files):
                if total <= self.max_bytes:
                    break
                f.unlink(missing_ok=True)
                total -= size
                n += 1
            return n
