"""Fetching task images safely: only from Label Studio and hosts the admin allows.

Users of the existing SAM backends keep hitting 401s (legacy token vs personal access token) and
FileNotFoundError on local storage; here both token kinds work, local-files storage is read from
disk when the backend shares it, cloud storage URIs (``s3://``, ``gs://``, ``azure-blob://``...)
are resolved by Label Studio itself, and every failure names the setting to fix.

Nothing else is fetched: http(s) only (the opener has no file or ftp handler, and every redirect
hop is checked again), no arbitrary internal URLs from task data, no redirect to another host
except the one Label Studio's own storage resolver answers with, ``data:`` URLs only when
``SMARTSAM_ALLOW_DATA_URLS`` is on, bounded size and time (a server that drips bytes is cut at the
deadline), and the API key goes to the Label Studio host only and never into a message.
"""

from __future__ import annotations

import base64
import http.client
import json
import posixpath
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path
import re
from typing import Optional, Tuple

import numpy as np

from smartsam.io import ImageError, load_image

from .config import Settings

log = logging.getLogger("smartsam.images")


class ImageFetchError(RuntimeError):
    """The task's image (or a Label Studio resource) cannot be had; the message says why and what
    to change. ``status`` is the HTTP status when the server answered with an error."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


def _http_opener() -> urllib.request.OpenerDirector:
    """An opener that speaks http and https only and never follows a redirect by itself
    (``build_opener`` would add file, ftp and data handlers and an automatic redirect handler)."""
    o = urllib.request.OpenerDirector()
    for h in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
              urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
        o.add_handler(h)
    return o


# Label Studio's own resolver for cloud storage URIs: it answers with the bytes (presigned URLs
# off) or a redirect to a presigned URL on the storage host (on).
_RESOLVER = re.compile(r"^/tasks/\d+/(presign|resolve)/$")
_WEB_SCHEMES = ("http", "https")


def _looks_like_jwt(key: str) -> bool:
    return key.count(".") == 2 and len(key) > 40


class ImageFetcher:
    """Resolves a task's image reference to pixels, with a small LRU of decoded images.

    Args:
        settings: backend settings (Label Studio URL and key, allowed hosts, limits).
    """

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._opener = _http_opener()
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
    def _resolve(self, ref: str, task_id: Optional[int] = None) -> Tuple[str, Optional[Path]]:
        """-> (absolute URL, local file path when readable from disk)."""
        if ref.startswith("/data/local-files/") and self.s.local_files_root:
            path = self._local_file(ref)
            if path is not None:
                return ref, path
        if ref.startswith("/"):
            return self._ls_url(ref), None
        p = urllib.parse.urlparse(ref)
        if p.scheme in _WEB_SCHEMES:
            return ref, None
        if p.scheme and p.netloc and p.scheme.replace("-", "").isalnum():
            # s3://, gs://, azure-blob:// ...: only Label Studio can read them (it holds the keys).
            if task_id is None:
                raise ImageFetchError(f"{p.scheme}:// image without a task id: Label Studio resolves cloud storage "
                                      f"URIs per task")
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            return self._ls_url(f"/tasks/{int(task_id)}/presign/?fileuri={fileuri}"), None
        raise ImageFetchError(f"unsupported image URL scheme {p.scheme or '(none)'!r}: use http(s), a Label Studio "
                              f"path, or a cloud storage connected in Label Studio")

    def _ls_url(self, path: str) -> str:
        if not self.s.label_studio_url:
            raise ImageFetchError(f"{path.split('?')[0]} must be read through Label Studio but LABEL_STUDIO_URL is not "
                                  f"set: set it to the address this backend reaches Label Studio at")
        return self.s.label_studio_url.rstrip("/") + path

    def _local_file(self, ref: str) -> Optional[Path]:
        """The file a ``/data/local-files/?d=...`` URL names under LOCAL_FILES_DOCUMENT_ROOT, parsed as
        Label Studio parses it (last ``d``, normalised, leading slashes dropped); None when it is not a
        readable file inside the root (then Label Studio is asked, and it checks permissions)."""
        values = urllib.parse.parse_qs(urllib.parse.urlparse(ref).query).get("d")
        if not values:
            return None
        rel = posixpath.normpath(values[-1]).lstrip("/")
        root = Path(self.s.local_files_root).resolve()
        path = (root / rel).resolve()
        if root not in path.parents:
            raise ImageFetchError("refusing a local-files path outside LOCAL_FILES_DOCUMENT_ROOT")
        return path if path.is_file() else None

    def _allowed(self, url: str) -> bool:
        host = urllib.parse.urlparse(url).netloc.lower()
        return host == self.s.label_studio_host or host in self.s.allowed_hosts

    def _get(self, url: str, deadline: float, hops: int = 0, any_host: bool = False) -> bytes:
        """GET ``url`` within ``deadline`` (``time.monotonic()``), at most SMARTSAM_IMAGE_MAX_BYTES.

        Every hop is checked again: http(s) only, and the Label Studio host or an allowed host,
        except right after Label Studio's storage resolver (``any_host``), which redirects to the
        storage host it chose (a presigned URL; the API key is never sent there).
        """
        p = urllib.parse.urlparse(url)
        if p.scheme not in _WEB_SCHEMES:
            raise ImageFetchError(f"refusing to fetch a {p.scheme or '(no scheme)'}: URL: http(s) only")
        is_ls = p.netloc.lower() == self.s.label_studio_host
        if not (is_ls or any_host or self._allowed(url)):
            raise ImageFetchError(f"refusing to fetch from {p.netloc!r}: only the Label Studio host and "
                                  f"SMARTSAM_ALLOWED_HOSTS are fetched from")
        headers = {"User-Agent": "smartsam-backend"}
        if is_ls:
            auth = self._auth_header()
            if auth:
                headers["Authorization"] = auth
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError(self._late())
        try:
            resp = self._opener.open(urllib.request.Request(url, headers=headers), timeout=min(self.s.image_timeout, remaining))
        except urllib.error.HTTPError as e:
            if e.code in (301, 302, 303, 307, 308):
                if hops >= 3:
                    raise ImageFetchError("image download failed: too many redirects") from None
                loc = urllib.parse.urljoin(url, e.headers.get("Location", ""))
                resolver = is_ls and bool(_RESOLVER.match(p.path))
                return self._get(loc, deadline, hops + 1, any_host=resolver)
            if e.code == 401 and is_ls:
                raise ImageFetchError("Label Studio answered 401 for the task image: set LABEL_STUDIO_API_KEY to an "
                                      "API token (legacy token or personal access token) of a user who can see this "
                                      "project") from None
            if e.code == 404 and "/data/local-files" in url:
                raise ImageFetchError("Label Studio answered 404 for a local-files image: check "
                                      "LOCAL_FILES_SERVING_ENABLED=true and LOCAL_FILES_DOCUMENT_ROOT on the Label "
                                      "Studio side, or set LOCAL_FILES_DOCUMENT_ROOT here if the backend sees the same "
                                      "files") from None
            if is_ls and _RESOLVER.match(p.path):
                raise ImageFetchError(f"Label Studio could not resolve the cloud storage URI (HTTP {e.code}): is the "
                                      f"storage connected to this project, and can the API key's user see it?") from None
            raise ImageFetchError(f"image download failed: HTTP {e.code} for {p.path}", status=e.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            if time.monotonic() >= deadline:
                raise ImageFetchError(self._late()) from None
            raise ImageFetchError(f"image download failed: {getattr(e, 'reason', e)}") from None
        with resp:
            length = resp.headers.get("Content-Length")
            try:
                announced = int(length) if length is not None else None
            except ValueError:
                announced = None
            if announced is not None and announced > self.s.image_max_bytes:
                raise ImageFetchError(f"image is {announced} bytes, over SMARTSAM_IMAGE_MAX_BYTES={self.s.image_max_bytes}")
            chunks, total = [], 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ImageFetchError(self._late())
                try:
                    # read1 returns what has arrived, and each wait is bounded by what is left:
                    # a server that drips bytes cannot hold the request past its deadline
                    _set_timeout(resp, min(self.s.image_timeout, remaining))
                    block = resp.read1(1 << 16)
                except (OSError, http.client.HTTPException) as e:
                    if time.monotonic() >= deadline:
                        raise ImageFetchError(self._late()) from None
                    raise ImageFetchError(f"image download failed: {e}") from None
                if not block:
                    break
                total += len(block)
                if total > self.s.image_max_bytes:
                    raise ImageFetchError(f"image is over SMARTSAM_IMAGE_MAX_BYTES={self.s.image_max_bytes} bytes")
                chunks.append(block)
            return b"".join(chunks)

    def _late(self) -> str:
        return (f"image download failed: not done within its time limit (SMARTSAM_IMAGE_TIMEOUT="
                f"{self.s.image_timeout:g} s, SMARTSAM_REQUEST_TIMEOUT={self.s.request_timeout:g} s)")

    def get_json(self, path: str, deadline: Optional[float] = None):
        """A Label Studio API resource (``path`` like ``/api/tasks/1``), authenticated and bounded
        like an image download. Raises ImageFetchError (HTTP errors name the code)."""
        url = self._ls_url(path)
        deadline = deadline or time.monotonic() + self.s.image_timeout
        try:
            return json.loads(self._get(url, deadline))
        except ValueError:
            raise ImageFetchError(f"Label Studio answered {path.split('?')[0]} with something that is not JSON") from None

    def post_json(self, path: str, body) -> object:
        """POST JSON to Label Studio's API (``path`` like ``/api/projects/1/import/predictions``);
        authenticated, time-bounded; the answer (bounded) as JSON or None."""
        url = self._ls_url(path)
        headers = {"User-Agent": "smartsam-backend", "Content-Type": "application/json"}
        auth = self._auth_header()
        if auth:
            headers["Authorization"] = auth
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=max(self.s.image_timeout, 30)) as r:
                raw = r.read(1 << 20)
        except urllib.error.HTTPError as e:
            raise ImageFetchError(f"Label Studio answered HTTP {e.code} to POST {path.split('?')[0]}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ImageFetchError(f"cannot reach Label Studio for POST {path.split('?')[0]}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def fetch(self, ref: str, task_id: Optional[int] = None, deadline: Optional[float] = None) -> np.ndarray:
        """The image a task refers to, as ``(H, W, 3)`` uint8 RGB (EXIF orientation applied).

        Args:
            ref: the task's image value: a Label Studio path, an http(s) URL, a cloud storage URI.
            task_id: the task, for cloud storage URIs (Label Studio resolves them per task).
            deadline: ``time.monotonic()`` by which it must be done (else ImageFetchError).
        """
        if not isinstance(ref, str) or not ref:
            raise ImageFetchError("the task has no image URL")
        deadline = min(deadline or float("inf"), time.monotonic() + self.s.image_timeout)
        with self._lock:
            hit = self._cache.get(ref)
            if hit is not None:
                self._cache.move_to_end(ref)
                return hit
        if ref.startswith("data:"):
            if not self.s.allow_data_urls:
                raise ImageFetchError("data: image URLs are off (SMARTSAM_ALLOW_DATA_URLS=true allows them)")
            try:
                data = base64.b64decode(ref.split(",", 1)[1], validate=False)
            except (IndexError, ValueError):
                raise ImageFetchError("malformed data: URL") from None
        else:
            url, local = self._resolve(ref, task_id)
            if local is not None:
                if local.stat().st_size > self.s.image_max_bytes:
                    raise ImageFetchError(f"image is over SMARTSAM_IMAGE_MAX_BYTES={self.s.image_max_bytes} bytes")
                data = local.read_bytes()
            else:
                data = self._get(url, deadline)
        try:
            image = load_image(data)
        except ImageError as e:
            raise ImageFetchError(str(e)) from None
        with self._lock:
            self._cache[ref] = image
            while len(self._cache) > self.s.image_cache:
                self._cache.popitem(last=False)
        return image


def _set_timeout(resp, seconds: float) -> None:
    """Bound the next socket wait of an open response (urllib sets the timeout once, at connect)."""
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(0.05, seconds))
