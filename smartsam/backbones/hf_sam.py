"""Adapters for the segmenters ``transformers`` ships: SAM 3's tracker (``Sam3TrackerModel``) and
HQ-SAM (``SamHQModel``), behind :class:`~smartsam.backbones.base.Backbone`.

Both encode the image once (``get_image_embeddings``) and decode prompts against the cached
embedding. Prompts of one decoder call go in the model's *image* batch dimension (the embedding
expanded to B, one prompt each): transformers adds a dense mask prompt to the image embedding
before expanding over its point batch, so B different ``mask_input`` only decode correctly that
way.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..masks import LowResFrame
from .base import Backbone, Prompt
from .compiled import attach_shared_decoders
from .shared_decoder import HQSharedDecoder, Sam3SharedDecoder

# Small configurations of the real designs (tests only): width 64, 2 layers; everything after
# the image encoder (prompt encoder, mask decoder, detector heads) keeps its real size.
_TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


def sam_hq_config(arch: str):
    """``SamHQConfig`` of HQ-SAM ViT-B/L/H, or of "vit_tiny" (2 blocks of width 64, tests only)."""
    from transformers import SamHQConfig

    vit = {
        "vit_tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1]),
        "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
        "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
        "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    }
    if arch not in vit:
        raise ValueError(f"unknown HQ-SAM architecture {arch!r}; known: {sorted(vit)}")
    v = vit[arch]
    return SamHQConfig(vision_config=v, mask_decoder_config=dict(vit_dim=v["hidden_size"]))


def sam3_configs(arch: str):
    """``(Sam3TrackerConfig, Sam3Config)`` of SAM 3 ("sam3", the released sizes) or "tiny" (tests)."""
    from transformers import Sam3Config, Sam3TrackerConfig

    if arch not in ("sam3", "tiny"):
        raise ValueError(f"unknown SAM 3 architecture {arch!r}; known: ['sam3', 'tiny']")
    if arch == "sam3":
        return Sam3TrackerConfig(), Sam3Config()
    from .._tiny import tiny_clip_tokenizer

    _, n = tiny_clip_tokenizer()
    vision = dict(backbone_config=dict(_TINY_VIT, model_type="sam3_vit_model", global_attn_indexes=[1]))
    text = dict(_TINY_VIT, model_type="clip_text_model", projection_dim=64, vocab_size=n, max_position_embeddings=32,
                bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    return Sam3TrackerConfig(vision_config=vision), Sam3Config(vision_config=vision, text_config=text)


def build_sam_hq_model(arch: str, folder: Optional[str] = None):
    """A ``SamHQModel``: from a folder holding ``config.json`` and ``model.safetensors`` (the
    published transformers-format weights), else the architecture with random weights."""
    from transformers import SamHQModel

    if folder is not None:
        return SamHQModel.from_pretrained(folder)
    return SamHQModel(sam_hq_config(arch))


def build_sam3_models(arch: str, folder: Optional[str] = None, concepts: bool = False):
    """``(Sam3TrackerModel, Sam3Model or None)`` from the ``facebook/sam3`` folder (or random).

    With ``concepts`` the detector is built too and both share one vision backbone (the released
    model is one backbone under two necks), so memory holds the backbone once.
    """
    from transformers import Sam3Model, Sam3TrackerModel

    tcfg, dcfg = sam3_configs(arch)
    tracker = Sam3TrackerModel.from_pretrained(folder) if folder else Sam3TrackerModel(tcfg)
    detector = None
    if concepts:
        detector = Sam3Model.from_pretrained(folder) if folder else Sam3Model(dcfg)
        tracker.vision_encoder.backbone = detector.vision_encoder.backbone
    return tracker, detector


class _TransformersSam(Backbone):
    """What HQ-SAM and SAM 3 share: the image processor, cached embeddings, batched decoding."""

    grid = 256

    def __init__(self, model, name: str, cache_size: int, device: Optional[str], cpu_bf16: Union[str, bool],
                 processor) -> None:
        super().__init__(name, cache_size, device, cpu_bf16=cpu_bf16)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self._state: Any = None

    def _pixels(self, image: np.ndarray):
        out = self.processor(images=image, return_tensors="pt")
        return out["pixel_values"].to(self.device), out

    def _activate(self, state: Any, image_hw: Tuple[int, int]) -> None:
        self._state = state

    def _to_model(self, xy: np.ndarray) -> np.ndarray:  # pragma: no cover - per adapter
        raise NotImplementedError

    def _inputs(self, prompts: Sequence[Prompt]):
        """Points ``(B, 1, N, 2)`` / labels ``(B, 1, N)`` in the model's input frame (label -1 pads,
        as SAM's "not a point"), boxes ``(B, 1, 4)``, masks ``(B, 1, g, g)`` or None."""
        coords, labels = self._padded_points(prompts)
        points = lab = boxes = masks = None
        if (labels >= 0).any():
            c = self._to_model(coords.reshape(-1, 2)).reshape(coords.shape)
            points = torch.as_tensor(c[:, None], dtype=torch.float32, device=self.device)
            lab = torch.as_tensor(labels[:, None], dtype=torch.int64, device=self.device)
        if prompts[0].box is not None:
            b = self._to_model(np.stack([p.box for p in prompts]).reshape(-1, 2)).reshape(-1, 1, 4)
            boxes = torch.as_tensor(b, dtype=torch.float32, device=self.device)
        if points is None and boxes is None:
            # transformers' modules then decode no prompt at all, each its own way (HQ-SAM: no
            # prompt token; SAM 3: one "not a point"), and the shared decoder has no row count
            raise ValueError("prompts: each needs a point labelled 0 or 1, or a box")
        if prompts[0].mask_input is not None:
            masks = self._mask_batch(prompts)
        return points, lab, boxes, masks

    @staticmethod
    def _expand(t: torch.Tensor, b: int) -> torch.Tensor:
        return t.expand(b, *t.shape[1:])

    def _decode_shared(self, features, points, lab, boxes, masks, multimask: bool):
        """:meth:`_inputs`' prompts through the shared decoder; ``features()`` gives the image's
        share its inputs (see :meth:`SharedDecoders.share`)."""
        share = self.shared.share(self._current, self.compute_dtype, features, self._cache)
        return self.shared.decoder(self.compute_dtype)(
            share, None if points is None else points[:, 0], None if lab is None else lab[:, 0], masks, multimask,
            None if boxes is None else boxes[:, 0])


