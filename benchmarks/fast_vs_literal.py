"""How often the fast path selects the same mask as the paper's literal path.

    python benchmarks/fast_vs_literal.py [--backbone NAME --checkpoint PATH] [--limit 10]

For the first N samples of each shared dataset, the first click goes where the standard protocol
puts it (the middle of the object); both paths run with the same seed; a sample "agrees" when the
chosen masks have IoU >= 0.95. Prints a table with agreement and seconds per click.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, table  # noqa: E402

from smartsam.agent import FAST_PATH_IOU, SmartSAMAgent  # noqa: E402
from smartsam.eval.clicker import Clicker  # noqa: E402
from smartsam.eval.datasets import load_dataset, load_sample  # noqa: E402
from smartsam.masks import mask_iou  # noqa: E402
from smartsam.models import load_backbone  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    ap.add_argument("--checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--datasets", nargs="+", default=[str(DATA / "GrabCut"), str(DATA / "COCO_MVal-dev")])
    ap.add_argument("--limit", type=int, default=10)
    args = ap.parse_args()
    bb = load_backbone(args.backbone, args.checkpoint, args.device)
    weights = "RANDOM weights: agreement here says nothing about real checkpoints" if bb.random_weights else (args.checkpoint or "registry checkpoint")
    arith = "bf16" if bb.compute_dtype == torch.bfloat16 else "fp32"
    dec = "shared decoder" if getattr(bb, "shared_decoder", False) else "library decoder"
    print(f"# fast path vs literal path: {bb.name} ({weights}) on {args.device}, {arith}, {dec}\nmachine: {machine()}\n")
    rows = []
    for ds in args.datasets:
        samples = load_dataset(Path(ds))[: args.limit]
        agree, ious, t_fast, t_lit = 0, [], [], []
        for s in samples:
            image, gt, ignore = load_sample(s)
            click = Clicker(gt, ignore).make_next_click(np.zeros_like(gt)).xy
            fast, literal = SmartSAMAgent(bb, dedupe_iou=FAST_PATH_IOU), SmartSAMAgent(bb, dedupe_iou=None)
            fast.set_image(image)
            literal.set_image(image)
            rf, rl = fast.predict(click), literal.predict(click)
            iou = mask_iou(rf.mask, rl.mask)
            ious.append(iou)
            agree += iou >= 0.95
            t_fast.append(rf.timings["total"])
            t_lit.append(rl.timings["total"])
        rows.append([Path(ds).name, len(samples), f"{100 * agree / len(samples):.0f}%", float(np.mean(ious)),
                     float(np.mean(t_lit)), float(np.mean(t_fast))])
    print(table(["dataset", "samples", "same mask (IoU >= 0.95)", "mean IoU fast vs literal", "literal s/click", "fast s/click"], rows))


if __name__ == "__main__":
    main()
