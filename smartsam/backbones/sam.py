"""Adapter for Segment Anything (``segment-anything``): ViT-B/L/H, and small random configs."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..masks import LowResFrame
from .base import Backbone, Prompt
from .compiled import attach_shared_decoders


def build_sam_model(arch: str, checkpoint: Optional[str] = None):
    """Build a ``segment_anything.modeling.Sam``.

    Args:
        arch: "vit_b", "vit_l", "vit_h" (the released architectures) or "vit_tiny" (a small
            ViT of the same design, 2 blocks of width 192, for tests and offline demos only).
        checkpoint: path of a state dict; None leaves the weights random.
    """
    import importlib

    # The package re-exports a function named build_sam that shadows the module.
    bs = importlib.import_module("segment_anything.build_sam")

    if arch == "vit_tiny":
        sam = bs._build_sam(
            encoder_embed_dim=192,
            encoder_depth=2,
            encoder_num_heads=3,
            encoder_global_attn_indexes=[1],
            checkpoint=None,
        )
    else:
        sam = bs.sam_model_registry[arch](checkpoint=None)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        sam.load_state_dict(state)
    return sam


class SamBackbone(Backbone):
    """SAM (ViT image encoder, two-way transformer decoder) behind :class:`Backbone`.

    Args:
        model: a built ``segment_anything.modeling.Sam``.
        name: registry name shown in results.
        cache_size, device, cpu_bf16: see :class:`Backbone`.
        shared_decoder: "on" (default): prompts decode through
            :class:`~smartsam.backbones.shared_decoder.SharedDecoder` (the work every prompt on
            an image shares done once per image); "off": ``segment_anything``'s own module.
        compile: ``SMARTSAM_COMPILE``: the shared decoder's step through ``torch.compile``
            (:mod:`smartsam.backbones.compiled`): "auto" (where measured faster), "on", "off".
    """

    literal_within_target_on_cpu = True  # the literal agent measured 2.4 s per cached click, ViT-B (2 CPU cores, bf16, README "Results")

    def __init__(self, model, name: str = "sam", cache_size: int = 8, device: Optional[str] = None,
                 cpu_bf16: Union[str, bool] = "auto", shared_decoder: Union[str, bool] = "on", compile: Union[str, bool] = "auto") -> None:
        super().__init__(name, cache_size, device, cpu_bf16=cpu_bf16)
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model.to(self.device).eval()
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        self._state: Optional[Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]] = None
        attach_shared_decoders(self, self.model.prompt_encoder, self.model.mask_decoder, shared_decoder, compile)

    @torch.inference_mode()
    def _encode(self, image: np.ndarray) -> Any:
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        input_size = tuple(x.shape[-2:])
        with self._autocast():
            features = self.model.image_encoder(self.model.preprocess(x))
        return features.float(), input_size, tuple(image.shape[:2])

    def _activate(self, state: Any, image_hw: Tuple[int, int]) -> None:
        self._state = state

    def _frame(self, image_hw: Tuple[int, int]) -> LowResFrame:
        _, (ih, iw), _ = self._state
        h, w = image_hw
        valid = (int(np.ceil(ih / 4)), int(np.ceil(iw / 4)))
        return LowResFrame(image_hw=(h, w), valid_hw=valid, scale_xy=(4.0 * w / iw, 4.0 * h / ih))

    def _decode(self, prompts: Sequence[Prompt], multimask: bool):
        features, input_size, original_size = self._state
        coords, labels = self._padded_points(prompts)
        points = None
        if (labels >= 0).any():
            c = self.transform.apply_coords(coords, original_size)
            points = (
                torch.as_tensor(c, dtype=torch.float32, device=self.device),
                torch.as_tensor(labels, dtype=torch.int64, device=self.device),
            )
        boxes = None
        if prompts[0].box is not None:
            b = self.transform.apply_boxes(np.stack([p.box for p in prompts]), original_size)
            boxes = torch.as_tensor(b, dtype=torch.float32, device=self.device)
        masks = None
        if prompts[0].mask_input is not None:
            masks = self._mask_batch(prompts)
        if self.shared_decoder:
            share = self.shared.share(self._current, self.compute_dtype, lambda: (features, None), self._cache)
            return self.shared.decoder(self.compute_dtype)(share, *(points or (None, None)), masks, multimask, boxes)
        with self._autocast():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return low_res, iou

    def _upsample(self, low_res: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
        _, input_size, original_size = self._state
        return self.model.postprocess_masks(low_res, input_size, original_size)
