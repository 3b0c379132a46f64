"""Fetching task images safely: only from Label Studio and hosts the admin allows.

Users of the existing SAM backends keep hitting 401s (legacy token vs personal access token) and
FileNotFoundError on local storage; here both token kinds work, local-files storage is read from
disk when the backend shares it, and every failure names the setting to fix. Nothing else is
fetched: no arbitrary internal URLs from task data, no redirect to another host, bounded size
and time, and the API key never appears in a message.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from smartsam.io import ImageError, load_image

from .config import Settings

log = logging.getLogger("smartsam.images")


class ImageFetchError(RuntimeError):
    """The task's image cannot be had; the message says why and what to change."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401
        return None  # redirects are followed by hand, same host only


def _looks_like_jwt(key: str) -> bool:
    return key.count(".") == 2 and len(key) > 40


class ImageFetcher:
    """Resolves a task's image reference to pixels, with a small LRU of decoded images.

    Args:
        settings: backend settings (Label Studio URL and key, allowed hosts, limits).
    """

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._access: Optional[Tuple[str, float]] = None
        self._lock = threading.Lock()
        self._cache: "OrderedDict[str, np.ndarray]" = OrderedDict()

    # -- auth ------------------------------------------------------------------------------
    def _auth_header(self, refresh: bool = False) -> Optional[str]:
        key = self.s.label_studio_api_key
        if not key:
            return None
        if not _looks_like_jwt(key):
            return f"Token {key}"  # legacy token
        # A personal access token is a JWT refresh token: exchange it for a short-lived access token.
        with self._lock:
            if self._access and not refresh and self._access[1] > time.time():
                return f"Bearer {self._access[0]}"
            url = self.s.label_studio_url.rstrip("/") + "/api/token/refresh"
            req = urllib.request.Request(url, data=json.dumps({"refresh": key}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(req, timeout=self.s.image_timeout) as r:
                    access = json.loads(r.read(1 << 16))["access"]
            except urllib.error.HTTPError as e:
                raise ImageFetchError(f"Label Studio refused the personal access token (HTTP {e.code} from "
                                      f"/api/token/refresh): check LABEL_STUDIO_API_KEY") from None
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                raise ImageFetchError(f"cannot reach Label Studio at LABEL_STUDIO_URL to exchange the personal "
                                      f"access token ({getattr(e, 'reason', e)})") from None
            self._access = (access, time.time() + 240)  # access tokens live 5 minutes
            return f"Bearer {access}"

    # -- resolving -------------------------------------------------------------------------
    def _resolve(self, ref: str) -> Tuple[str, Optional[Path]]:
        """-> (absolute URL, local file path when readable from disk)."""
        if ref.startswith("/data/local-files/") and self.s.local_files_root:
            q = urllib.parse.parse_qs(urllib.parse.urlparse(ref).query).get("d", [""])[0]
            root = Path(self.s.local_files_root).resolve()
            path = (root / q).resolve()
            if root in path.parents and path.is_file():
                return ref, path
        if ref.startswith("/"):
            if not self.s.label_studio_url:
                raise ImageFetchError(f"{ref.split('?')[0]} is a Label Studio path but LABEL_STUDIO_URL is not set: "
                                      f"set it to the address this backend reaches Label Studio at")
            return self.s.label_studio_url.rstrip("/") + ref, None
        p = urllib.parse.urlparse(ref)
        if p.scheme not in ("http", "https"):
            raise ImageFetchError(f"unsupported image URL scheme {p.scheme or '(none)'!r}: cloud storage must be "
                                  f"connected in Label Studio, which then serves presigned links")
        return ref, None

    def _allowed(self, url: str) -> bool:
        host = urllib.parse.urlparse(url).netloc.lower()
        return host == self.s.label_studio_host or host in self.s.allowed_hosts

    def _get(self, url: str, deadline: float, hops: int = 0) -> bytes:
        if not self._allowed(url):
            host = urllib.parse.urlparse(url).netloc
            raise ImageFetchError(f"refusing to fetch from {host!r}: only the Label Studio host and "
                                  f"SMARTSAM_ALLOWED_HOSTS are fetched from")
        is_ls = urllib.parse.urlparse(url).netloc.lower() == self.s.label_studio_host
        headers = {"User-Agent": "smartsam-backend"}
        if is_ls:
            auth = self._auth_header()
            if auth:
                headers["Authorization"] = auth
        timeout = max(0.5, min(self.s.image_timeout, deadline - time.time()))
        try:
            resp = self._opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code in (301, 302, 303, 307, 308) and hops < 3:
                loc = urllib.parse.urljoin(url, e.headers.get("Location", ""))
                return self._get(loc, deadline, hops + 1)  # _get checks the host again
            where = urllib.parse.urlparse(url).path
            if e.code == 401 and is_ls:
                raise ImageFetchError("Label Studio answered 401 for the task image: set LABEL_STUDIO_API_KEY to an "
                                      "API token (legacy token or personal access token) of a user who can see this "
                                      "project") from None
            if e.code == 404 and "/data/local-files" in url:
                raise ImageFetchError("Label Studio answered 404 for a local-files image: check "
                                      "LOCAL_FILES_SERVING_ENABLED=true and LOCAL_FILES_DOCUMENT_ROOT on the Label "
                                      "Studio side, or set LOCAL_FILES_DOCUMENT_ROOT here if the backend sees the same "
                                      "files") from None
            raise ImageFetchError(f"image download failed: HTTP {e.code} for {where}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ImageFetchError(f"image download failed: {getattr(e, 'reason', e)}") from None
        with resp:
            length = resp.headers.get("Content-Length")
            if length is not None and int(length) > self.s.image_max_bytes:
                raise ImageFetchError(f"image is {int(length)} bytes, over SMARTSAM_IMAGE_MAX_BYTES={self.s.image_max_bytes}")
            chunks, total = [], 0
            while True:
                if time.time() > deadline:
                    raise ImageFetchError(f"image download took longer than SMARTSAM_IMAGE_TIMEOUT={self.s.image_timeout:g} s")
                try:
                    block = resp.read(1 << 16)
                except OSError as e:
                    raise ImageFetchError(f"image download failed: {e}") from None
                if not block:
                    break
                total += len(block)
                if total > self.s.image_max_bytes:
                    raise ImageFetchError(f"image is over SMARTSAM_IMAGE_MAX_BYTES={self.s.image_max_bytes} bytes")
                chunks.append(block)
            return b"".join(chunks)

    def get_json(self, path: str):
        """A Label Studio API resource (``path`` like ``/api/tasks/1``), authenticated and bounded
        like an image download."""
        url, _ = self._resolve(path)
        return json.loads(self._get(url, time.time() + self.s.image_timeout))

    def fetch(self, ref: str) -> np.ndarray:
        """The image a task refers to, as ``(H, W, 3)`` uint8 RGB (EXIF orientation applied)."""
        if not isinstance(ref, str) or not ref:
            raise ImageFetchError("the task has no image URL")
        with self._lock:
            hit = self._cache.get(ref)
            if hit is not None:
                self._cache.move_to_end(ref)
                return hit
        if ref.startswith("data:"):
            try:
                data = base64.b64decode(ref.split(",", 1)[1], validate=False)
            except (IndexError, ValueError):
                raise ImageFetchError("malformed data: URL") from None
        else:
            url, local = self._resolve(ref)
            if local is not None:
                if local.stat().st_size > self.s.image_max_bytes:
                    raise ImageFetchError(f"image is over SMARTSAM_IMAGE_MAX_BYTES={self.s.image_max_bytes} bytes")
                data = local.read_bytes()
            else:
                data = self._get(url, time.time() + self.s.image_timeout)
        try:
            image = load_image(data)
        except ImageError as e:
            raise ImageFetchError(str(e)) from None
        with self._lock:
            self._cache[ref] = image
            while len(self._cache) > self.s.image_cache:
                self._cache.popitem(last=False)
        return image
