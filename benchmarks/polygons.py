"""Polygons faithful to the mask: every ground-truth mask of ../shared/datasets through the
backend's mask -> polygon conversion, as a polygon project's suggestion would be.

    python benchmarks/polygons.py [--parts all|largest] [--min-area 16]

Per dataset: masks, mean / min IoU of the polygons' rasterisation with the mask, the same with
the mask's holes filled (what the polygons aim at: Label Studio polygons have no holes), the
share of mask pixels that lie in holes, polygons per mask, points per polygon, and milliseconds
per conversion (contours + per-part tolerance search). GrabCut's 128 band (uncertain pixels) is
left out of its IoUs, as the evaluation protocol does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table  # noqa: E402

from backend.labelstudio.regions import PolygonOptions, mask_to_polygons, rasterize_polygons  # noqa: E402
from smartsam.eval.datasets import load_dataset, load_gt  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"


def iou(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    a, b = a & keep, b & keep
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled (every outer contour filled)."""
    import cv2

    out = np.zeros(mask.shape, np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", choices=["all", "largest"], default="all")
    ap.add_argument("--min-area", type=int, default=16)
    args = ap.parse_args()
    options = PolygonOptions(args.parts, args.min_area)
    rows = []
    for name in ("GrabCut", "COCO_MVal-dev"):
        ious, ious_filled, holes, n_polys, points, ms = [], [], [], [], [], []
        for s in load_dataset(DATA / name):
            gt, ignore = load_gt(s)[:2]
            mask = gt > 0
            keep = np.ones(mask.shape, bool) if ignore is None else ~ignore
            t = time.perf_counter()
            polys = mask_to_polygons(mask, options)
            ms.append((time.perf_counter() - t) * 1000)
            raster = rasterize_polygons(polys, mask.shape)
            full = filled(mask)
            ious.append(iou(raster, mask, keep))
            ious_filled.append(iou(raster, full, keep))
            holes.append(float((full & ~mask).sum() / max(full.sum(), 1)))
            n_polys.append(len(polys))
            points += [len(p) for p in polys]
        rows.append([name, len(ious), np.mean(ious), np.min(ious), np.mean(ious_filled), np.min(ious_filled),
                     f"{100 * np.mean(holes):.2f} %", np.mean(n_polys), np.mean(points), int(np.median(points)),
                     np.mean(ms), np.max(ms)])
    print(f"# mask -> polygon (parts={args.parts}, min area {args.min_area} px, target IoU {options.min_iou})\n"
          f"machine: {machine()}\n")
    print(table(["dataset", "masks", "IoU mean", "IoU min", "IoU vs holes filled, mean", "min", "hole pixels",
                 "polygons/mask", "points/polygon", "median points", "ms mean", "ms max"], rows))


if __name__ == "__main__":
    main()
