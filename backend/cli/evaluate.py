"""Evaluate on a project's own annotations: ``smartsam eval``'s protocol with Label Studio as the dataset.

    python -m backend.cli.evaluate --project 12 --mode pure-is --out runs/p12
    smartsam-evaluate --project 12 --mode reference --exemplars 3 --out runs/p12

Each task's submitted annotation (the one marked ground truth, else the newest not skipped) is
the ground truth: every region of its answer tag (brush, polygon or bitmask; the first of the
config's answer tags the annotation uses) is one object (its label is its category, so reference mode
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
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from backend.errors import RequestError
from backend.labelstudio.label_config import LabelConfig
from backend.labelstudio.regions import primary_regions, region_mask, region_shown_mask


@dataclass(frozen=True)
class ProjectSample:
    """One object of a project: an answer region of a task's ground-truth annotation."""

    name: str  # "<label><k>_<task>": the harness's naming (category, instance, image)
    category: str
    task: int
    region: int  # index of the region in the annotation's result


def ground_truth(task: Dict) -> Optional[Dict]:
    """The task's ground-truth annotation: marked ``ground_truth``, else the newest not skipped."""
    anns = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not anns:
        return None
    marked = [a for a in anns if a.get("ground_truth")]
    return max(marked or anns, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


class ProjectDataset:
    """A project's tasks and ground truth, read through the backend's Label Studio client (task
    lists that never make Label Studio predict) and its image fetcher (the current image kept).

    Args:
        client: a :class:`~backend.labelstudio.client.LabelStudioClient`.
        fetcher: the :class:`~backend.labelstudio.images.ImageFetcher` over that client.
        project: the project id.
    """

    def __init__(self, client, fetcher, project: int) -> None:
        self.client = client
        self.fetcher = fetcher
        self.project = int(project)
        self.info = client.project(self.project)
        # the project's image key and answer tags, by the backend's one parser (smart tools optional)
        self.cfg = LabelConfig.parse(self.info.get("label_config") or "", need_prompts=False)
        self.tasks: Dict[int, Dict] = {}
        self._images: Dict[int, np.ndarray] = {}

    def samples(self) -> List[ProjectSample]:
        out: List[ProjectSample] = []
        for task in sorted(self.client.tasks(self.project), key=lambda t: t.get("id") or 0):
            ann = ground_truth(task)
            if ann is None:
                continue
            tid = int(task["id"])
            self.tasks[tid] = dict(task, _gt=ann)
            counts: Dict[str, int] = {}
            for k, label, region in primary_regions(ann.get("result") or [], self.cfg):
                try:
                    region_shown_mask(region, self.fetcher.s.max_pixels)  # a region that cannot be read is no object
                except RequestError as e:
                    print(f"task {tid}: region {region.get('id') or k} left out ({e})", file=sys.stderr)
                    continue
                n = counts[label] = counts.get(label, -1) + 1
                out.append(ProjectSample(f"{label}{n:02d}_{tid}", label, tid, k))
        return out

    def load(self, s: ProjectSample) -> Tuple[np.ndarray, np.ndarray, None]:
        """``(image, ground-truth mask, None)`` like :func:`smartsam.eval.datasets.load_sample`."""
        task = self.tasks[s.task]
        if s.task not in self._images:
            ref = (task.get("data") or {}).get(self.cfg.image_key)
            if not isinstance(ref, str):
                raise ValueError(f"task {s.task} has no image in data.{self.cfg.image_key}")
            self._images = {s.task: self.fetcher.fetch(ref, task_id=s.task)}  # one image at a time in memory
        image = self._images[s.task]
        region = task["_gt"]["result"][s.region]
        return image, region_mask(region, image.shape[:2], self.fetcher.s.max_pixels), None


def match_instances(predicted: List[np.ndarray], truth: List[np.ndarray], min_iou: float = 0.5) -> List[Tuple[int, int, float]]:
    """Greedy one-to-one matching of predicted to ground-truth instance masks, best IoU first;
    pairs under ``min_iou`` are no match. Returns ``(predicted index, truth index, IoU)``."""
    pairs = []
    for i, p in enumerate(predicted):
        for j, t in enumerate(truth):
            if p.shape != t.shape:
                continue
            u = np.logical_or(p, t).sum()
            v = float(np.logical_and(p, t).sum() / u) if u else 0.0
            if v >= min_iou:
                pairs.append((v, i, j))
    used_p, used_t, out = set(), set(), []
    for v, i, j in sorted(pairs, reverse=True):
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            out.append((i, j, v))
    return out


def evaluate_instances(ds: "ProjectDataset") -> Dict:
    """A project's SmartSAM pre-labels (its newest ``smartsam-`` prediction per task) against its
    submitted annotations: instance precision, recall and the mean IoU of matched pairs (IoU >= 0.5)."""
    cap = ds.fetcher.s.max_pixels
    n_pred = n_true = 0
    ious: List[float] = []
    tasks = 0
    for task in sorted(ds.client.tasks(ds.project), key=lambda t: t.get("id") or 0):
        ann = ground_truth(task)
        preds = [p for p in task.get("predictions") or [] if str(p.get("model_version") or "").startswith("smartsam-")]
        if ann is None or not preds:
            continue
        pred = max(preds, key=lambda p: (str(p.get("created_at") or ""), p.get("id") or 0))

        def masks(result):
            out = []
            for _, label, r in primary_regions(result or [], ds.cfg):
                try:
                    out.append((label, region_shown_mask(r, cap)))
                except RequestError as e:
                    print(f"task {task.get('id')}: region {r.get('id')} left out ({e})", file=sys.stderr)
            return out

        p, t = masks(pred.get("result")), masks(ann.get("result"))
        tasks += 1
        n_pred += len(p)
        n_true += len(t)
        for label in {lb for lb, _ in p} | {lb for lb, _ in t}:
            ious += [v for _, _, v in match_instances([m for lb, m in p if lb == label], [m for lb, m in t if lb == label])]
    return {"mode": "instances", "tasks": tasks, "predicted": n_pred, "annotated": n_true, "matched": len(ious),
            "precision": round(len(ious) / n_pred, 4) if n_pred else None,
            "recall": round(len(ious) / n_true, 4) if n_true else None,
            "iou_matched": round(float(np.mean(ious)), 4) if ious else None}


def build_parser() -> argparse.ArgumentParser:
    from smartsam.eval.cli import add_eval_parser

    ap = argparse.ArgumentParser(prog="python -m backend.cli.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    add_eval_parser(sub)  # the same options as smartsam eval
    e = sub.choices["eval"]
    for a in e._actions:
        if a.dest == "dataset":
            a.required, a.help = False, argparse.SUPPRESS
    e.add_argument("--project", type=int, required=True, help="Label Studio project id")
    for a in e._actions:
        if a.dest == "mode":  # instances: the project's pre-labels against its annotations (no model run)
            a.choices = [*a.choices, "instances"]
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    from backend.config import Settings
    from backend.errors import ImageFetchError, SettingsError
    from backend.labelstudio.images import ImageFetcher
    from smartsam.cli_common import UsageError
    from smartsam.eval.cli import run_eval
    from smartsam.models import ModelError

    args = build_parser().parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        s = Settings.from_env()
    except (SettingsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (s.label_studio_url and s.label_studio_api_key):
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a user who can read the project)", file=sys.stderr)
        return 2
    try:
        fetcher = ImageFetcher(s)
        ds = ProjectDataset(fetcher.client, fetcher, args.project)
        if args.mode == "instances":
            import json
            from pathlib import Path

            out = evaluate_instances(ds)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "instances.json").write_text(json.dumps(out, indent=2))
            f = lambda v: "-" if v is None else str(v)  # noqa: E731
            print("| project | tasks | predicted | annotated | matched | precision | recall | IoU of matched |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            print(f"| {args.project} | {out['tasks']} | {out['predicted']} | {out['annotated']} | {out['matched']} | "
                  f"{f(out['precision'])} | {f(out['recall'])} | {f(out['iou_matched'])} |")
            return 0
        samples = ds.samples()
        if not samples:
            raise UsageError(f"project {args.project} has no submitted annotation with a mask to evaluate against")
        return run_eval(args, samples, f"project-{args.project}", ds.load)
    except (UsageError, ImageFetchError, RequestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
