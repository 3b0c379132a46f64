"""The one Label Studio API client: authentication, bounded GET/POST, paging, predictions.

Used by the image fetcher (Label Studio's file endpoints and storage resolver), the webhook jobs,
pre-labeling, the project evaluation and the admin API. Every call is http(s) only, to
``LABEL_STUDIO_URL`` only, with the fetcher's limits (size, time, and a deadline that a server
dripping bytes cannot stretch); the API key never appears in a message.

Reading tasks without making Label Studio predict. ``GET /api/tasks/<id>`` runs the project's ML
backends on the task (synchronously, storing a prediction) whenever the project shows predictions
to annotators (``show_collab_predictions``, on by default) or retrieves them automatically, and
the task has none (Label Studio 1.23.2, ``tasks/api.py``, ``TaskAPI.get``); the task list
``GET /api/tasks?project=...`` does so when "retrieve predictions automatically" is on, except for
``review=true`` (``data_manager/api.py``, ``TaskListAPI.get``). So every task read here goes
through the list with ``review=true`` (and ``fields=all`` for annotations), never the detail
endpoint; annotations, projects, ML backends and predictions are read through their own
endpoints, which never predict.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, Iterator, List, Optional

from backend.config import Settings
from backend.errors import ImageFetchError

log = logging.getLogger("smartsam.ls")

WEB_SCHEMES = ("http", "https")


def http_opener() -> urllib.request.OpenerDirector:
    """An opener that speaks http and https only and never follows a redirect by itself
    (``build_opener`` would add file, ftp and data handlers and an automatic redirect handler)."""
    o = urllib.request.OpenerDirector()
    for h in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
              urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
        o.add_handler(h)
    return o


def _looks_like_jwt(key: str) -> bool:
    return key.count(".") == 2 and len(key) > 40


def _set_timeout(resp, seconds: float) -> None:
    """Bound the next socket wait of an open response (urllib sets the timeout once, at connect)."""
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(0.05, seconds))


def read_bounded(resp, deadline: float, limit: int, timeout: float, late) -> bytes:
    """The body of an open response, at most ``limit`` bytes, done by ``deadline``
    (``time.monotonic()``); ``late()`` gives the message when the deadline passes."""
    length = resp.headers.get("Content-Length")
    try:
        announced = int(length) if length is not None else None
    except ValueError:
        announced = None
    if announced is not None and announced > limit:
        raise ImageFetchError(f"image is {announced} bytes, over SMARTSAM_IMAGE_MAX_BYTES={limit}")
    chunks, total = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError(late(), transient=True)
        try:
            # read1 returns what has arrived, and each wait is bounded by what is left: a server
            # that drips bytes cannot hold the request past its deadline
            _set_timeout(resp, min(timeout, remaining))
            block = resp.read1(1 << 16)
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise ImageFetchError(late(), transient=True) from None
            raise ImageFetchError(f"image download failed: {e}", transient=True) from None
        if not block:
            if announced is not None and total < announced:  # the connection ended early (read1 says so only this way)
                raise ImageFetchError(f"image download failed: the connection ended after {total} of {announced} bytes",
                                      transient=True)
            return b"".join(chunks)
        total += len(block)
        if total > limit:
            raise ImageFetchError(f"image is over SMARTSAM_IMAGE_MAX_BYTES={limit} bytes")
        chunks.append(block)


class LabelStudioClient:
    """Label Studio's API as the backend uses it (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``).

    Args:
        settings: the backend's settings (URL, key, limits).
    """

    PAGE_SIZE = 100

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.opener = http_opener()
        self._access: Optional[tuple] = None
        # Only token refreshes wait on this lock: it is never held while anything else is read
        self._token_lock = threading.Lock()

    @property
    def post_timeout(self) -> float:
        """How long a write may wait for Label Studio's answer (a prediction import of a batch):
        ``SMARTSAM_WRITE_TIMEOUT``, at least ``SMARTSAM_IMAGE_TIMEOUT``."""
        return max(self.s.image_timeout, self.s.write_timeout)

    @property
    def configured(self) -> bool:
        return bool(self.s.label_studio_url and self.s.label_studio_api_key)

    @property
    def host(self) -> Optional[str]:
        return self.s.label_studio_host

    def url(self, path: str) -> str:
        if not self.s.label_studio_url:
            raise ImageFetchError(f"{path.split('?')[0]} must be read through Label Studio but LABEL_STUDIO_URL is not "
                                  f"set: set it to the address this backend reaches Label Studio at")
        return self.s.label_studio_url.rstrip("/") + path

    # -- auth ------------------------------------------------------------------------------
    def auth_header(self, refresh: bool = False) -> Optional[str]:
        """The Authorization header: ``Token <legacy token>``, or ``Bearer <access token>`` for a
        personal access token (a JWT refresh token, exchanged here for 5-minute access tokens)."""
        key = self.s.label_studio_api_key
        if not key:
            return None
        if not _looks_like_jwt(key):
            return f"Token {key}"
        with self._token_lock:
            if self._access and not refresh and self._access[1] > time.time():
                return f"Bearer {self._access[0]}"
            req = urllib.request.Request(self.url("/api/token/refresh"), data=json.dumps({"refresh": key}).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
            try:
                with self.opener.open(req, timeout=self.s.image_timeout) as r:
                    access = json.loads(r.read(1 << 16))["access"]
            except urllib.error.HTTPError as e:
                raise ImageFetchError(f"Label Studio refused the personal access token (HTTP {e.code} from "
                                      f"/api/token/refresh): check LABEL_STUDIO_API_KEY", status=e.code) from None
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                raise ImageFetchError(f"cannot reach Label Studio at LABEL_STUDIO_URL to exchange the personal "
                                      f"access token ({getattr(e, 'reason', e)})", transient=True) from None
            self._access = (access, time.time() + 240)  # access tokens live 5 minutes
            return f"Bearer {access}"

    # -- raw calls -------------------------------------------------------------------------
    def late(self) -> str:
        return (f"image download failed: not done within its time limit (SMARTSAM_IMAGE_TIMEOUT="
                f"{self.s.image_timeout:g} s, SMARTSAM_REQUEST_TIMEOUT={self.s.request_timeout:g} s)")

    def get_json(self, path: str, deadline: Optional[float] = None):
        """A Label Studio API resource (``path`` like ``/api/annotations/1``), authenticated and
        bounded like an image download. Raises ImageFetchError (HTTP errors carry ``status``)."""
        deadline = deadline or time.monotonic() + self.s.image_timeout
        headers = {"User-Agent": "smartsam-backend", "Accept": "application/json"}
        auth = self.auth_header()
        if auth:
            headers["Authorization"] = auth
        try:
            resp = self.opener.open(urllib.request.Request(self.url(path), headers=headers),
                                    timeout=max(0.05, min(self.s.image_timeout, deadline - time.monotonic())))
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise ImageFetchError(f"Label Studio answered 401 for {path.split('?')[0]}: set LABEL_STUDIO_API_KEY to "
                                      f"an API token (legacy token or personal access token) of a user who can see "
                                      f"this project", status=401) from None
            raise ImageFetchError(f"Label Studio answered HTTP {e.code} for {path.split('?')[0]}", status=e.code) from None
        except (http.client.InvalidURL, ValueError) as e:  # a URL that can never be fetched
            raise ImageFetchError(f"cannot ask Label Studio for {path.split('?')[0]}: {e}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ImageFetchError(f"cannot reach Label Studio for {path.split('?')[0]}: {getattr(e, 'reason', e)}",
                                  transient=True) from None
        with resp:
            body = read_bounded(resp, deadline, self.s.image_max_bytes, self.s.image_timeout, self.late)
        try:
            return json.loads(body)
        except ValueError:
            raise ImageFetchError(f"Label Studio answered {path.split('?')[0]} with something that is not JSON",
                                  transient=True) from None

    def post_json(self, path: str, body) -> object:
        """POST JSON to Label Studio's API; authenticated, time-bounded; the answer (bounded) as
        JSON or None."""
        headers = {"User-Agent": "smartsam-backend", "Content-Type": "application/json"}
        auth = self.auth_header()
        if auth:
            headers["Authorization"] = auth
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with self.opener.open(req, timeout=self.post_timeout) as r:
                raw = r.read(1 << 20)
        except urllib.error.HTTPError as e:
            raise ImageFetchError(f"Label Studio answered HTTP {e.code} to POST {path.split('?')[0]}", status=e.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ImageFetchError(f"cannot reach Label Studio for POST {path.split('?')[0]}: {getattr(e, 'reason', e)}",
                                  transient=True) from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    # -- resources -------------------------------------------------------------------------
    def annotation(self, annotation_id: int) -> Dict:
        return self.get_json(f"/api/annotations/{int(annotation_id)}")

    def project(self, project_id: int) -> Dict:
        return self.get_json(f"/api/projects/{int(project_id)}")

    def _task_page(self, project_id: int, page: int, page_size: int, selected: Optional[List[int]] = None,
                   query: Optional[Dict] = None, fields: str = "all") -> List[Dict]:
        """One page of the task list (``review=true``: never makes Label Studio predict), of the
        ``selected`` tasks or those a Data Manager ``query`` (filters, ordering) picks."""
        q = {"project": int(project_id), "page": page, "page_size": page_size, "fields": fields, "review": "true",
             "resolve_uri": "false"}
        dm = dict(query or {})
        if selected is not None:
            dm["selectedItems"] = {"all": False, "included": [int(t) for t in selected]}
        if dm:
            q["query"] = json.dumps(dm)
        try:
            d = self.get_json("/api/tasks?" + urllib.parse.urlencode(q))
        except ImageFetchError as e:
            if e.status == 404 and page > 1:  # past the last page
                return []
            raise
        items = d.get("tasks", []) if isinstance(d, dict) else d
        if not isinstance(items, list):
            raise ImageFetchError("Label Studio's task list is not a list", transient=True)
        return [t for t in items if isinstance(t, dict)]

    def task(self, project_id: int, task_id: int) -> Dict:
        """One task of a project with its annotations and predictions, read so that Label Studio
        does not predict (see the module's docstring). ImageFetchError(status=404) when the task is
        not in that project."""
        for t in self._task_page(project_id, 1, 1, [task_id]):
            if t.get("id") == int(task_id):
                return t
        raise ImageFetchError(f"task {task_id} is not in project {project_id}", status=404)

    def tasks(self, project_id: int, page_size: Optional[int] = None) -> Iterator[Dict]:
        """Every task of the project (annotations and predictions included), page by page, without
        making Label Studio predict."""
        size = page_size or self.PAGE_SIZE
        page = 1
        while True:
            items = self._task_page(project_id, page, size)
            yield from items
            if len(items) < size:
                return
            page += 1

    def unlabeled_tasks(self, project_id: int, exclude: Optional[int] = None, limit: int = 2) -> List[Dict]:
        """The first ``limit`` tasks of the project without annotations, in id order (Label
        Studio's sequential stream), ``exclude`` left out: one page of the task list, filtered
        and ordered by Label Studio's Data Manager query, without making it predict."""
        items = [{"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0}]
        if exclude is not None:
            items.append({"filter": "filter:tasks:id", "operator": "not_equal", "type": "Number", "value": int(exclude)})
        query = {"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]}
        tasks = self._task_page(project_id, 1, max(1, int(limit)), query=query, fields="task_only")
        return [t for t in tasks if t.get("id") != exclude][:limit]

    def predictions(self, task_id: int) -> List[Dict]:
        d = self.get_json(f"/api/predictions?task={int(task_id)}")
        return [p for p in d if isinstance(p, dict)] if isinstance(d, list) else []

    def import_predictions(self, project_id: int, predictions: List[Dict]) -> None:
        """Write predictions (``{task, result, score, model_version}``) in one call."""
        self.post_json(f"/api/projects/{int(project_id)}/import/predictions", predictions)

    def ml_backends(self, project_id: int) -> List[Dict]:
        d = self.get_json(f"/api/ml?project={int(project_id)}")
        return [m for m in d if isinstance(m, dict)] if isinstance(d, list) else []
