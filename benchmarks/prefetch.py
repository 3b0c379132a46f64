"""The next task's first click with and without prefetch, through a real Label Studio.

    python benchmarks/prefetch.py [--tasks 6] [--think 6] [--backbone sam2.1_hiera_small-random]

Starts Label Studio 1.23.2 (``.cache/ls-venv``, as the tests do) and, one after the other, the
backend as the README launches it with ``SMARTSAM_PREFETCH=0`` and with its default (2). Each
gets a project over the same GrabCut images (sequential sampling, Label Studio's default) and an
annotator who, task after task, clicks once (the first click on that image), works for
``--think`` seconds (at least an encoding's time), clicks elsewhere (a click on an encoded image,
not one answered before) and submits. Every click goes through Label Studio's ``interactive-annotating`` endpoint, timed
end to end. Prints the first clicks on the tasks after the first (the first task has nothing to
prefetch from), the later clicks, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table  # noqa: E402
from backend_helpers import Backend  # noqa: E402
from ls_helpers import TOKEN, LabelStudio, keypoint  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
# GrabCut images of one size (481 x 321), so one keypoint fits every task
IMAGES = ("153093", "209070", "21077", "24077", "271008", "326038", "37073", "65019", "69020", "86016")


def annotate(ls: LabelStudio, backend_url: str, title: str, n: int, think: float):
    pid, ml, tasks = ls.project(title, r".*(" + "|".join(IMAGES[:n]) + r")\.jpg", backend_url)
    first, later = [], []
    for k, t in enumerate(sorted(tasks, key=lambda t: t["id"])):
        for rounds, (x, y) in ((first, (50, 55)), (later, (35, 40))):  # a new point: no answer to reuse
            t0 = time.perf_counter()
            s, r = ls.api("POST", f"/api/ml/{ml}/interactive-annotating",
                          {"task": t["id"], "context": {"result": [keypoint(481, 321, x=x, y=y)]}})
            took = time.perf_counter() - t0
            if s != 200 or "errors" in r.get("data", {}):
                raise SystemExit(f"click on task {t['id']} failed: {s} {r}")
            if k > 0 or rounds is later:
                rounds.append(took)
            if rounds is first:
                time.sleep(think)  # the annotator looks at the suggestion, edits it
        assert ls.api("POST", f"/api/tasks/{t['id']}/annotations", {"result": [], "was_cancelled": False})[0] == 201
    return first, later


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=6, help=f"tasks per run (at most {len(IMAGES)})")
    ap.add_argument("--think", type=float, default=6.0, help="seconds the annotator works between two clicks")
    ap.add_argument("--backbone", default="sam2.1_hiera_small-random")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="smartsam-prefetch-bench-"))
    (tmp / "ls").mkdir()
    ls = LabelStudio(tmp / "ls", DATASETS)
    ls.documents = DATASETS
    rows = []
    try:
        for depth in ("0", "2"):
            b = Backend(tmp / f"data-{depth}", env={"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
                                                    "SMARTSAM_PREFETCH": depth}, backbone=args.backbone, run_sh=True).start()
            try:
                first, later = annotate(ls, b.url, f"prefetch {depth}", args.tasks, args.think)
                h = b.health()
            finally:
                b.stop()
            f50, l50 = statistics.median(first), statistics.median(later)
            rows.append([depth, len(first), f50, max(first), len(later), l50, f50 / l50,
                         h["prefetch"]["encoded"], h["encoder_calls"]])
    finally:
        ls.stop()
    print(f"machine: {machine()}; backbone {args.backbone}; {args.tasks} tasks; think {args.think:g} s; "
          f"through Label Studio 1.23.2")
    print(table(["SMARTSAM_PREFETCH", "next-task first clicks", "p50 s", "max s", "later clicks", "p50 s",
                 "first / later", "prefetched", "encoder calls"], rows))


if __name__ == "__main__":
    main()
