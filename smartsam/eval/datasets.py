"""Interactive-segmentation benchmarks in the RITM layout (GrabCut, COCO_MVal): ``img/`` + ``gt/``.

Ground-truth rules, per file (``read_gt``): 0/255 masks (object >= 128) and 0/1 masks (object = 1);
palette PNGs (index 0 background, 255 the VOC "void" border, which counts for nothing, any other
index the object); 16-bit or 32-bit instance-id PNGs (nonzero = the object, as RITM's DAVIS loader
does). Only GrabCut marks an uncertain band along the boundary with 128 (RITM ignores it for
GrabCut alone): there those pixels count for neither object nor background (left out of every
IoU, never clicked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..io import load_image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG", ".BMP")


@dataclass(frozen=True)
class Sample:
    """One instance: its name, image, ground-truth mask file and category ("" when unknown).

    Attributes:
        area_path: the click-area mask of the ``area`` first-click protocol (``area/<name>.png``:
            Amb-Occ's smaller occluding object), when the dataset has one.
        ann_ids: for a COCO-style dataset (PartImageNet), the annotations whose union is the
            target (``gt_path`` is then the annotation file).
    """

    name: str
    image_path: Path
    gt_path: Path
    category: str
    area_path: Optional[Path] = None
    ann_ids: Tuple[int, ...] = ()

    @property
    def dataset(self) -> str:
        """The dataset folder's name (``.../GrabCut/gt/x.bmp`` -> ``GrabCut``)."""
        return self.gt_path.parent.parent.name


def category_of(name: str) -> str:
    """COCO_MVal's category: the file name without its instance digits and COCO id.

    ``"airplane00_000000281693"`` -> ``"airplane"``; ``"hair drier01_000000123"`` -> ``"hair drier"``.
    """
    m = re.match(r"^(.*?)(\d+)_(\d+)$", name)
    return m.group(1) if m else ""


def load_dataset(root: Path) -> List[Sample]:
    """List the samples under ``root`` (``img/<name>.<ext>`` with ``gt/<name>.<png|bmp>``, and
    ``area/<name>.png`` where the dataset has click areas), sorted.

    DAVIS in the RITM layout reads as it is: its instance-id / palette masks count every nonzero
    id as the object, so all instances of an image are one target (as FocSAM evaluates it).
    """
    root = Path(root)
    img_dir, gt_dir, area_dir = root / "img", root / "gt", root / "area"
    if not img_dir.is_dir() or not gt_dir.is_dir():
        raise FileNotFoundError(f"{root} is not a dataset: it needs img/ and gt/ folders (see the datasets README)")
    images: Dict[str, Path] = {}
    for p in img_dir.iterdir():
        if p.suffix in IMAGE_EXTS:
            images[p.stem] = p
    samples = []
    for gt in sorted(gt_dir.iterdir()):
        if gt.suffix.lower() not in (".png", ".bmp"):
            continue
        name = gt.stem
        img = images.get(name)
        if img is None:
            # COCO_MVal: several instances (gt names) share one image only when named alike.
            continue
        area = area_dir / f"{name}.png"
        samples.append(Sample(name, img, gt, category_of(name), area if area.is_file() else None))
    if not samples:
        raise FileNotFoundError(f"no image/ground-truth pairs found under {root}")
    return samples


def read_gt(path: Path, band_128: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(object (H, W) bool, ignore (H, W) bool or None)`` from a ground-truth file (rules above).

    Args:
        band_128: the value 128 marks pixels to ignore (GrabCut's boundary band).
    """
    img = Image.open(path)
    if img.mode == "P":
        a = np.asarray(img)
        ignore = a == 255
        return (a > 0) & ~ignore, (ignore if ignore.any() else None)
    a = np.asarray(img)
    if a.ndim == 3:
        a = a[..., 0]
    if a.dtype != np.uint8 or img.mode in ("I", "I;16", "I;16B", "I;16L"):
        return a > 0, None  # instance ids
    if band_128:
        ignore = a == 128
        return a > 128, (ignore if ignore.any() else None)
    if a.max(initial=0) <= 1:
        return a == 1, None  # a 0/1 mask
    return a >= 128, None


def load_gt(sample: Sample) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The sample's ground truth: 128 is ignored for GrabCut only, as in RITM."""
    return read_gt(sample.gt_path, band_128=sample.dataset.lower() == "grabcut")


def load_sample(sample: Sample) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """``(image (H, W, 3) uint8, object mask, ignore mask)`` with matching sizes."""
    image = load_image(sample.image_path)
    gt, ignore = load_gt(sample)
    if gt.shape != image.shape[:2]:
        raise ValueError(f"{sample.name}: ground truth {gt.shape} does not match image {image.shape[:2]}")
    return image, gt, ignore


def reference_for(sample: Sample, samples: List[Sample]) -> Optional[Sample]:
    """A deterministic reference instance for ``sample``: the next instance of the same category
    (in sorted name order, wrapping around), preferring one from a different image; None when the
    category has no other instance or the dataset has no categories."""
    refs = references_for(sample, samples, 1)
    return refs[0] if refs else None


def references_for(sample: Sample, samples: List[Sample], k: int) -> List[Sample]:
    """The next ``k`` instances of ``sample``'s category (sorted name order, wrapping around),
    those from other images first; fewer when the category has fewer other instances."""
    if not sample.category:
        return []
    same = [s for s in samples if s.category == sample.category and s.name != sample.name]
    coco_id = sample.name.rsplit("_", 1)[-1]
    other_image = [s for s in same if s.name.rsplit("_", 1)[-1] != coco_id]
    same_image = [s for s in same if s.name.rsplit("_", 1)[-1] == coco_id]

    def wrapped(xs: List[Sample]) -> List[Sample]:
        return [s for s in xs if s.name > sample.name] + [s for s in xs if s.name < sample.name]

    return (wrapped(other_image) + wrapped(same_image))[: max(0, int(k))]


def load_area(sample: Sample) -> Optional[np.ndarray]:
    """The sample's click-area mask (``(H, W)`` bool, nonzero = the area), or None."""
    if sample.area_path is None:
        return None
    a = np.asarray(Image.open(sample.area_path))
    return (a[..., 0] if a.ndim == 3 else a) > 0
