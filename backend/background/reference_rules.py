"""The reference rules: how a label's references follow the annotators (the README's table).

Applied to an annotation *as Label Studio holds it* (read back by id, never taken from a webhook
body), and the same rule for every path (webhooks, the admin's "from task"):

- a skipped annotation (``was_cancelled``) changes nothing;
- each label's mask is its first answer region in the annotation (brush, polygon, bitmask or box,
  :func:`~backend.labelstudio.regions.first_regions`); a box makes an image reference from the box's crop;
- a label with a free exemplar slot takes the mask (the first K submitted, K = 1 by default);
- the annotation a reference came from updates it when edited (and withdraws it when the label's
  mask is removed from it);
- "Use as reference" acts when it becomes ticked (the transition), replacing the label's
  references; an annotation that stays ticked changes nothing on later edits.

The same annotation also feeds the field statistics (:meth:`ReferenceRules.observe`).
"""

from __future__ import annotations

import datetime
import logging
from typing import Dict, List, Optional

import numpy as np

from backend.config import Settings
from backend.errors import RequestError
from backend.labelstudio.label_config import REFERENCE_CHOICE, LabelConfig
from backend.labelstudio.regions import first_regions, primary_regions, region_mask, region_shown_mask, ticks_reference
from backend.serving.models import Models
from backend.store.field_stats import FieldStats, raster_fingerprint
from backend.store.references import ReferenceStore

log = logging.getLogger("smartsam.references")


def timestamp(value) -> Optional[float]:
    """Label Studio's ISO 8601 time (``2026-12-01T19:45:56.123456Z``) -> seconds since the epoch."""
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


class ReferenceRules:
    """The lifecycle rules over the reference store.

    Args:
        settings: the backend's settings.
        models: the models (a reference's features are computed on the model's thread).
        store: the reference store.
        stats: the field statistics (the same annotation feeds them).
        image: ``(task, cfg) -> (H, W, 3)`` image of a task (the answers' fetcher path).
    """

    def __init__(self, settings: Settings, models: Models, store: ReferenceStore, stats: FieldStats, image) -> None:
        self.settings = settings
        self.models = models
        self.store = store
        self.stats = stats
        self._image = image

    def apply(self, ann: Dict, task: Dict, project: str, event: str, cfg: LabelConfig) -> Dict:
        """Apply the rules to one annotation; returns ``{"reference": [labels changed], ...}``."""
        aid = ann.get("id")
        if ann.get("was_cancelled"):
            return {"reference": [], "reason": "skipped annotation"}
        results = [r for r in (ann.get("result") or []) if isinstance(r, dict)]
        ticked = ticks_reference(results, REFERENCE_CHOICE)
        store = self.store
        force = ticked and not store.annotation_forced(aid)
        first = first_regions(results, cfg)
        image: Optional[np.ndarray] = None
        done: List[str] = []
        todo = []
        for label, r in first.items():
            cur = store.current(project, label)
            own = any(m.annotation == aid for m in cur)
            if not (force or own or len(cur) < store.k(project)):
                continue
            if image is None:
                image = self._image(task, cfg)
            # every region is read before any reference changes: a bad one changes nothing
            todo.append((label, r, region_mask(r, image.shape[:2], self.settings.max_pixels), own))
        for label, r, mask, own in todo:
            if not mask.any():
                continue
            ref, mask, ref_image = self._reference(image, r, mask)
            how = "forced" if force else ("edited" if own else "first")
            source = {"event": event, "task": task.get("id"), "annotation": aid, "forced": force,
                      "user": ann.get("completed_by"), "prep": self.settings.reference_prep}
            if store.put(project, label, ref, source, mask=mask, image=ref_image, annotation=aid, how=how,
                         policy="replace" if force else "auto") is not None:
                done.append(label)
        for m in store.list(project):
            if m.annotation == aid and m.label not in first:
                # the annotator removed this label's mask from the annotation the reference came from
                store.withdraw_annotation(aid, "mask removed from the annotation in Label Studio", project, m.label)
                done.append(m.label)
        store.set_annotation_forced(aid, project, ticked)
        if not first:
            return {"reference": done, "reason": "no answer region in the annotation"}
        return {"reference": done}

    def _reference(self, image: np.ndarray, region: Dict, mask: np.ndarray):
        """``(reference, mask or None, image kept)``: an image + mask reference, or for a box an
        image reference from the box's crop (a box says where, not which pixels)."""
        if region.get("type") == "rectanglelabels":
            ys, xs = np.nonzero(mask)
            crop = np.ascontiguousarray(image[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
            return self.models.make_reference(crop), None, crop
        return self.models.make_reference(image, mask), mask, image

    def from_task(self, project: str, label: str, task: Dict, cfg: LabelConfig,
                  annotation: Optional[int] = None) -> Dict:
        """The admin's "reference from a task": the label's first answer region of the task's
        (given, else first) submitted annotation becomes the label's only reference."""
        anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if annotation is not None:
            anns = [a for a in anns if a.get("id") == int(annotation)]
        for a in anns:
            r = first_regions(a.get("result") or [], cfg).get(label)
            if r is None:
                continue
            image = self._image(task, cfg)
            mask = region_mask(r, image.shape[:2], self.settings.max_pixels)
            if not mask.any():
                raise RequestError(f"task {task.get('id')}'s region labelled {label!r} is empty")
            ref, mask, ref_image = self._reference(image, r, mask)
            self.store.put(project, label, ref, {"admin": "task", "task": task.get("id"), "annotation": a.get("id"),
                                                        "prep": self.settings.reference_prep},
                                  mask=mask, image=ref_image, annotation=a.get("id"), how="admin")
            return {"set": label, "kind": ref.kind, "task": task.get("id"), "annotation": a.get("id")}
        raise RequestError(f"task {task.get('id')} has no submitted region labelled {label!r}")

    def observe(self, ann: Dict, task: Dict, project: str, cfg: LabelConfig) -> List[Dict]:
        """Field statistics: match the annotation's regions (as Label Studio holds them; one
        answer tag's, :func:`~backend.labelstudio.regions.primary_regions`) to the suggestions served for its
        task before the annotation was created; a skipped annotation counts for nothing."""
        aid = ann.get("id")
        stats = self.stats
        if ann.get("was_cancelled"):
            stats.forget(aid)
            return []
        regions = []
        for k, label, r in primary_regions(ann.get("result") or [], cfg):
            try:
                mask = region_shown_mask(r, self.settings.max_pixels)  # bounded before decoding
            except (RequestError, ValueError) as e:
                log.warning("annotation %s region %s: not counted in the statistics (%s)", aid, r.get("id"), e)
                continue
            regions.append((str(r.get("id") or k), label, mask, raster_fingerprint(mask)))
        lead = ann.get("lead_time")
        return stats.observe(project, task.get("id"), aid, regions,
                             lead_time=lead if isinstance(lead, (int, float)) and lead > 0 else None,
                             user=ann.get("completed_by"), created_at=timestamp(ann.get("created_at")))
