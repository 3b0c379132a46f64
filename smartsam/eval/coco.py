"""COCO-style annotations: mask decoding, PartImageNet as a benchmark, and the Amb-Occ builder.

* :func:`decode` turns a COCO ``segmentation`` (polygons, uncompressed or compressed RLE) into
  a mask; pure NumPy / OpenCV, so no extra dependency.
* :func:`load_coco_objects`: every image of a COCO-style annotation file (PartImageNet's part
  annotations) becomes one sample whose target is the union of its annotations: the whole object.
* :func:`build_amb_occ`: the paper's Amb-Occ recipe (App. C) from COCO and LVIS annotations of
  the same images: a COCO instance whose mask contains a smaller LVIS instance's mask is the
  target, the LVIS mask the click area; densely clustered same-category instances are left out.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image

from .datasets import Sample


def _rle_counts(s: str) -> List[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' ``rleFrString``)."""
    counts: List[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode(segmentation, h: int, w: int) -> np.ndarray:
    """``(h, w)`` bool mask of a COCO segmentation: a list of polygons ``[x0, y0, x1, y1, ...]``, or
    an RLE dict (``counts`` a list, or COCO's compressed string; column-major, as COCO stores it)."""
    if isinstance(segmentation, list):
        m = np.zeros((h, w), np.uint8)
        polys = [np.asarray(p, np.float64).reshape(-1, 2) for p in segmentation if len(p) >= 6]
        if polys:
            cv2.fillPoly(m, [np.round(p).astype(np.int32) for p in polys], 1)
        return m > 0
    if isinstance(segmentation, dict) and "counts" in segmentation:
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = _rle_counts(counts)
        flat = np.zeros(h * w, bool)
        pos, val = 0, False
        for c in counts:
            if val:
                flat[pos:pos + c] = True
            pos += int(c)
            val = not val
        return flat.reshape(w, h).T
    raise ValueError(f"not a COCO segmentation: {type(segmentation).__name__}")


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable COCO-style annotation file ({e})") from None


def load_coco_objects(annotations: Path, images: Path) -> Tuple[List[Sample], Callable]:
    """PartImageNet-style data: ``(samples, loader)``, one sample per annotated image, its target
    the union of the image's annotations (the whole object). ``loader`` reads a sample as
    :func:`~smartsam.eval.datasets.load_sample` does."""
    from ..io import load_image

    data = _read(annotations)
    cats = {c["id"]: c for c in data.get("categories", [])}
    by_image: Dict[int, List[dict]] = defaultdict(list)
    for a in data.get("annotations", []):
        if not a.get("iscrowd"):
            by_image[a["image_id"]].append(a)
    samples, info = [], {}
    for im in sorted(data.get("images", []), key=lambda i: i["file_name"]):
        anns = by_image.get(im["id"])
        path = Path(images) / im["file_name"]
        if not anns or not path.is_file():
            continue
        cat = cats.get(anns[0]["category_id"], {})
        name = Path(im["file_name"]).stem
        samples.append(Sample(name, path, Path(annotations), cat.get("supercategory") or cat.get("name", ""),
                              ann_ids=tuple(a["id"] for a in anns)))
        info[name] = (im, anns)
    if not samples:
        raise FileNotFoundError(f"no annotated images of {annotations} found under {images}")

    def loader(sample: Sample):
        im, anns = info[sample.name]
        image = load_image(sample.image_path)
        h, w = image.shape[:2]
        gt = np.zeros((h, w), bool)
        for a in anns:
            gt |= decode(a["segmentation"], h, w)
        return image, gt, None

    return samples, loader


def _box_iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def build_amb_occ(coco_json: Path, lvis_json: Path, images: Path, out: Path, containment: float = 0.95,
                  max_area_ratio: float = 0.5, min_area: int = 32 * 32, cluster_iou: float = 0.0,
                  link: bool = True) -> Dict[str, object]:
    """Build Amb-Occ (paper App. C) in the RITM layout plus ``area/``; returns its statistics.

    A pair is a COCO instance (the target: one of COCO's 80 categories, not a crowd, at least
    ``min_area`` pixels) and an LVIS instance of the same image lying inside it (at least
    ``containment`` of the LVIS mask within the COCO mask: the two datasets' outlines differ by a
    few pixels, so "fully contains" is read with this tolerance) and smaller (its area at most
    ``max_area_ratio`` of the target's): the first click goes on the LVIS object, the target is
    the whole COCO object. Densely clustered instances are left out: a target whose box overlaps
    another instance of its category by more than ``cluster_iou`` (box IoU), or whose category is
    marked as a crowd in that image. Writes ``img/`` (links to the source images, copies where
    links are impossible), ``gt/`` and ``area/`` (0/255 PNGs) and ``stats.json``.
    """
    coco, lvis = _read(coco_json), _read(lvis_json)
    cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
    images_by_id = {im["id"]: im for im in coco.get("images", [])}
    coco_by_image: Dict[int, List[dict]] = defaultdict(list)
    for a in coco.get("annotations", []):
        coco_by_image[a["image_id"]].append(a)
    lvis_by_image: Dict[int, List[dict]] = defaultdict(list)
    for a in lvis.get("annotations", []):
        lvis_by_image[a["image_id"]].append(a)
    out = Path(out)
    for d in ("img", "gt", "area"):
        (out / d).mkdir(parents=True, exist_ok=True)
    pairs, used_images, used_cats = [], set(), set()
    filtered = {"crowd": 0, "clustered": 0, "small": 0}
    for image_id in sorted(coco_by_image):
        im = images_by_id.get(image_id)
        if im is None or image_id not in lvis_by_image:
            continue
        src = Path(images) / im["file_name"]
        if not src.is_file():
            continue
        h, w = int(im["height"]), int(im["width"])
        anns = coco_by_image[image_id]
        crowd_cats = {a["category_id"] for a in anns if a.get("iscrowd")}
        lvis_masks = None
        k = defaultdict(int)
        for t in sorted(anns, key=lambda a: a["id"]):
            if t.get("iscrowd") or t["category_id"] in crowd_cats:
                filtered["crowd"] += 1
                continue
            if t.get("area", 0) < min_area:
                filtered["small"] += 1
                continue
            if any(o is not t and o["category_id"] == t["category_id"] and _box_iou(o["bbox"], t["bbox"]) > cluster_iou
                   for o in anns):
                filtered["clustered"] += 1
                continue
            target = decode(t["segmentation"], h, w)
            ta = int(target.sum())
            if ta == 0:
                continue
            if lvis_masks is None:
                lvis_masks = [(a, decode(a["segmentation"], h, w)) for a in sorted(lvis_by_image[image_id], key=lambda a: a["id"])]
            for la, lm in lvis_masks:
                area = int(lm.sum())
                if area == 0 or area > max_area_ratio * ta:
                    continue
                if (lm & target).sum() < containment * area:
                    continue
                cat = cats.get(t["category_id"], str(t["category_id"]))
                name = f"{cat}{k[cat]:02d}_{image_id:012d}"
                k[cat] += 1
                dst = out / "img" / f"{name}{src.suffix.lower()}"
                if not dst.exists():
                    try:
                        if not link:
                            raise OSError
                        os.symlink(src.resolve(), dst)
                    except OSError:
                        shutil.copyfile(src, dst)
                Image.fromarray(target.astype(np.uint8) * 255).save(out / "gt" / f"{name}.png")
                Image.fromarray(lm.astype(np.uint8) * 255).save(out / "area" / f"{name}.png")
                pairs.append({"name": name, "coco_id": t["id"], "lvis_id": la["id"], "category": cat})
                used_images.add(image_id)
                used_cats.add(cat)
    stats = {"images": len(used_images), "pairs": len(pairs), "categories": len(used_cats), "filtered": filtered,
             "containment": containment, "max_area_ratio": max_area_ratio, "min_area": min_area,
             "cluster_iou": cluster_iou, "paper": {"images": 2744, "pairs": 4470, "categories": 80}, "list": pairs}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
