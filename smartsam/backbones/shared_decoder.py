"""SAM's and SAM 2's mask decoder for many prompts on one image, with the image's share done once.

``sam2.modeling.sam.mask_decoder.MaskDecoder`` (and ``segment_anything``'s, of the same design)
decodes a batch of prompts by copying the image embedding and its positional encoding once per
prompt and adding them again in every attention (``keys + key_pe`` twice per block). Most of that
work is the same for every prompt on an image:

* ``(keys + pe) @ W`` is ``keys @ W + pe @ W``; ``pe @ W`` (plus the bias) depends only on the
  weights, so it is computed once per model and the three projections a block makes of the image
  tokens (token-to-image keys and values, image-to-token queries) become one matrix product;
* for prompts without a ``mask_input`` the first block's image side is the same for all of them
  (image embedding + the "no mask" embedding): computed once per image;
* the image tokens stay in one ``(B, 4096, C)`` channels-last layout from the transformer through
  the upscaling convolutions (no per-prompt copies, one fused layer norm instead of five passes).

The arithmetic is the library modules' (``tests/test_agent.py`` checks equal outputs in fp32 for
SAM 2.1 and SAM); only the order of additions differs. ``benchmarks/latency.py`` measures it
against the module.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Container, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F


def shared_decoder_setting(value: Union[str, bool, None] = "on") -> bool:
    """Resolve ``SMARTSAM_SHARED_DECODER`` / ``--shared-decoder``: "on" (default) or "off" (the
    library's own mask decoder module), or a bool.

    Measured with ``benchmarks/latency.py`` (README "Results"): the literal agent's cached click
    1.51 s instead of 2.79 s on 2 CPU cores (bf16), 0.161 s instead of 0.185 s on an H100 (SAM 2.1
    large), same masks."""
    if isinstance(value, bool):
        return value
    v = (value or "on").strip().lower()
    if v not in ("on", "off"):
        raise ValueError(f"SMARTSAM_SHARED_DECODER must be on or off, not {v!r}")
    return v == "on"


@dataclass
class ImageShare:
    """What every prompt on one image shares.

    Attributes:
        keys_nomask: ``(N, C)`` image tokens of a prompt without mask input (N = 64 * 64).
        proj_nomask: ``(N, 3I)`` first block's image-side projections of ``keys_nomask``.
        tokens: ``(N, C)`` image embedding tokens (prompts with a mask input add theirs).
        proj_tokens: ``(N, 3I)`` first block's projections of ``tokens`` (+ pe terms and biases).
        feat_s0, feat_s1: SAM 2's high-resolution features, ``(1, C0, 256, 256)`` and
            ``(1, C1, 128, 128)``, channels-last; None for SAM.
    """

    keys_nomask: torch.Tensor
    proj_nomask: torch.Tensor
    tokens: torch.Tensor
    proj_tokens: torch.Tensor
    feat_s0: Optional[torch.Tensor] = None
    feat_s1: Optional[torch.Tensor] = None

    @staticmethod
    def stack(rows: List["ImageShare"]) -> "ImageShare":
        """One share per row (rows of several images in one pass): token fields become
        ``(B, N, ...)``, features ``(B, C, h, w)``; the decoder broadcasts either form."""
        tokens = (torch.stack([getattr(r, f) for r in rows]) for f in ("keys_nomask", "proj_nomask", "tokens", "proj_tokens"))
        if rows[0].feat_s0 is None:
            return ImageShare(*tokens)
        return ImageShare(*tokens, *(torch.cat([getattr(r, f) for r in rows]).contiguous(memory_format=torch.channels_last)
                                     for f in ("feat_s0", "feat_s1")))


class SharedDecoder:
    """Decode batches of prompts on one image with SAM's or SAM 2's prompt encoder and mask decoder.

    Args:
        prompt_encoder: the model's prompt encoder (``sam_prompt_encoder`` of SAM 2,
            ``prompt_encoder`` of SAM).
        mask_decoder: the model's mask decoder (SAM 2's with high-resolution features, or SAM's).
        dtype: compute dtype. ``torch.bfloat16`` runs on bf16 copies of the decoder and the mask
            embedding (no autocast, so no per-call weight casts); point and positional encodings
            stay float32 (bf16 would shift a point's sine features by up to ~0.1 rad).
    """

    def __init__(self, prompt_encoder, mask_decoder, dtype: torch.dtype = torch.float32) -> None:
        # SAM 2 built without its high-resolution features is a configuration no checkpoint uses
        self.high_res = bool(getattr(mask_decoder, "use_high_res_features", False))
        if hasattr(mask_decoder, "use_high_res_features") and not self.high_res:
            raise ValueError("SharedDecoder expects SAM 2's high-resolution features")
        self.prompt_encoder, self.dtype = prompt_encoder, dtype
        self.mask_downscaling, self.decoder = prompt_encoder.mask_downscaling, mask_decoder
        if dtype != torch.float32:
            self.mask_downscaling = copy.deepcopy(self.mask_downscaling).to(dtype)
            self.decoder = copy.deepcopy(mask_decoder).to(dtype)
        t = mask_decoder.transformer
        with torch.inference_mode():
            pe = prompt_encoder.get_dense_pe()  # (1, C, 64, 64)
            self.grid = tuple(pe.shape[-2:])
            pe_tok = pe.flatten(2)[0].t().float()  # (N, C)
            self.weights: List[torch.Tensor] = []  # per block: (C, 3I) transposed, fused
            self.pe_terms: List[torch.Tensor] = []  # per block: (N, 3I)
            for layer in t.layers:
                a, b = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
                self.weights.append(torch.cat([a.k_proj.weight, a.v_proj.weight, b.q_proj.weight]).t().contiguous().to(dtype))
                self.pe_terms.append(torch.cat([
                    pe_tok @ a.k_proj.weight.float().t() + a.k_proj.bias.float(),
                    a.v_proj.bias.float().expand(pe_tok.shape[0], -1),
                    pe_tok @ b.q_proj.weight.float().t() + b.q_proj.bias.float(),
                ], dim=1).to(dtype))
            f = t.final_attn_token_to_image
            self.final_weight = torch.cat([f.k_proj.weight, f.v_proj.weight]).t().contiguous().to(dtype)
            self.final_pe_term = torch.cat([
                pe_tok @ f.k_proj.weight.float().t() + f.k_proj.bias.float(),
                f.v_proj.bias.float().expand(pe_tok.shape[0], -1),
            ], dim=1).to(dtype)

    @torch.inference_mode()
    def share(self, image_embed: torch.Tensor, high_res_feats: Optional[List[torch.Tensor]] = None) -> ImageShare:
        """The per-image part: ``image_embed`` ``(1, C, 64, 64)``, ``high_res_feats`` as SAM 2
        gives them (None for SAM)."""
        tokens = image_embed.to(self.dtype).flatten(2)[0].t().contiguous()
        keys_nomask = tokens + self.prompt_encoder.no_mask_embed.weight.to(self.dtype).reshape(1, -1)
        feats = [] if not self.high_res else [x.to(self.dtype).contiguous(memory_format=torch.channels_last)
                                              for x in high_res_feats]
        return ImageShare(keys_nomask, keys_nomask @ self.weights[0] + self.pe_terms[0],
                          tokens, tokens @ self.weights[0] + self.pe_terms[0], *feats)

    @staticmethod
    def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """sam2's ``Attention.forward`` after its input projections."""
        q, k, v = (attn._separate_heads(x, attn.num_heads) for x in (q, k, v))
        return attn.out_proj(attn._recombine_heads(F.scaled_dot_product_attention(q, k, v)))

    @torch.inference_mode()
    def __call__(self, share: ImageShare, coords: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                 masks: Optional[torch.Tensor], multimask: bool,
                 boxes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts (:meth:`forward` without autograd)."""
        return self.forward(share, coords, labels, masks, multimask, boxes)

    def forward(self, share: ImageShare, coords: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                masks: Optional[torch.Tensor], multimask: bool,
                boxes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts (what :mod:`smartsam.backbones.compiled` compiles).

        Args:
            share: :meth:`share` of the image, or :meth:`ImageShare.stack` of one share per row.
            coords: ``(B, P, 2)`` points in the model input's frame, ``(x, y)``, as the prompt
                encoder takes them (SAM 2: boxes too, as two points with labels 2 and 3); None:
                no points.
            labels: ``(B, P)`` labels (1, 0, -1 padding; SAM 2: 2/3 box corners).
            masks: optional ``(B, 1, 256, 256)`` low-res logits fed back as mask input.
            multimask: SAM's 3 masks (True) or one, with SAM 2's fallback on unstable masks.
            boxes: ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in the model input's frame (SAM's
                prompt encoder); None: no box.

        Returns:
            ``(B, M, 256, 256)`` low-res logits and ``(B, M)`` IoU predictions, float32.
        """
        dec, t = self.decoder, self.decoder.transformer
        points = None if coords is None else (coords.float(), labels)
        sparse, _ = self.prompt_encoder(points=points, boxes=None if boxes is None else boxes.float(), masks=None)
        sparse = sparse.to(self.dtype)
        b, n = sparse.shape[0], share.tokens.shape[-2]
        # as MaskDecoder.predict_masks: output tokens, then the prompt's
        s = 1 if getattr(dec, "pred_obj_scores", False) else 0
        heads = [dec.obj_score_token.weight] if s else []
        out_tokens = torch.cat(heads + [dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        point_embedding = torch.cat((out_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)

        if masks is None:
            keys = share.keys_nomask.expand(b, -1, -1)
            proj = share.proj_nomask.expand(b, -1, -1)
        else:
            dense = self.mask_downscaling(masks.to(self.dtype))  # (B, C, 64, 64)
            dense = dense.permute(0, 2, 3, 1).reshape(b, n, -1)
            keys = share.tokens + dense
            proj = torch.matmul(dense, self.weights[0]).add_(share.proj_tokens)

        # TwoWayTransformer.forward with the image side projected once per block
        queries = point_embedding
        inner = t.layers[0].cross_attn_token_to_image.internal_dim
        for i, layer in enumerate(t.layers):
            if i > 0:
                proj = torch.matmul(keys, self.weights[i]).add_(self.pe_terms[i])
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + point_embedding
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            a = layer.cross_attn_token_to_image
            queries = layer.norm2(queries + self._attend(a, a.q_proj(queries + point_embedding),
                                                         proj[..., :inner], proj[..., inner:2 * inner]))
            queries = layer.norm3(queries + layer.mlp(queries))
            c = layer.cross_attn_image_to_token
            q = queries + point_embedding
            keys = layer.norm4(keys + self._attend(c, proj[..., 2 * inner:], c.k_proj(q), c.v_proj(queries)))
        f = t.final_attn_token_to_image
        proj = torch.matmul(keys, self.final_weight).add_(self.final_pe_term)
        fi = f.internal_dim
        queries = queries + self._attend(f, f.q_proj(queries + point_embedding), proj[..., :fi], proj[..., fi:])
        hs = t.norm_final_attn(queries)

        # upscaling, channels-last all the way (the tokens already are); SAM 2 adds its
        # high-resolution features on the way
        gh, gw = self.grid
        src = keys.reshape(b, gh, gw, -1).permute(0, 3, 1, 2)
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        x = dc1(src)
        x = (x + share.feat_s1 if self.high_res else x).permute(0, 2, 3, 1)
        x = act1(F.layer_norm(x, x.shape[-1:], ln1.weight, ln1.bias, ln1.eps)).permute(0, 3, 1, 2)
        up = dc2(x)
        up = act2(up + share.feat_s0 if self.high_res else up)  # (B, C0, 256, 256)
        mask_tokens = hs[:, s + 1: s + 1 + dec.num_mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        uh, uw = up.shape[-2:]
        flat = up.permute(0, 2, 3, 1).reshape(b, uh * uw, -1)  # a view when up is channels-last
        all_masks = torch.matmul(flat, hyper_in.transpose(1, 2)).transpose(1, 2).reshape(b, -1, uh, uw).float()
        iou = dec.iou_prediction_head(hs[:, s]).float()
        # MaskDecoder.forward's choice of outputs
        if multimask:
            return all_masks[:, 1:], iou[:, 1:]
        if getattr(dec, "dynamic_multimask_via_stability", False):
            return dec._dynamic_multimask_via_stability(all_masks, iou)
        return all_masks[:, :1], iou[:, :1]


class SharedDecoders:
    """A backbone's :class:`SharedDecoder` per compute dtype (built on first use) and the image
    shares it made, at most ``max_shares`` (16-32 MB each), none outliving its embedding (a share
    is kept with the embedding state it came from: an image encoded again under the same key gets
    a new one).

    Args:
        prompt_encoder, mask_decoder: as for :class:`SharedDecoder`.
        max_shares: shares kept (as many as embeddings, so a batch over many images does not
            recompute them).
        step: wraps a dtype's decoder in the step that is called instead, with the same
            arguments (:class:`~smartsam.backbones.compiled.CompiledDecoder`); None: the decoder
            itself. :attr:`compiled` switches between the two (each is kept: switching back and
            forth, as a benchmark's A B A B does, builds nothing again).
    """

    def __init__(self, prompt_encoder, mask_decoder, max_shares: int,
                 step: Optional[Callable[[SharedDecoder], Callable]] = None) -> None:
        self.prompt_encoder, self.mask_decoder, self.max_shares = prompt_encoder, mask_decoder, max(2, int(max_shares))
        self.step = step
        self.compiled = step is not None
        self._decoders: Dict[torch.dtype, SharedDecoder] = {}
        self._steps: Dict[torch.dtype, Callable] = {}
        self._shares: "OrderedDict[Tuple[str, torch.dtype], Tuple[object, ImageShare]]" = OrderedDict()

    def eager(self, dtype: torch.dtype) -> SharedDecoder:
        """The decoder for ``dtype`` itself."""
        dec = self._decoders.get(dtype)
        if dec is None:
            dec = self._decoders[dtype] = SharedDecoder(self.prompt_encoder, self.mask_decoder, dtype)
        return dec

    def decoder(self, dtype: torch.dtype) -> Callable:
        """What decodes ``dtype``: the step over the decoder while :attr:`compiled`, else the decoder."""
        dec = self.eager(dtype)
        if not self.compiled:
            return dec
        if self.step is None:
            raise ValueError("compiled without a step")
        st = self._steps.get(dtype)
        if st is None:
            st = self._steps[dtype] = self.step(dec)
        return st

    def share(self, emb, dtype: torch.dtype, features: Callable[[], tuple], live: Container[str]) -> ImageShare:
        """The share of the :class:`~smartsam.backbones.base.Embedding` ``emb`` (computed once per
        embedding and dtype from ``features()``: ``(image_embed, high_res_feats or None)``);
        shares of images whose keys are not in ``live`` are dropped."""
        for k in [k for k in self._shares if k[0] not in live]:
            del self._shares[k]
        key = emb.key
        entry = self._shares.get((key, dtype))
        if entry is None or entry[0] is not emb.state:
            entry = self._shares[key, dtype] = (emb.state, self.eager(dtype).share(*features()))
            while len(self._shares) > self.max_shares:
                self._shares.popitem(last=False)
        self._shares.move_to_end((key, dtype))
        return entry[1]
