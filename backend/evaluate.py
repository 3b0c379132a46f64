"""Evaluate on a project's own annotations: ``smartsam eval``'s protocol with Label Studio as the dataset.

    python -m backend.evaluate --project 12 --mode pure-is --out runs/p12
    smartsam-evaluate --project 12 --mode reference --exemplars 3 --out runs/p12

Each task's submitted annotation (the one marked ground truth, else the newest not skipped) is
the ground truth: every brush region is one object (its label is its category, so reference mode
takes the next instance of the same label from another task as the reference, like COCO_MVal's
categories). Images come through the backend's fetcher (the same URL rules, storage resolver and
limits as a click). The click simulator, metrics and outputs (``<mode>.csv``, ``<mode>.json``,
``miou_vs_clicks.png``, the printed table) are ``smartsam eval``'s own, so on the same images and
masks, with the same segmenter and seed, the numbers are the same (tested).

Needs ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (a user who can read the project).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class ProjectSample:
    """One object of a project: a brush region of a task's ground-truth annotation."""

    name: str  # "<label><k>_<task>": the harness's naming (category, instance, image)
    category: str
    task: int
    region: int  # index of the region in the annotation's result


def image_key(label_config: str) -> str:
    """The task data key of the image the BrushLabels paint on (``$image`` -> ``image``)."""
    root = ET.fromstring(label_config)
    brush = next((t for t in root.iter("BrushLabels")), None)
    if brush is None:
        raise ValueError("the project's labeling config has no BrushLabels: nothing to evaluate against")
    img = next((t for t in root.iter("Image") if t.get("name") == brush.get("toName")), None)
    if img is None or not (img.get("value") or "").startswith("$"):
        raise ValueError("the BrushLabels' image takes no $value from the task data")
    return img.get("value")[1:]


def ground_truth(task: Dict) -> Optional[Dict]:
    """The task's ground-truth annotation: marked ``ground_truth``, else the newest not skipped."""
    anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not anns:
        return None
    marked = [a for a in anns if a.get("ground_truth")]
    return max(marked or anns, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


class ProjectDataset:
    """A project's tasks and ground truth, read through the backend's fetcher (the current image kept)."""

    def __init__(self, fetcher, project: int) -> None:
        self.fetcher = fetcher
        self.project = int(project)
        self.info = fetcher.get_json(f"/api/projects/{self.project}")
        self.key = image_key(self.info.get("label_config") or "")
        self.tasks: Dict[int, Dict] = {}
        self._images: Dict[int, np.ndarray] = {}

    def samples(self) -> List[ProjectSample]:
        from .model import brush_regions

        out: List[ProjectSample] = []
        for tid in self._task_ids():
            task = self.fetcher.get_json(f"/api/tasks/{tid}")
            ann = ground_truth(task)
            if ann is None:
                continue
            self.tasks[tid] = dict(task, _gt=ann)
            counts: Dict[str, int] = {}
            for k, label, _ in brush_regions(ann.get("result") or []):
                n = counts[label] = counts.get(label, -1) + 1
                out.append(ProjectSample(f"{label}{n:02d}_{tid}", label, tid, k))
        return out

    def _task_ids(self) -> List[int]:
        from .images import ImageFetchError

        ids, page = [], 1
        while True:
            try:
                d = self.fetcher.get_json(f"/api/tasks?project={self.project}&page={page}&page_size=100")
            except ImageFetchError as e:
                if e.status == 404 and page > 1:  # past the last page
                    break
                raise
            items = d.get("tasks", []) if isinstance(d, dict) else d
            ids += [int(t["id"]) for t in items]
            if len(items) < 100:
                break
            page += 1
        return sorted(ids)

    def load(self, s: ProjectSample) -> Tuple[np.ndarray, np.ndarray, None]:
        """``(image, ground-truth mask, None)`` like :func:`smartsam.eval.datasets.load_sample`."""
        from .model import brush_mask

        task = self.tasks[s.task]
        if s.task not in self._images:
            ref = (task.get("data") or {}).get(self.key)
            if not isinstance(ref, str):
                raise ValueError(f"task {s.task} has no image in data.{self.key}")
            self._images = {s.task: self.fetcher.fetch(ref, task_id=s.task)}  # one image at a time in memory
        image = self._images[s.task]
        region = task["_gt"]["result"][s.region]
        return image, brush_mask(region, image.shape[:2]), None


def build_parser() -> argparse.ArgumentParser:
    from smartsam.eval.cli import add_eval_parser

    ap = argparse.ArgumentParser(prog="python -m backend.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    add_eval_parser(sub)  # the same options as smartsam eval
    e = sub.choices["eval"]
    for a in e._actions:
        if a.dest == "dataset":
            a.required, a.help = False, argparse.SUPPRESS
    e.add_argument("--project", type=int, required=True, help="Label Studio project id")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    from smartsam.cli import UsageError
    from smartsam.eval.cli import run_eval
    from smartsam.models import ModelError

    from .config import Settings, SettingsError
    from .images import ImageFetcher, ImageFetchError

    args = build_parser().parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        s = Settings()
    except (SettingsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (s.label_studio_url and s.label_studio_api_key):
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a user who can read the project)", file=sys.stderr)
        return 2
    try:
        ds = ProjectDataset(ImageFetcher(s), args.project)
        samples = ds.samples()
        if not samples:
            raise UsageError(f"project {args.project} has no submitted brush annotation to evaluate against")
        return run_eval(args, samples, f"project-{args.project}", ds.load)
    except (UsageError, ImageFetchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
