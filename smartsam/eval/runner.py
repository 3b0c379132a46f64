"""Runs a segmenter over a dataset with the click simulator; writes CSV, JSON and a plot.

Per sample and trial: click, predict, measure IoU, click again, up to ``max_clicks`` (stopping
early once IoU >= ``stop_iou``, as NoC needs no more). Rows are appended to the CSV as they are
made, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..masks import batch_iou, mask_iou
from .clicker import Clicker
from .datasets import Sample, load_sample
from .metrics import summarize
from .segmenters import Segmenter

# winner: the first answer's winning candidate, ``<prompt kind>:<A|C per inner click>`` (agents only)
FIELDS = ["sample", "trial", "ious", "iou_best", "first_click_s", "clicks", "winner"]


def run_sample(seg: Segmenter, image: np.ndarray, gt: np.ndarray, ignore: Optional[np.ndarray], sample,
               max_clicks: int, stop_iou: float = 1.01, first_yx: Optional[Tuple[int, int]] = None) -> Dict[str, object]:
    """One sample: IoU after each click, IoU_best at click 1, time of the first click.

    Args:
        first_yx: the first click's ``(row, col)`` from a first-click protocol (default: the
            standard one, the object's middle).
    """
    seg.start(image, sample)
    clicker = Clicker(gt, ignore)
    pred = np.zeros_like(gt)
    ious: List[float] = []
    iou_best = None
    first_s = 0.0
    winner = None
    for k in range(max_clicks):
        if k == 0 and first_yx is not None:
            clicker.add_click(first_yx, True)
        else:
            clicker.make_next_click(pred)
        t = time.perf_counter()
        pred, cands = seg.click(clicker.points_xy, clicker.labels)
        if k == 0:
            first_s = time.perf_counter() - t
            winner = getattr(seg, "winner", None)
            if cands is not None and len(cands):
                keep = None if ignore is None else ~ignore
                if keep is None:
                    iou_best = float(batch_iou(cands, gt[None]).max())
                else:
                    iou_best = float(batch_iou(cands & keep, (gt & keep)[None]).max())
        ious.append(mask_iou(pred, gt, ignore))
        if ious[-1] >= stop_iou or ious[-1] == 1.0:  # 1.0: no error region left to click on
            break
    return {"ious": ious, "iou_best": iou_best, "first_click_s": first_s, "winner": winner,
            "clicks": [(c.coords[1], c.coords[0], int(c.is_positive)) for c in clicker.clicks]}


def _done_rows(csv_path: Path) -> Dict[tuple, dict]:
    rows = {}
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            for r in reader:
                rows[(r["sample"], int(r["trial"]))] = r
        if reader.fieldnames and reader.fieldnames != FIELDS:
            # an older file without a newer column: rewritten with today's header, rows kept
            with open(csv_path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                for r in rows.values():
                    w.writerow({k: r.get(k) or "" for k in FIELDS})
    return rows


def evaluate(samples: Sequence[Sample], make_segmenter: Callable[[int], Segmenter], out_dir: Path, mode: str,
             dataset: str, max_clicks: int = 20, trials: int = 1, stop_iou: float = 1.01, progress: bool = True,
             loader: Callable = load_sample, first_click: Optional[Callable] = None) -> Dict[str, object]:
    """Evaluate and write ``<mode>.csv``, ``<mode>.json`` and ``miou_vs_clicks.png`` in ``out_dir``.

    Args:
        make_segmenter: trial index -> segmenter (a new seed per trial).
        stop_iou: stop clicking a sample once reached (default never: the mIoU-per-click curve
            needs every click; 0.9 is enough for NoC@90 and much faster).
        loader: sample -> ``(image, ground truth, ignore mask or None)`` (default: files).
        first_click: ``(sample, image, gt, ignore, trial) -> (row, col)`` of the first click (a
            protocol of :mod:`smartsam.eval.first_click`); None is the standard one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{mode}.csv"
    done = _done_rows(csv_path)
    new_file = not csv_path.exists()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples) * trials, desc=f"{dataset} {mode}", unit="sample")
    seg_name, random_weights = None, False
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            w.writeheader()
        for trial in range(trials):
            seg = make_segmenter(trial)
            seg_name, random_weights = seg.name, seg.random_weights
            for s in samples:
                if (s.name, trial) not in done:
                    image, gt, ignore = loader(s)
                    first_yx = first_click(s, image, gt, ignore, trial) if first_click is not None else None
                    r = run_sample(seg, image, gt, ignore, s, max_clicks, stop_iou, first_yx)
                    row = {"sample": s.name, "trial": trial, "ious": " ".join(f"{v:.5f}" for v in r["ious"]),
                           "iou_best": "" if r["iou_best"] is None else f"{r['iou_best']:.5f}",
                           "first_click_s": f"{r['first_click_s']:.4f}",
                           "clicks": " ".join(f"{x},{y},{p}" for x, y, p in r["clicks"]),
                           "winner": r["winner"] or ""}
                    w.writerow(row)
                    f.flush()
                    done[(s.name, trial)] = row
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    names = {s.name for s in samples}
    summary = summarize_rows([r for (n, _), r in done.items() if n in names], max_clicks, trials)
    summary.update({"dataset": dataset, "mode": mode, "segmenter": seg_name, "random_weights": random_weights,
                    "max_clicks": max_clicks, "trials": trials})
    if random_weights:
        summary["note"] = "RANDOM weights: these numbers test the harness, not the method"
    (out_dir / f"{mode}.json").write_text(json.dumps(summary, indent=2))
    plot(out_dir)
    return summary


