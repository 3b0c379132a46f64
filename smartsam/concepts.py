"""SAM 3's concept detector as a proposal source for "all like this one".

SAM 3 (``transformers.Sam3Model``) segments every instance of a concept given as a text or as
exemplar boxes on the image. :class:`Sam3ConceptProposer` runs it on the image the
:class:`~smartsam.backbones.hf_sam.Sam3Backbone` has encoded (the detector's neck on the kept
backbone output: no second encoder pass) and turns each detection into a click at its mask's most
interior pixel; :class:`~smartsam.instances.InstanceFinder` then runs the agent there, so each
instance's granularity is still resolved by the agent and kept only when the selector finds it
like the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from .masks import mask_box

PROPOSALS = ("similarity", "sam3")


def proposals_setting(value: Optional[str]) -> str:
    """Resolve ``SMARTSAM_PROPOSALS`` / ``--proposals``: "similarity" (DINOv2 / CLIP similarity
    peaks, default) or "sam3" (SAM 3's concept detector; needs the SAM 3 backbone)."""
    v = (value or "similarity").strip().lower()
    if v not in PROPOSALS:
        raise ValueError(f"SMARTSAM_PROPOSALS must be one of {', '.join(PROPOSALS)}, not {v!r}")
    return v


@dataclass
class Detection:
    """One instance SAM 3's detector found.

    Attributes:
        mask: ``(H, W)`` bool at image size.
        box: ``(x0, y0, x1, y1)`` image pixels.
        score: the detector's confidence (presence times query score).
        click: ``(x, y)`` its mask's most interior pixel (farthest from the boundary).
    """

    mask: np.ndarray
    box: Tuple[float, float, float, float]
    score: float
    click: Tuple[float, float]


def interior_point(mask: np.ndarray) -> Optional[Tuple[float, float]]:
    """``(x, y)`` of the pixel of ``mask`` farthest from its boundary (None for an empty mask)."""
    if not mask.any():
        return None
    d = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(x), float(y)


class Sam3ConceptProposer:
    """Detections of a concept on the backbone's current image.

    Args:
        backbone: a :class:`~smartsam.backbones.hf_sam.Sam3Backbone` built with its detector
            (``load_backbone("sam3", concepts=True)``).
        tokenizer: SAM 3's text tokenizer (CLIP BPE); box-only prompts are the text "visual", as
            ``Sam3Processor`` sends them.
        score_threshold: detections below this confidence are dropped (``Sam3Processor``'s
            post-processing default, 0.3).
        mask_threshold: probability above which a pixel is in a detection's mask.
        max_detections: at most this many, best first.
    """

    def __init__(self, backbone, tokenizer, score_threshold: float = 0.3, mask_threshold: float = 0.5,
                 max_detections: int = 50) -> None:
        if getattr(backbone, "detector", None) is None:
            raise ValueError("SAM 3 concept proposals need the SAM 3 backbone built with its detector (concepts=True)")
        from transformers import Sam3ImageProcessor

        self.backbone = backbone
        self.tokenizer = tokenizer
        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self.max_detections = int(max_detections)
        self.post = Sam3ImageProcessor()
        self.detector_calls = 0

    @torch.inference_mode()
    def detect(self, boxes: Sequence[Tuple[float, float, float, float]] = (), text: Optional[str] = None,
               image: Optional[np.ndarray] = None) -> List[Detection]:
        """Every instance of the concept on the backbone's current image, best first.

        Args:
            boxes: exemplar boxes ``(x0, y0, x1, y1)`` in image pixels on this image.
            text: the concept as a noun phrase (a text reference); with boxes too, both count.
            image: unused (the detector reads the backbone's encoding of the current image).
        """
        bb = self.backbone
        hidden = bb.backbone_output
        if hidden is None:
            raise RuntimeError("call set_image() on the SAM 3 backbone first")
        if not boxes and not text:
            raise ValueError("a concept prompt needs exemplar boxes or a text")
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        det = bb.detector
        h, w = bb.image_hw
        side = int(round(hidden.shape[1] ** 0.5))
        with bb.lock:  # in float32: torchvision's roi_align in the box encoder refuses mixed dtypes under autocast
            spatial = hidden.view(1, side, side, -1).permute(0, 3, 1, 2)
            fpn, pos = det.vision_encoder.neck(spatial)
            vision = Sam3VisionEncoderOutput(last_hidden_state=hidden, fpn_hidden_states=fpn, fpn_position_encoding=pos)
            tok = self.tokenizer([text or "visual"], padding="max_length", max_length=32, truncation=True, return_tensors="pt")
            kw = {}
            if boxes:
                b = np.asarray(boxes, np.float32).reshape(-1, 4)
                cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                                   (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)
                kw["input_boxes"] = torch.as_tensor(np.clip(cxcywh, 0, 1)[None], device=bb.device)
                kw["input_boxes_labels"] = torch.ones(1, len(b), dtype=torch.long, device=bb.device)
            out = det(vision_embeds=vision, input_ids=tok["input_ids"].to(bb.device),
                      attention_mask=tok["attention_mask"].to(bb.device), **kw)
        self.detector_calls += 1
        for k in ("pred_logits", "pred_masks", "pred_boxes", "presence_logits"):
            if getattr(out, k, None) is not None:
                setattr(out, k, getattr(out, k).float())
        res = self.post.post_process_instance_segmentation(out, threshold=self.score_threshold,
                                                           mask_threshold=self.mask_threshold, target_sizes=[(h, w)])[0]
        found: List[Detection] = []
        order = torch.argsort(res["scores"], descending=True).tolist()
        for i in order[: self.max_detections]:
            m = res["masks"][i].cpu().numpy().astype(bool)
            p = interior_point(m)
            if p is None:
                continue
            found.append(Detection(m, mask_box(m), float(res["scores"][i]), p))
        return found


class ColourConcepts:
    """A deterministic stand-in for SAM 3's detector in tests (registry "disk-test" backbones): a
    concept is the colour at its exemplar boxes' centres, and its instances are the connected
    regions of that colour (within ``tolerance`` per channel), largest first. Not a model."""

    def __init__(self, tolerance: int = 12, min_area: int = 20) -> None:
        self.tolerance = int(tolerance)
        self.min_area = int(min_area)
        self.detector_calls = 0

    def detect(self, boxes: Sequence[Tuple[float, float, float, float]] = (), text: Optional[str] = None,
               image: Optional[np.ndarray] = None) -> List[Detection]:
        if image is None or not boxes:
            return []
        self.detector_calls += 1
        h, w = image.shape[:2]
        found: List[Detection] = []
        for x0, y0, x1, y1 in boxes:
            c = image[min(int((y0 + y1) / 2), h - 1), min(int((x0 + x1) / 2), w - 1)].astype(int)
            same = (np.abs(image.astype(int) - c) <= self.tolerance).all(axis=2).astype(np.uint8)
            n, labels, stats, _ = cv2.connectedComponentsWithStats(same, connectivity=8)
            for k in np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1:
                if stats[k, cv2.CC_STAT_AREA] < self.min_area:
                    break
                m = labels == k
                if any((m & d.mask).any() for d in found):
                    continue
                found.append(Detection(m, mask_box(m), 1.0, interior_point(m)))
        return found
