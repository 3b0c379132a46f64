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
import logging
import posixpath
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from backend.config import Settings
from backend.errors import ImageFetchError
from backend.labelstudio.client import WEB_SCHEMES as _WEB_SCHEMES
from backend.labelstudio.client import LabelStudioClient, read_bounded
from smartsam.io import ImageError, load_image

log = logging.getLogger("smartsam.images")

# Label Studio's own resolver for cloud storage URIs: it answers with the bytes (presigned URLs
# off) or a redirect to a presigned URL on the storage host (on).
_RESOLVER = re.compile(r"^/tasks/\d+/(presign|resolve)/$")


def cache_key(ref: str, task_id: Optional[int]) -> str:
    """Where the bytes of ``ref`` come from. A cloud storage URI (``s3://bucket/key``) is resolved
    by Label Studio through the task's project's storage, so the same URI in two projects may be
    two images (two buckets of one name on two endpoints, or one the other project may not read):
    its key names the task. URLs and Label Studio paths name their bytes by themselves."""
    p = urllib.parse.urlparse(ref)
    if not ref.startswith(("/", "data:")) and p.scheme not in _WEB_SCHEMES and p.netloc:
        return f"task {task_id}\0{ref}"
    return ref


class ImageFetcher:
    """Resolves a task's image reference to pixels, with a small LRU of decoded images.

    Args:
        settings: backend settings (allowed hosts, limits).
        client: the Label Studio client (its URL, authentication and API).
    """

    def __init__(self, settings: Settings, client: Optional[LabelStudioClient] = None) -> None:
        self.s = settings
        self.client = client or LabelStudioClient(settings)
        self._lock = threading.Lock()  # the image cache only
        self._cache: "OrderedDict[str, np.ndarray]" = OrderedDict()  # cache_key -> image

    # -- resolving -------------------------------------------------------------------------
    def _resolve(self, ref: str, task_id: Optional[int] = None) -> Tuple[str, Optional[Path]]:
        """-> (absolute URL, local file path when readable from disk)."""
        if ref.startswith("/data/local-files/") and self.s.local_files_root:
            path = self._local_file(ref)
            if path is not None:
                return ref, path
        if ref.startswith("/"):
            return self.client.url(ref), None
        p = urllib.parse.urlparse(ref)
        if p.scheme in _WEB_SCHEMES:
            return ref, None
        if p.scheme and p.netloc and p.scheme.replace("-", "").isalnum():
            # s3://, gs://, azure-blob:// ...: only Label Studio can read them (it holds the keys).
            if task_id is None:
                raise ImageFetchError(f"{p.scheme}:// image without a task id: Label Studio resolves cloud storage "
                                      f"URIs per task")
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            return self.client.url(f"/tasks/{int(task_id)}/presign/?fileuri={fileuri}"), None
        raise ImageFetchError(f"unsupported image URL scheme {p.scheme or '(none)'!r}: use http(s), a Label Studio "
                              f"path, or a cloud storage connected in Label Studio")

    def _local_file(self, ref: str) -> Optional[Path]:
        """The file a ``/data/local-files/?d=...`` URL names under LOCAL_FILES_DOCUMENT_ROOT, parsed as
        Label Studio parses it (last ``d``, normalised, leading slashes dropped); None when it is not a
        readable file inside the root (then Label Studio is asked, and it checks permissions)."""
        values = urllib.parse.parse_qs(urllib.parse.urlparse(ref).query).get("d")
        if not values:
            return None
        rel = posixpath.normpath(values[-1]).lstrip("/")
        root = Path(self.s.local_files_root).resolve()
        try:
            path = (root / rel).resolve()
            if root not in path.parents:
                raise ImageFetchError("refusing a local-files path outside LOCAL_FILES_DOCUMENT_ROOT")
            return path if path.is_file() else None
        except (OSError, ValueError) as e:  # a name too long, a NUL in it: no such file here
            raise ImageFetchError(f"refusing a local-files path that cannot name a file ({e})") from None

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
            auth = self.client.auth_header()
            if auth:
                headers["Authorization"] = auth
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError(self.client.late(), transient=True)
        try:
            resp = self.client.opener.open(urllib.request.Request(url, headers=headers), timeout=min(self.s.image_timeout, remaining))
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
                                      "project", status=401) from None
            if e.code == 404 and "/data/local-files" in url:
                raise ImageFetchError("Label Studio answered 404 for a local-files image: check "
                                      "LOCAL_FILES_SERVING_ENABLED=true and LOCAL_FILES_DOCUMENT_ROOT on the Label "
                                      "Studio side, or set LOCAL_FILES_DOCUMENT_ROOT here if the backend sees the same "
                                      "files", status=404) from None
            if is_ls and _RESOLVER.match(p.path):
                raise ImageFetchError(f"Label Studio could not resolve the cloud storage URI (HTTP {e.code}): is the "
                                      f"storage connected to this project, and can the API key's user see it?",
                                      status=e.code) from None
            raise ImageFetchError(f"image download failed: HTTP {e.code} for {p.path}", status=e.code) from None
        except (http.client.InvalidURL, ValueError) as e:  # a URL that can never be fetched (a space in it...)
            raise ImageFetchError(f"image download failed: {e}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise ImageFetchError(self.client.late(), transient=True) from None
            raise ImageFetchError(f"image download failed: {getattr(e, 'reason', e)}", transient=True) from None
        with resp:
            return read_bounded(resp, deadline, self.s.image_max_bytes, self.s.image_timeout, self.client.late)

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
        key = cache_key(ref, task_id)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
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
                try:
                    if local.stat().st_size > self.s.image_max_bytes:
                        raise ImageFetchError(f"image is over SMARTSAM_IMAGE_MAX_BYTES={self.s.image_max_bytes} bytes")
                    data = local.read_bytes()
                except OSError as e:  # unreadable here (permissions, a storage hiccup): say so, never a 500
                    raise ImageFetchError(f"cannot read the local file under LOCAL_FILES_DOCUMENT_ROOT ({e.strerror or e})",
                                          transient=not isinstance(e, (PermissionError, IsADirectoryError))) from None
            else:
                data = self._get(url, deadline)
        try:
            image = load_image(data, self.s.max_pixels)
        except ImageError as e:
            raise ImageFetchError(str(e)) from None
        with self._lock:
            self._cache[key] = image
            while len(self._cache) > self.s.image_cache:
                self._cache.popitem(last=False)
        return image