def summarize_rows(rows: List[dict], max_clicks: int, trials: int) -> Dict[str, object]:
    """Metrics per trial, then their mean and standard deviation across trials."""
    per_trial = []
    for t in range(trials):
        rs = [r for r in rows if int(r["trial"]) == t]
        if not rs:
            continue
        ious = [[float(v) for v in r["ious"].split()] for r in rs]
        best = [float(r["iou_best"]) if r["iou_best"] else None for r in rs]
        m = summarize(ious, max_clicks, best)
        m["sec_first_click"] = float(np.mean([float(r["first_click_s"]) for r in rs]))
        per_trial.append(m)
    keys = [k for k in per_trial[0] if k not in ("miou_per_click", "n")]
    out: Dict[str, object] = {"n": per_trial[0]["n"]}
    for k in keys:
        vals = [m[k] for m in per_trial if k in m]
        out[k] = float(np.mean(vals))
        out[k + "_std"] = float(np.std(vals))
    out["miou_per_click"] = np.mean([m["miou_per_click"] for m in per_trial], axis=0).tolist()
    winners = [r.get("winner") or "" for r in rows]
    if any(winners):
        out["actions"] = action_counts(winners)
    return out


def action_counts(winners: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """Table 7: which action produced each chosen mask (``<kind>:<A|C...>`` records, every trial):
    counts per action class, per number of inner interactions and per initial prompt kind."""
    from ..clickers import action_name

    out: Dict[str, Dict[str, int]] = {"action": {k: 0 for k in ("no action", "Add", "Cut", "Add&Cut")},
                                      "inner_clicks": {}, "prompt": {}}
    for w in winners:
        if not w:
            continue
        kind, _, acts = w.partition(":")
        out["action"][action_name([1 if a == "A" else 0 for a in acts])] += 1
        out["inner_clicks"][str(len(acts))] = out["inner_clicks"].get(str(len(acts)), 0) + 1
        out["prompt"][kind] = out["prompt"].get(kind, 0) + 1
    return out


def plot(out_dir: Path) -> Optional[Path]:
    """mIoU vs clicks for every mode summarised in ``out_dir``, side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums = []
    for p in sorted(Path(out_dir).glob("*.json")):
        try:
            s = json.loads(p.read_text())
        except ValueError:
            continue
        if "miou_per_click" in s:
            sums.append(s)
    if not sums:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in sums:
        y = s["miou_per_click"]
        label = f"{s['mode']} ({s.get('segmenter')})" + (" RANDOM weights" if s.get("random_weights") else "")
        ax.plot(range(1, len(y) + 1), y, marker="o", ms=3, label=label)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{sums[0].get('dataset')}: mIoU vs clicks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(out_dir) / "miou_vs_clicks.png"
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