class SamHQBackbone(_TransformersSam):
    """HQ-SAM (SAM's ViT with an HQ output token fed by early ViT features) behind :class:`Backbone`.

    Its masks are the SAM mask plus the HQ mask (HQ-SAM's default, ``hq_token_only=False``); the
    image is resized to a longest side of 1024 and padded as SAM does, so the frame is SAM's.

    Args:
        model: a built ``transformers.SamHQModel``.
        name, cache_size, device, cpu_bf16: see :class:`Backbone`.
        shared_decoder: "on" (default): prompts decode through
            :class:`~smartsam.backbones.shared_decoder.HQSharedDecoder` (the image's share,
            HQ features included, once per image); "off": transformers' own module.
        compile: ``SMARTSAM_COMPILE`` for the shared decoder's step (as for SAM).
    """

    def __init__(self, model, name: str = "sam_hq", cache_size: int = 8, device: Optional[str] = None,
                 cpu_bf16: Union[str, bool] = "auto", shared_decoder: Union[str, bool] = "on",
                 compile: Union[str, bool] = "auto") -> None:
        from transformers import SamImageProcessor

        super().__init__(model, name, cache_size, device, cpu_bf16, SamImageProcessor())
        self.side = int(model.config.vision_config.image_size)
        attach_shared_decoders(self, self.model.prompt_encoder, self.model.mask_decoder, shared_decoder, compile,
                               HQSharedDecoder)

    @torch.inference_mode()
    def _encode(self, image: np.ndarray) -> Any:
        pixels, out = self._pixels(image)
        with self._autocast():
            emb, inter = self.model.get_image_embeddings(pixels)
        rh, rw = (int(v) for v in out["reshaped_input_sizes"][0])
        return emb.float(), [t.float() for t in inter], (rh, rw), tuple(image.shape[:2])

    def _to_model(self, xy: np.ndarray) -> np.ndarray:
        _, _, (rh, rw), (h, w) = self._state
        return xy * np.array([rw / w, rh / h], np.float32)

    def _frame(self, image_hw: Tuple[int, int]) -> LowResFrame:
        _, _, (rh, rw), _ = self._state
        h, w = image_hw
        s = self.side // 256
        return LowResFrame(image_hw=(h, w), valid_hw=(int(np.ceil(rh / s)), int(np.ceil(rw / s))),
                           scale_xy=(s * w / rw, s * h / rh))

    def _decode(self, prompts: Sequence[Prompt], multimask: bool):
        emb, inter, _, _ = self._state
        points, lab, boxes, masks = self._inputs(prompts)
        b = len(prompts)
        if self.shared_decoder:
            return self._decode_shared(lambda: (emb, inter), points, lab, boxes, masks, multimask)
        with self._autocast():
            out = self.model(image_embeddings=self._expand(emb, b), intermediate_embeddings=[self._expand(t, b) for t in inter],
                             input_points=points, input_labels=lab, input_boxes=boxes, input_masks=masks,
                             multimask_output=multimask)
        return out.pred_masks[:, 0], out.iou_scores[:, 0]

    def _upsample(self, low_res: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
        _, _, (rh, rw), _ = self._state
        x = F.interpolate(low_res.float(), (self.side, self.side), mode="bilinear", align_corners=False)
        return F.interpolate(x[..., :rh, :rw], tuple(image_hw), mode="bilinear", align_corners=False)


class Sam3Backbone(_TransformersSam):
    """SAM 3's interactive tracker (SAM 2-style point / box / mask prompts on SAM 3's Perception
    Encoder) behind :class:`Backbone`.

    The image is stretched to 1008 x 1008 (no padding: the whole grid covers it) and the decoder's
    low-resolution grid is 288 x 288, not SAM's 256. With a ``detector`` (``Sam3Model``, sharing
    the vision backbone) the backbone's output is kept with each embedding, so SAM 3's concept
    detector (:class:`~smartsam.concepts.Sam3ConceptProposer`) runs on the same encoding: still one
    encoder pass per image.

    Args:
        model: a built ``transformers.Sam3TrackerModel``.
        detector: optional ``transformers.Sam3Model`` whose vision backbone is ``model``'s.
        name, cache_size, device, cpu_bf16: see :class:`Backbone`.
        shared_decoder: "on" (default): prompts decode through
            :class:`~smartsam.backbones.shared_decoder.Sam3SharedDecoder` (the image's share once
            per image); "off": transformers' own module.
        compile: ``SMARTSAM_COMPILE`` for the shared decoder's step (as for SAM 2.1).
    """

    def __init__(self, model, name: str = "sam3", cache_size: int = 8, device: Optional[str] = None,
                 cpu_bf16: Union[str, bool] = "auto", detector=None, shared_decoder: Union[str, bool] = "on",
                 compile: Union[str, bool] = "auto") -> None:
        from transformers import Sam3ImageProcessor

        super().__init__(model, name, cache_size, device, cpu_bf16, Sam3ImageProcessor())
        self.side = int(model.config.prompt_encoder_config.image_size)
        self.grid = int(model.prompt_encoder.mask_input_size[0])
        attach_shared_decoders(self, self.model.prompt_encoder, self.model.mask_decoder, shared_decoder, compile,
                               partial(Sam3SharedDecoder, image_pe=self.model.shared_image_embedding))
        self.detector = detector.to(self.device).eval() if detector is not None else None
        if self.detector is not None and self.detector.vision_encoder.backbone is not self.model.vision_encoder.backbone:
            raise ValueError("the concept detector must share the tracker's vision backbone")
        self._backbone_out = None
        if self.detector is not None:  # keep the backbone's output of this encoding for the detector's neck
            self.model.vision_encoder.backbone.register_forward_hook(self._keep_backbone_output)

    def _keep_backbone_output(self, module, inputs, output) -> None:
        self._backbone_out = output.last_hidden_state

    @torch.inference_mode()
    def _encode(self, image: np.ndarray) -> Any:
        pixels, _ = self._pixels(image)
        self._backbone_out = None
        with self._autocast():
            emb = self.model.get_image_embeddings(pixels)
        hidden = self._backbone_out.float() if self._backbone_out is not None else None
        self._backbone_out = None
        return {"embeddings": [e.float() for e in emb], "backbone": hidden}

    @property
    def backbone_output(self) -> Optional[torch.Tensor]:
        """``(1, (side/14)^2, C)`` vision backbone output of the current image (with a detector)."""
        return self._state["backbone"] if self._state is not None else None

    def _to_model(self, xy: np.ndarray) -> np.ndarray:
        h, w = self.image_hw
        return xy * np.array([self.side / w, self.side / h], np.float32)

    def _frame(self, image_hw: Tuple[int, int]) -> LowResFrame:
        h, w = image_hw
        g = self.grid
        return LowResFrame(image_hw=(h, w), valid_hw=(g, g), scale_xy=(w / g, h / g), grid=g)

    def _decode(self, prompts: Sequence[Prompt], multimask: bool):
        emb = self._state["embeddings"]
        points, lab, boxes, masks = self._inputs(prompts)
        b = len(prompts)
        if self.shared_decoder:
            low_res, iou = self._decode_shared(lambda: (emb[-1], emb[:-1]), points, lab, boxes, masks, multimask)
        else:
            with self._autocast():
                out = self.model(image_embeddings=[self._expand(e, b) for e in emb], input_points=points,
                                 input_labels=lab, input_boxes=boxes, input_masks=masks, multimask_output=multimask)
            low_res, iou = out.pred_masks[:, 0], out.iou_scores[:, 0]
        # As SAM 2's predictor does: logits fed back as mask_input stay in a sane range.
        return torch.clamp(low_res, -32.0, 32.0), iou

    def _upsample(self, low_res: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
        return F.interpolate(low_res.float(), tuple(image_hw), mode="bilinear", align_corners=False)
