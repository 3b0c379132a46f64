"""The reference rules: how a label's references follow the annotators (the README's table).

Applied to an annotation *as Label Studio holds it* (read back by id, never taken from a webhook
body), and the same rule for every path (webhooks, the admin's "from task"):

- a skipped annotation (``was_cancelled``) changes nothing;
- each label's mask is its first brush region in the annotation (:func:`~backend.regions.first_regions`);
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

from .engine import Engine
from .errors import RequestError
from .label_config import REFERENCE_CHOICE, LabelConfig
from .regions import brush_mask, brush_regions, first_regions, region_shown_mask, ticks_reference

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
    """The lifecycle rules over the engine's reference store.

    Args:
        engine: the process's :class:`~backend.engine.Engine` (store, fetcher, feature models).
        image: ``(task, cfg) -> (H, W, 3)`` image of a task (the answers' fetcher path).
    """

    def __init__(self, engine: Engine, image) -> None:
        self.engine = engine
        self._image = image

    def apply(self, ann: Dict, task: Dict, project: str, event: str, cfg: LabelConfig) -> Dict:
        """Apply the rules to one annotation; returns ``{"reference": [labels changed], ...}``."""
        aid = ann.get("id")
        if ann.get("was_cancelled"):
            return {"reference": [], "reason": "skipped annotation"}
        results = [r for r in (ann.get("result") or []) if isinstance(r, dict)]
        ticked = ticks_reference(results, REFERENCE_CHOICE)
        store = self.engine.store
        force = ticked and not store.annotation_forced(aid)
        first = first_regions(results)
        image: Optional[np.ndarray] = None
        done: List[str] = []
        for label, r in first.items():
            cur = store.current(project, label)
            own = any(m.annotation == aid for m in cur)
            if not (force or own or len(cur) < store.k(project)):
                continue
            if image is None:
                image = self._image(task, cfg)
            mask = brush_mask(r, image.shape[:2], self.engine.settings.max_pixels)
            if not mask.any():
                continue
            ref = self.engine.make_reference(image, mask)
            how = "forced" if force else ("edited" if own else "first")
            source = {"event": event, "task": task.get("id"), "annotation": aid, "forced": force,
                      "user": ann.get("completed_by"), "prep": self.engine.settings.reference_prep}
            if store.put(project, label, ref, source, mask=mask, image=image, annotation=aid, how=how,
                         policy="replace" if force else "auto") is not None:
                done.append(label)
        for m in store.list(project):
            if m.annotation == aid and m.label not in first:
                # the annotator removed this label's mask from the annotation the reference came from
                store.withdraw_annotation(aid, "mask removed from the annotation in Label Studio", project, m.label)
                done.append(m.label)
        store.set_annotation_forced(aid, project, ticked)
        if not first:
            return {"reference": done, "reason": "no brush region in the annotation"}
        return {"reference": done}

    def from_task(self, project: str, label: str, task: Dict, cfg: LabelConfig,
                  annotation: Optional[int] = None) -> Dict:
        """The admin's "reference from a task": the label's first brush region of the task's
        (given, else first) submitted annotation becomes the label's only reference."""
        anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if annotation is not None:
            anns = [a for a in anns if a.get("id") == int(annotation)]
        for a in anns:
            r = first_regions(a.get("result") or []).get(label)
            if r is None:
                continue
            image = self._image(task, cfg)
            mask = brush_mask(r, image.shape[:2], self.engine.settings.max_pixels)
            ref = self.engine.make_reference(image, mask)
            self.engine.store.put(project, label, ref, {"admin": "task", "task": task.get("id"), "annotation": a.get("id"),
                                                        "prep": self.engine.settings.reference_prep},
                                  mask=mask, image=image, annotation=a.get("id"), how="admin")
            return {"set": label, "kind": "mask", "task": task.get("id"), "annotation": a.get("id")}
        raise RequestError(f"task {task.get('id')} has no submitted brush region labelled {label!r}")

    def observe(self, ann: Dict, task: Dict, project: str) -> List[Dict]:
        """Field statistics: match the annotation's brush regions (as Label Studio holds them) to
        the suggestions served for its task before the annotation was created; a skipped
        annotation counts for nothing."""
        aid = ann.get("id")
        stats = self.engine.stats
        if ann.get("was_cancelled"):
            stats.forget(aid)
            return []
        regions = []
        for k, label, r in brush_regions(ann.get("result") or []):
            try:
                mask = region_shown_mask(r, self.engine.settings.max_pixels)  # bounded before decoding
            except (RequestError, ValueError) as e:
                log.warning("annotation %s region %s: not counted in the statistics (%s)", aid, r.get("id"), e)
                continue
            regions.append((str(r.get("id") or k), label, mask))
        lead = ann.get("lead_time")
        return stats.observe(project, task.get("id"), aid, regions,
                             lead_time=lead if isinstance(lead, (int, float)) and lead > 0 else None,
                             user=ann.get("completed_by"), created_at=timestamp(ann.get("created_at")))
