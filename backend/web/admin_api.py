"""The admin API and page (``Authorization: Bearer $SMARTSAM_ADMIN_TOKEN``, or basic auth with that
token as the password, which a browser asks for; changes from a browser need the same-origin
``X-SmartSAM-Admin: 1`` header):

``GET /admin`` (page), ``/admin/references[/<project>[/<label>[/mask.png|/versions]]]`` (GET, PUT,
DELETE), ``GET /admin/versions/<id>[/thumb.jpg|/mask.png|/image.jpg]``,
``POST /admin/versions/<id>/restore``, ``GET /admin/stats[.png][?project=ID]`` (field statistics)
and ``GET /admin/jobs``.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Dict

from backend.background.reference_rules import ReferenceRules
from backend.background.workers import Workers
from backend.config import Settings
from backend.errors import ImageFetchError, RequestError
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.label_config import LabelConfig
from backend.labelstudio.schemas import ReferenceBody, parse
from backend.serving.models import Models
from backend.store.field_stats import FieldStats
from backend.store.references import CorruptReference, ReferenceStore
from backend.web.wsgi import HttpError, Raw, Request, Router, basic_credentials, json_object, same

SQLITE_MAX_ID = (1 << 63) - 1


def check_admin(environ, method: str, token) -> None:
    """The admin token as a Bearer token, or as the basic-auth password (the page)."""
    if not token:
        raise HttpError(403, "the admin API is off: set SMARTSAM_ADMIN_TOKEN to turn it on")
    h = environ.get("HTTP_AUTHORIZATION", "")
    if h.startswith("Bearer ") and same(h[7:], token):
        return
    cred = basic_credentials(environ)
    if cred is not None and same(cred[1], token):
        # a browser resends basic credentials with any site's form: changes need a header
        # that only a same-origin script can add (the admin page's)
        if method not in ("GET", "HEAD") and environ.get("HTTP_X_SMARTSAM_ADMIN") != "1":
            raise HttpError(403, "changes from a browser need the X-SmartSAM-Admin: 1 header (the admin page sends it)")
        return
    raise HttpError(401, "admin token required: Authorization: Bearer <SMARTSAM_ADMIN_TOKEN> (or basic auth with it "
                         "as the password)")


class AdminApi:
    """The admin routes over the stores.

    Args:
        settings: the backend's settings.
        store: the reference store.
        stats: the field statistics.
        client: the Label Studio client ("reference from a task" reads the task there).
        models: the models (an uploaded reference's features are computed there).
        rules: the reference rules ("reference from a task" uses the same first-region rule).
        workers: the background work (its state and what failed: the page and /admin/jobs).
        gate: a context manager that holds a model request slot (a PUT computes a feature).
    """

    def __init__(self, settings: Settings, store: ReferenceStore, stats: FieldStats, client: LabelStudioClient,
                 models: Models, rules: ReferenceRules, workers: Workers, gate) -> None:
        self.settings, self.store, self.field_stats, self.client, self.models = settings, store, stats, client, models
        self.rules = rules
        self.workers = workers
        self.gate = gate

    def register(self, r: Router) -> None:
        r.add("GET", "/admin", self.page)
        r.add("GET", "/admin/jobs", lambda req: (200, dict(self.workers.state(), troubled=self.workers.troubled())))
        r.add("POST", "/admin/jobs/retry", lambda req: (200, {"retried": self.workers.durable.retry_given_up()}))
        r.add("GET", "/admin/stats", self.stats)
        r.add("GET", "/admin/stats.png", self.stats_png)
        r.add("GET", "/admin/references", self.references)
        r.add("GET", "/admin/references/{project}", self.references)
        r.add("GET", "/admin/references/{project}/{label}", self.show)
        r.add("PUT", "/admin/references/{project}/{label}", self.put)
        r.add("DELETE", "/admin/references/{project}/{label}", self.delete)
        r.add("GET", "/admin/references/{project}/{label}/mask.png", self.mask)
        r.add("GET", "/admin/references/{project}/{label}/versions", self.versions)
        r.add("GET", "/admin/versions/{vid}", self.version)
        r.add("GET", "/admin/versions/{vid}/{file}", self.version_file)
        r.add("POST", "/admin/versions/{vid}/restore", self.restore)

    # -- pages and listings ----------------------------------------------------------------
    def page(self, req: Request):
        from backend.serving.versions import instance_report
        from backend.web.admin_page import render

        return 200, render(self.store, self.workers.state(), self.settings.label_studio_url, self.field_stats.summary(),
                           instance_report(self.field_stats, self.store, self.settings), self.workers.troubled())

    def stats(self, req: Request):
        from backend.serving.versions import instance_report

        project = (req.query.get("project") or [None])[0]
        return 200, dict(self.field_stats.summary(project), instances=instance_report(self.field_stats, self.store, self.settings, project))

    def stats_png(self, req: Request):
        from backend.store.field_stats import plot_png

        return 200, Raw(plot_png(self.field_stats.summary((req.query.get("project") or [None])[0])), "image/png")

    def references(self, req: Request, project=None):
        store = self.store
        return 200, {"references": [r.public() for r in store.list(project)], "problems": store.check()}

    def show(self, req: Request, project, label):
        store = self.store
        meta = store.meta(project, label)
        if meta is None:
            raise HttpError(404, f"no reference for project {project} label {label!r}")
        return 200, dict(meta.public(), exemplars=[m.public() for m in store.current(project, label)])

    def mask(self, req: Request, project, label):
        png = self.store.mask_png(project, label)
        if png is None:
            raise HttpError(404, f"no mask for project {project} label {label!r}")
        return 200, png

    def versions(self, req: Request, project, label):
        store = self.store
        return 200, {"versions": [v.public() for v in store.history(project, label)],
                     "current": [v.id for v in store.current(project, label)]}

    # -- changes ---------------------------------------------------------------------------
    def delete(self, req: Request, project, label):
        return 200, {"deleted": self.store.delete(project, label)}

    def put(self, req: Request, project, label):
        body = json_object(req.environ, self.settings.max_request_bytes)
        try:
            parse(ReferenceBody, body)
        except RequestError as e:
            raise HttpError(400, str(e)) from None
        with self.gate():
            try:
                return 200, self._set_reference(project, label, body)
            except (RequestError, ValueError) as e:
                raise HttpError(400, str(e)) from None

    def _set_reference(self, project: str, label: str, body: Dict) -> Dict:
        from smartsam.io import ImageError, load_image, load_mask

        cap = self.settings.max_pixels
        if "text" in body:
            ref = self.models.make_reference(None, text=str(body["text"]))
            self.store.put(project, label, ref, {"admin": "text"}, how="admin")
            return {"set": label, "kind": "text"}
        if "image_b64" in body:
            try:
                image = load_image(base64.b64decode(body["image_b64"]), cap)
                mask = load_mask(io.BytesIO(base64.b64decode(body["mask_b64"])), cap) if body.get("mask_b64") else None
            except (ImageError, binascii.Error, ValueError, TypeError) as e:
                raise RequestError(f"bad image or mask: {e}") from None
            ref = self.models.make_reference(image, mask)
            self.store.put(project, label, ref, {"admin": "upload", "prep": self.settings.reference_prep if mask is not None else None},
                          mask=mask, image=image, how="admin")
            return {"set": label, "kind": ref.kind}
        if "task" in body:
            return self._reference_from_task(project, label, body)
        raise RequestError("give one of: text, image_b64 (+ mask_b64), task (+ annotation)")

    def _reference_from_task(self, project: str, label: str, body: Dict) -> Dict:
        """Read an annotated task of this project from Label Studio and use its brush mask for
        ``label`` (the project's labeling config names the image)."""
        try:
            tid = int(body["task"])
            ann = None if body.get("annotation") is None else int(body["annotation"])
            pid = int(project)
        except (TypeError, ValueError):
            raise RequestError("task, annotation and the project must be Label Studio ids (whole numbers)") from None
        c = self.client
        try:
            cfg = LabelConfig.parse(c.project(pid).get("label_config"), need_prompts=False)
            task = c.task(pid, tid)
        except ImageFetchError as e:
            if e.status == 404:
                raise RequestError(f"task {tid} is not in project {pid} (Label Studio says)") from None
            raise RequestError(f"cannot read task {tid} from Label Studio ({e})") from None
        try:
            return self.rules.from_task(project, label, task, cfg, ann)
        except ImageFetchError as e:
            raise RequestError(f"cannot fetch the task's image ({e})") from None

    # -- versions --------------------------------------------------------------------------
    def _version(self, vid: str):
        # ids are SQLite integers: anything else (or past 2^63) is simply not a version; ASCII digits
        # only ("²".isdigit() is true and int("²") fails)
        if not (vid.isascii() and vid.isdigit()) or len(vid) > 19 or int(vid) > SQLITE_MAX_ID:
            raise HttpError(404, f"no reference version {vid[:40]!r}")
        v = self.store.version(int(vid))
        if v is None:
            raise HttpError(404, f"no reference version {vid}")
        return v

    def version(self, req: Request, vid):
        return 200, self._version(vid).public()

    def restore(self, req: Request, vid):
        v = self._version(vid)
        store = self.store
        new = store.restore(v.id, {"admin": "restore"})
        return 200, {"restored": v.id, "version": new, "current": [m.public() for m in store.current(v.project, v.label)]}

    def version_file(self, req: Request, vid, file):
        files = {"thumb.jpg": ("thumb", "image/jpeg"), "mask.png": ("mask", "image/png"), "image.jpg": ("image", "image/jpeg")}
        v = self._version(vid)
        if file not in files:
            raise HttpError(404, f"no admin endpoint for version {v.id}: {file}")
        try:
            data = self.store.version_file(v.id, files[file][0])
        except CorruptReference as e:
            raise HttpError(404, str(e)) from None
        if data is None:
            raise HttpError(404, f"version {v.id} has no {file}")
        return 200, Raw(data, files[file][1])
