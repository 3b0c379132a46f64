"""Adapter for SAM 2.1 (``sam2``): hiera tiny / small / base+ / large image predictor."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..masks import LowResFrame
from .base import Backbone, Prompt
from .compiled import attach_shared_decoders
from .shared_decoder import ImageShare

SAM2_CONFIGS = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def build_sam2_model(arch: str, checkpoint: Optional[str] = None, device: str = "cpu"):
    """Build a ``sam2`` model from its packaged SAM 2.1 config; random weights without checkpoint."""
    from sam2.build_sam import build_sam2

    if arch not in SAM2_CONFIGS:
        raise ValueError(f"unknown SAM 2.1 architecture {arch!r}; known: {sorted(SAM2_CONFIGS)}")
    return build_sam2(SAM2_CONFIGS[arch], checkpoint, device=device, mode="eval")


class Sam2Backbone(Backbone):
    """SAM 2.1 (Hiera encoder with high-resolution features) behind :class:`Backbone`.

    The encoder runs through ``SAM2ImagePredictor.set_image``; decoding calls the prompt encoder
    and mask decoder directly so that only low-resolution logits are produced (the predictor's own
    ``_predict`` upsamples every mask to image size, work SmartSAM throws away for all but one).
    With ``shared_decoder`` (``SMARTSAM_SHARED_DECODER``) the same decoder runs through
    :class:`~smartsam.backbones.shared_decoder.SharedDecoder`, which does the work every prompt
    on an image shares once; with ``compile`` (``SMARTSAM_COMPILE``, see
    :mod:`smartsam.backbones.compiled`) its step runs compiled.
    """

    literal_within_target_on_cpu = True  # the literal agent measured 1.5 s per cached click (2 CPU cores, bf16, README "Results")

    def __init__(self, model, name: str = "sam2", cache_size: int = 8, device: Optional[str] = None,
                 cpu_bf16: Union[str, bool] = "auto", shared_decoder: Union[str, bool] = "on", compile: Union[str, bool] = "auto",
                 batch_encode: Optional[bool] = None) -> None:
        super().__init__(name, cache_size, device, cpu_bf16=cpu_bf16)
        # new images arriving together in one encoder call: on CUDA (not yet measured there; a CPU
        # encodes a batch no faster than one by one), or as asked
        self.batch_encode = self.device.type == "cuda" if batch_encode is None else bool(batch_encode)
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.model = model.to(self.device).eval()
        self.predictor = SAM2ImagePredictor(self.model)
        attach_shared_decoders(self, self.model.sam_prompt_encoder, self.model.sam_mask_decoder, shared_decoder, compile)

    @torch.inference_mode()
    def _encode(self, image: np.ndarray) -> Any:
        with self._autocast():
            self.predictor.set_image(image)
        f = self.predictor._features
        return {"image_embed": f["image_embed"], "high_res_feats": list(f["high_res_feats"])}

    @torch.inference_mode()
    def _encode_batch(self, images):
        """Several images in one encoder call (``SAM2ImagePredictor.set_image_batch``), split into
        one state per image, shaped as :meth:`_encode` gives them."""
        with self._autocast():
            self.predictor.set_image_batch(list(images))
        self.predictor._is_batch = False  # decoding reads the states we hand back, one image each
        f = self.predictor._features
        return [{"image_embed": f["image_embed"][i:i + 1], "high_res_feats": [h[i:i + 1] for h in f["high_res_feats"]]}
                for i in range(len(images))]

    def _activate(self, state: Any, image_hw: Tuple[int, int]) -> None:
        self.predictor._features = state
        self.predictor._orig_hw = [tuple(image_hw)]
        self.predictor._is_image_set = True

    def _frame(self, image_hw: Tuple[int, int]) -> LowResFrame:
        # SAM 2 resizes the image to a square without padding: the whole grid covers it.
        h, w = image_hw
        return LowResFrame(image_hw=(h, w), valid_hw=(256, 256), scale_xy=(w / 256.0, h / 256.0))

    @property
    def multi_image(self) -> bool:
        """The shared decoder takes rows of several images in one pass (their shares stacked)."""
        return self.shared_decoder

    def _prompt_tensors(self, prompts: Sequence[Prompt], hws: Sequence[Tuple[int, int]]):
        """Points (and boxes as two points labelled 2 and 3, as sam2 encodes them) normalised by
        each row's image size: ``(B, P, 2)`` coords, ``(B, P)`` int32 labels, mask inputs or None."""
        coords, labels = self._padded_points(prompts)
        # SAM2Transforms.transform_coords(normalize=True) per row: x / W, y / H, times the resolution
        wh = torch.as_tensor([[w, h] for h, w in hws], dtype=torch.float32, device=self.device)[:, None]
        res = self.predictor._transforms.resolution
        c = torch.as_tensor(coords, device=self.device) / wh * res
        lab = torch.as_tensor(labels, dtype=torch.int32, device=self.device)
        if prompts[0].box is not None:
            b = torch.as_tensor(np.stack([p.box for p in prompts]), device=self.device).reshape(-1, 2, 2) / wh * res
            box_labels = torch.tensor([[2, 3]], dtype=torch.int32, device=self.device).repeat(len(prompts), 1)
            if (labels >= 0).any():
                c = torch.cat([b, c], dim=1)
                lab = torch.cat([box_labels, lab], dim=1)
            else:
                c, lab = b, box_labels
        masks = self._mask_batch(prompts) if prompts[0].mask_input is not None else None
        return c, lab, masks

    def _decode(self, prompts: Sequence[Prompt], multimask: bool):
        c, lab, masks = self._prompt_tensors(prompts, [self.image_hw] * len(prompts))
        state = self.predictor._features
        if self.shared_decoder:
            low_res, iou = self.shared.decoder(self.compute_dtype)(self._share(self._current), c, lab, masks, multimask)
        else:
            low_res, iou = self._decode_library(state, c, lab, masks, multimask)
        # As SAM2ImagePredictor does: logits fed back as mask_input stay in a sane range.
        return torch.clamp(low_res, -32.0, 32.0), iou

    def _decode_multi(self, embeddings, prompts: Sequence[Prompt], multimask: bool):
        c, lab, masks = self._prompt_tensors(prompts, [e.image_hw for e in embeddings])
        shares = {}
        for e in embeddings:
            if e.key not in shares:
                shares[e.key] = self._share(e)
        rows = [shares[e.key] for e in embeddings]
        low_res, iou = self.shared.decoder(self.compute_dtype)(ImageShare.stack(rows), c, lab, masks, multimask)
        return torch.clamp(low_res, -32.0, 32.0), iou

    def _decode_library(self, state, c, lab, masks, multimask):
        with self._autocast():
            sparse, dense = self.model.sam_prompt_encoder(points=(c, lab), boxes=None, masks=masks)
            low_res, iou, _, _ = self.model.sam_mask_decoder(
                image_embeddings=state["image_embed"],
                image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=c.shape[0] > 1,
                high_res_features=state["high_res_feats"],
            )
        return low_res, iou

    def _share(self, emb) -> ImageShare:
        """The image's share for the shared decoder (bf16 exactly where the library path would
        autocast to it)."""
        return self.shared.share(emb, self.compute_dtype,
                                 lambda: (emb.state["image_embed"], emb.state["high_res_feats"]), self._cache)

    def _upsample(self, low_res: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
        return self.predictor._transforms.postprocess_masks(low_res, tuple(image_hw))
