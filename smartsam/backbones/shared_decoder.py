"""SAM's, SAM 2's, HQ-SAM's and SAM 3's mask decoders for many prompts on one image, with the
image's share done once.

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

* HQ-SAM (``transformers``' ``SamHQMaskDecoder``, :class:`HQSharedDecoder`) also makes its HQ
  features (the image embedding and the first global-attention ViT block's output, upscaled to
  256 x 256) from the image alone: the module makes them again for every prompt of a batch; here
  once per image.

The arithmetic is the library modules' (``tests/test_agent.py`` checks equal outputs in fp32 for
SAM 2.1 and SAM; only the order of additions differs), and for HQ-SAM that of SysCV's own
``MaskDecoderHQ`` (``tests/test_hf_backbones.py``), which transformers' module departs from. ``benchmarks/latency.py`` measures it
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
        keys_nomask: ``(N, C)`` image tokens of a prompt without mask input (N = 64 * 64; SAM 3:
            72 * 72).
        proj_nomask: ``(N, 3I)`` first block's image-side projections of ``keys_nomask``.
        tokens: ``(N, C)`` image embedding tokens (prompts with a mask input add theirs).
        proj_tokens: ``(N, 3I)`` first block's projections of ``tokens`` (+ pe terms and biases).
        feat_s0, feat_s1: SAM 2's high-resolution features, ``(1, C0, 256, 256)`` and
            ``(1, C1, 128, 128)`` (SAM 3: 288 and 144), channels-last; None for SAM and HQ-SAM.
        hq: HQ-SAM's HQ features ``(1, C/8, 256, 256)``, channels-last; None for the others.
    """

    keys_nomask: torch.Tensor
    proj_nomask: torch.Tensor
    tokens: torch.Tensor
    proj_tokens: torch.Tensor
    feat_s0: Optional[torch.Tensor] = None
    feat_s1: Optional[torch.Tensor] = None
    hq: Optional[torch.Tensor] = None

    @staticmethod
    def stack(rows: List["ImageShare"]) -> "ImageShare":
        """One share per row (rows of several images in one pass): token fields become
        ``(B, N, ...)``, features ``(B, C, h, w)``; the decoder broadcasts either form."""
        tokens = (torch.stack([getattr(r, f) for r in rows]) for f in ("keys_nomask", "proj_nomask", "tokens", "proj_tokens"))
        feats = {f: torch.cat([getattr(r, f) for r in rows]).contiguous(memory_format=torch.channels_last)
                 for f in ("feat_s0", "feat_s1", "hq") if getattr(rows[0], f) is not None}
        return ImageShare(*tokens, **feats)


def _norm(layer, i: int):
    """A two-way block's i-th layer norm: ``norm{i}`` in SAM and SAM 2, ``layer_norm{i}`` in
    ``transformers``."""
    return getattr(layer, f"norm{i}", None) or getattr(layer, f"layer_norm{i}")


def _out_proj(attn):
    """An attention's output projection: ``out_proj`` in SAM, SAM 2 and HQ-SAM, ``o_proj`` in
    ``transformers``' SAM 3 tracker."""
    return getattr(attn, "out_proj", None) or attn.o_proj


def _wide_pe(pe_layer, size: Tuple[int, int]) -> torch.Tensor:
    """``(1, C, h, w)`` positional encoding of an ``(h, w)`` grid of image tokens by a
    ``transformers`` SAM positional embedding (``get_image_wide_positional_embeddings``)."""
    p = pe_layer.positional_embedding
    grid = torch.ones(size, device=p.device, dtype=p.dtype)
    y, x = (grid.cumsum(dim=0) - 0.5) / size[0], (grid.cumsum(dim=1) - 0.5) / size[1]
    return pe_layer(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)


def _channels_ln(x: torch.Tensor, ln) -> torch.Tensor:
    """A channels-first layer norm (``LayerNorm2d``, ``SamHQLayerNorm``) over a channels-last
    tensor: one pass, no copy."""
    y = x.permute(0, 2, 3, 1)
    return F.layer_norm(y, y.shape[-1:], ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)


class SharedDecoder:
    """Decode batches of prompts on one image with SAM's or SAM 2's prompt encoder and mask decoder
    (:class:`HQSharedDecoder`: HQ-SAM's).

    Args:
        prompt_encoder: the model's prompt encoder (``sam_prompt_encoder`` of SAM 2,
            ``prompt_encoder`` of SAM).
        mask_decoder: the model's mask decoder (SAM 2's with high-resolution features, or SAM's).
        dtype: compute dtype. ``torch.bfloat16`` runs on bf16 copies of the decoder and the mask
            embedding (no autocast, so no per-call weight casts); point and positional encodings
            stay float32 (bf16 would shift a point's sine features by up to ~0.1 rad).
        few_keys: the image-to-token attention (every image token over the prompt's few tokens)
            by :func:`few_key_attention` (True) or SDPA (False); None: where it was measured
            faster, bf16 on a CPU.
    """

    def __init__(self, prompt_encoder, mask_decoder, dtype: torch.dtype = torch.float32,
                 few_keys: Optional[bool] = None) -> None:
        # SAM 2 built without its high-resolution features is a configuration no checkpoint uses
        self.high_res = bool(getattr(mask_decoder, "use_high_res_features", False))
        if hasattr(mask_decoder, "use_high_res_features") and not self.high_res:
            raise ValueError("SharedDecoder expects SAM 2's high-resolution features")
        self.prompt_encoder, self.dtype = prompt_encoder, dtype
        if few_keys is None:
            few_keys = dtype == torch.bfloat16 and next(mask_decoder.parameters()).device.type == "cpu"
        self.few_keys = bool(few_keys)
        self.mask_downscaling, self.decoder = self._mask_embedding(prompt_encoder), mask_decoder
        if dtype != torch.float32:
            self.mask_downscaling = copy.deepcopy(self.mask_downscaling).to(dtype)
            self.decoder = copy.deepcopy(mask_decoder).to(dtype)
        t = mask_decoder.transformer
        with torch.inference_mode():
            pe = self._dense_pe()  # (1, C, 64, 64)
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

    # What differs between the libraries' modules (HQSharedDecoder overrides these)

    @staticmethod
    def _mask_embedding(prompt_encoder):
        """The prompt encoder's mask-input embedding module."""
        return prompt_encoder.mask_downscaling

    def _dense_pe(self) -> torch.Tensor:
        """``(1, C, h, w)`` positional encoding of the image tokens."""
        return self.prompt_encoder.get_dense_pe()

    def _sparse(self, coords: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                boxes: Optional[torch.Tensor]) -> torch.Tensor:
        """``(B, T, C)`` point and box embeddings (float32)."""
        points = None if coords is None else (coords.float(), labels)
        sparse, _ = self.prompt_encoder(points=points, boxes=None if boxes is None else boxes.float(), masks=None)
        return sparse

    def _output_tokens(self) -> torch.Tensor:
        """``(K, C)`` the decoder's learned output tokens, in its order."""
        dec = self.decoder
        heads = [dec.obj_score_token.weight] if getattr(dec, "pred_obj_scores", False) else []
        return torch.cat(heads + [dec.iou_token.weight, dec.mask_tokens.weight], dim=0)

    @staticmethod
    def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """sam2's ``Attention.forward`` after its input projections."""
        q, k, v = (attn._separate_heads(x, attn.num_heads) for x in (q, k, v))
        return attn.out_proj(attn._recombine_heads(F.scaled_dot_product_attention(q, k, v)))

    def _self_attend(self, attn, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A block's self-attention of the prompt tokens (queries = keys = ``q``)."""
        return attn(q=q, k=q, v=v)

    @staticmethod
    def _heads(attn) -> int:
        return attn.num_heads

    def _attend_image(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The image-to-token attention after its input projections: ``(B, N, I)`` image queries
        over ``(B, T, I)`` prompt tokens."""
        if self.few_keys:
            return _out_proj(attn)(few_key_attention(q, k, v, self._heads(attn)))
        return self._attend(attn, q, k, v)

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
            boxes: ``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in the model input's frame (SAM's and
                HQ-SAM's prompt encoders); None: no box.

        Returns:
            ``(B, M, 256, 256)`` low-res logits and ``(B, M)`` IoU predictions, float32.
        """
        sparse = self._sparse(coords, labels, boxes).to(self.dtype)
        b, n = sparse.shape[0], share.tokens.shape[-2]
        # as MaskDecoder.predict_masks: output tokens, then the prompt's
        out_tokens = self._output_tokens()
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
        t = self.decoder.transformer
        queries = point_embedding
        inner = t.layers[0].cross_attn_token_to_image.internal_dim
        for i, layer in enumerate(t.layers):
            if i > 0:
                proj = torch.matmul(keys, self.weights[i]).add_(self.pe_terms[i])
            if layer.skip_first_layer_pe:
                queries = self._self_attend(layer.self_attn, queries, queries)
            else:
                q = queries + point_embedding
                queries = queries + self._self_attend(layer.self_attn, q, queries)
            queries = _norm(layer, 1)(queries)
            a = layer.cross_attn_token_to_image
            queries = _norm(layer, 2)(queries + self._attend(a, a.q_proj(queries + point_embedding),
                                                             proj[..., :inner], proj[..., inner:2 * inner]))
            queries = _norm(layer, 3)(queries + layer.mlp(queries))
            c = layer.cross_attn_image_to_token
            q = queries + point_embedding
            keys = _norm(layer, 4)(keys + self._attend_image(c, proj[..., 2 * inner:], c.k_proj(q), c.v_proj(queries)))
        f = t.final_attn_token_to_image
        proj = torch.matmul(keys, self.final_weight).add_(self.final_pe_term)
        fi = f.internal_dim
        queries = queries + self._attend(f, f.q_proj(queries + point_embedding), proj[..., :fi], proj[..., fi:])
        final_norm = getattr(t, "norm_final_attn", None) or t.layer_norm_final_attn
        return self._masks(share, final_norm(queries), keys, multimask)

    def _image_map(self, keys: torch.Tensor) -> torch.Tensor:
        """The transformer's image tokens ``(B, N, C)`` as a ``(B, C, h, w)`` map (a channels-last
        view, no copy)."""
        gh, gw = self.grid
        return keys.reshape(keys.shape[0], gh, gw, -1).permute(0, 3, 1, 2)

    def _masks(self, share: ImageShare, hs: torch.Tensor, keys: torch.Tensor,
               multimask: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """MaskDecoder's upscaling, hypernetworks and choice of outputs from the transformer's
        tokens ``hs`` ``(B, K + T, C)`` and image tokens ``keys`` ``(B, N, C)``."""
        dec = self.decoder
        s = 1 if getattr(dec, "pred_obj_scores", False) else 0
        # upscaling, channels-last all the way (the tokens already are); SAM 2 adds its
        # high-resolution features on the way
        src = self._image_map(keys)
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        x = dc1(src)
        x = act1(_channels_ln(x + share.feat_s1 if self.high_res else x, ln1))
        up = dc2(x)
        up = act2(up + share.feat_s0 if self.high_res else up)  # (B, C0, 256, 256)
        mask_tokens = hs[:, s + 1: s + 1 + dec.num_mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        all_masks = _hyper_masks(up, hyper_in)
        iou = dec.iou_prediction_head(hs[:, s]).float()
        # MaskDecoder.forward's choice of outputs
        if multimask:
            return all_masks[:, 1:], iou[:, 1:]
        if getattr(dec, "dynamic_multimask_via_stability", False):
            return dec._dynamic_multimask_via_stability(all_masks, iou)
        return all_masks[:, :1], iou[:, :1]


def few_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of many queries over a few keys, SDPA's arithmetic (per head
    ``softmax(q k^T / sqrt(d)) v``) without its input and output projections: ``(B, N, C)``
    queries, ``(B, T, C)`` keys and values -> ``(B, N, C)``, heads along C as SAM splits them.

    Two matrix products over every head at once, the heads' keys and values laid out
    block-diagonally ``(C, heads * T)``, and the softmax over each head's T keys taken along a
    middle dimension, so that it runs over the N queries in vector lanes; the zeros of the
    block-diagonal cost ``heads`` times the products' work, which at T ~ 10 is still small.
    PyTorch's CPU SDPA tiles over the queries and takes its softmax along the few keys: on 2 CPU
    cores (AVX-512 bf16), N = 4096, T = 8, B = 2, 8 heads, this took 0.64 ms against SDPA's 3.0 ms
    in bf16 and 2.4 ms against 2.3 ms in fp32, so :class:`SharedDecoder` uses it in bf16 on a CPU
    (a cached agent click 12 % faster: ``benchmarks/latency.py --only-attention``). The same
    numbers as SDPA to float rounding (``tests/test_agent.py``).
    """
    b, (t, c) = q.shape[0], k.shape[1:]
    d = c // heads
    blocks = torch.block_diag(*[torch.ones(d, t, dtype=k.dtype, device=k.device)] * heads)  # (C, heads*T)
    kbd = (k.transpose(1, 2) * d ** -0.5).repeat(1, 1, heads) * blocks
    vbd = v.repeat(1, heads, 1) * blocks.t()
    s = torch.matmul(kbd.transpose(1, 2), q.transpose(1, 2))  # (B, heads*T, N)
    p = torch.softmax(s.view(b, heads, t, -1), dim=2).view(b, heads * t, -1)
    return torch.matmul(p.transpose(1, 2), vbd)


def _hyper_masks(up: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
    """``(B, M, H, W)`` float32 masks: the hypernetworks' ``(B, M, c)`` weights over the upscaled
    ``(B, c, H, W)`` embedding."""
    b, _, uh, uw = up.shape
    flat = up.permute(0, 2, 3, 1).reshape(b, uh * uw, -1)  # a view when up is channels-last
    return torch.matmul(flat, hyper_in.transpose(1, 2)).transpose(1, 2).reshape(b, -1, uh, uw).float()


class _TransformersModules:
    """What ``transformers``' SAM modules (HQ-SAM's, SAM 3 tracker's) share, for a
    :class:`SharedDecoder` subclass: the prompt encoder's signature and the attention's names."""

    prompt_encoder: object

    def _sparse(self, coords: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                boxes: Optional[torch.Tensor]) -> torch.Tensor:
        sparse, _ = self.prompt_encoder(input_points=None if coords is None else coords.float()[:, None],
                                        input_labels=None if labels is None else labels[:, None],
                                        input_boxes=None if boxes is None else boxes.float()[:, None], input_masks=None)
        return sparse[:, 0]

    @staticmethod
    def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # the attention's forward after its input projections, on (B, T, C) rather than
        # (B, point batch, T, C); its scaling is SDPA's default
        h = attn.num_attention_heads
        q, k, v = (x.unflatten(-1, (h, -1)).transpose(1, 2) for x in (q, k, v))
        return _out_proj(attn)(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def _self_attend(self, attn, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._attend(attn, attn.q_proj(q), attn.k_proj(q), attn.v_proj(v))

    @staticmethod
    def _heads(attn) -> int:
        return attn.num_attention_heads


class HQSharedDecoder(_TransformersModules, SharedDecoder):
    """HQ-SAM's decoder (``transformers``' ``SamHQPromptEncoder`` and ``SamHQMaskDecoder``) as a
    :class:`SharedDecoder`: the SAM decoder's transformer, plus an HQ token whose mask is made
    from the upscaled embedding and the image's HQ features (in the share); the output is SAM's
    mask plus the HQ mask (``hq_token_only=False``, HQ-SAM's default) and with SAM's three masks
    sorted by predicted IoU, as the module does.

    Args:
        prompt_encoder: ``SamHQModel.prompt_encoder``.
        mask_decoder: ``SamHQModel.mask_decoder``.
        dtype: as for :class:`SharedDecoder`.
    """

    @staticmethod
    def _mask_embedding(prompt_encoder):
        return prompt_encoder.mask_embed

    def _dense_pe(self) -> torch.Tensor:
        # SamHQModel.get_image_wide_positional_embeddings, with the prompt encoder's copy of the
        # (tied) positional embedding
        size = self.prompt_encoder.image_embedding_size[0]
        return _wide_pe(self.prompt_encoder.shared_embedding, (size, size))

    def _output_tokens(self) -> torch.Tensor:
        dec = self.decoder
        return torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, dec.hq_token.weight], dim=0)

    @torch.inference_mode()
    def share(self, image_embed: torch.Tensor, intermediate: Optional[List[torch.Tensor]] = None) -> ImageShare:
        """The per-image part: ``image_embed`` ``(1, C, 64, 64)`` and the ViT's intermediate
        embeddings ``[(1, 64, 64, D), ...]`` (``SamHQModel.get_image_embeddings``: the outputs of
        its global-attention blocks); the HQ features come from the first."""
        base = super().share(image_embed)
        dec = self.decoder
        emb = image_embed.to(self.dtype).contiguous(memory_format=torch.channels_last)
        hq = dec.encoder_conv2(dec.activation(_channels_ln(dec.encoder_conv1(emb), dec.encoder_norm)))
        if intermediate:
            vit = intermediate[0].to(self.dtype).permute(0, 3, 1, 2)  # channels-last already
            c = dec.compress_vit_conv1(vit)
            hq = hq + dec.compress_vit_conv2(dec.activation(_channels_ln(c, dec.compress_vit_norm)))
        base.hq = hq.contiguous(memory_format=torch.channels_last)
        return base

    def _masks(self, share: ImageShare, hs: torch.Tensor, keys: torch.Tensor,
               multimask: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        # SamHQMaskDecoder.forward after its transformer
        dec = self.decoder
        src = self._image_map(keys)
        act = dec.activation
        up = act(dec.upscale_conv2(act(_channels_ln(dec.upscale_conv1(src), dec.upscale_layer_norm))))
        hq = dec.mask_conv2(act(_channels_ln(dec.mask_conv1(up), dec.mask_norm))) + share.hq
        k = dec.num_mask_tokens - 1  # SAM's mask tokens; the HQ token follows them
        tokens = hs[:, 1: 2 + k]
        hyper = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        masks_sam = _hyper_masks(up, hyper)
        mask_hq = _hyper_masks(hq, dec.hq_mask_mlp(tokens[:, k])[:, None])
        iou = dec.iou_prediction_head(hs[:, 0]).float()
        if not multimask:
            return masks_sam[:, :1] + mask_hq, iou[:, :1]
        iou, order = torch.sort(iou[:, 1:k], dim=1, descending=True)
        masks = torch.gather(masks_sam[:, 1:k], 1, order[..., None, None].expand(-1, -1, *masks_sam.shape[-2:]))
        return masks + mask_hq, iou


class Sam3SharedDecoder(_TransformersModules, SharedDecoder):
    """SAM 3's tracker decoder (``transformers``' ``Sam3TrackerPromptEncoder`` and
    ``Sam3TrackerMaskDecoder``: SAM 2's design under transformers' names, on a 72 x 72 grid of
    image tokens) as a :class:`SharedDecoder`: an object-score token first, the high-resolution
    features (already projected by the model's encoding) added in the upscaling, SAM 2's
    fallback on unstable single masks.

    Args:
        prompt_encoder: ``Sam3TrackerModel.prompt_encoder``.
        mask_decoder: ``Sam3TrackerModel.mask_decoder``.
        dtype, few_keys: as for :class:`SharedDecoder`.
        image_pe: ``Sam3TrackerModel.shared_image_embedding``, the image's positional encoding
            (the model does not tie it to the prompt encoder's copy).
    """

    def __init__(self, prompt_encoder, mask_decoder, dtype: torch.dtype = torch.float32,
                 few_keys: Optional[bool] = None, *, image_pe) -> None:
        self.image_pe = image_pe
        super().__init__(prompt_encoder, mask_decoder, dtype, few_keys)
        self.high_res = True  # the model's encoding gives feat_s0 and feat_s1

    @staticmethod
    def _mask_embedding(prompt_encoder):
        return prompt_encoder.mask_embed

    def _dense_pe(self) -> torch.Tensor:
        return _wide_pe(self.image_pe, tuple(self.prompt_encoder.image_embedding_size))

    def _output_tokens(self) -> torch.Tensor:
        dec = self.decoder
        return torch.cat([dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight], dim=0)

    def _masks(self, share: ImageShare, hs: torch.Tensor, keys: torch.Tensor,
               multimask: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        # Sam3TrackerMaskDecoder.forward after its transformer
        dec = self.decoder
        src = self._image_map(keys)
        x = dec.activation(_channels_ln(dec.upscale_conv1(src) + share.feat_s1, dec.upscale_layer_norm))
        up = dec.activation(dec.upscale_conv2(x) + share.feat_s0)
        tokens = hs[:, 2: 2 + dec.num_mask_tokens]
        hyper_in = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
        all_masks = _hyper_masks(up, hyper_in)
        iou = dec.iou_prediction_head(hs[:, 1]).float()
        if multimask:
            return all_masks[:, 1:], iou[:, 1:]
        if dec.dynamic_multimask_via_stability:  # the module's (B, point batch, ...) layout
            masks, scores = dec._dynamic_multimask_via_stability(all_masks[:, None], iou[:, None])
            return masks[:, 0], scores[:, 0]
        return all_masks[:, :1], iou[:, :1]


class SharedDecoders:
    """A backbone's :class:`SharedDecoder` per compute dtype (built on first use) and the image
    shares it made, at most ``max_shares`` (16-32 MB each), none outliving its embedding (a share
    is kept with the embedding state it came from: an image encoded again under the same key gets
    a new one).

    Args:
        prompt_encoder, mask_decoder: as for :class:`SharedDecoder`.
        decoder_cls: what builds a dtype's decoder: :class:`SharedDecoder`, :class:`HQSharedDecoder`
            for HQ-SAM's modules, :class:`Sam3SharedDecoder` (with its ``image_pe`` bound) for SAM 3's.
        max_shares: shares kept (as many as embeddings, so a batch over many images does not
            recompute them).
        step: wraps a dtype's decoder in the step that is called instead, with the same
            arguments (:class:`~smartsam.backbones.compiled.CompiledDecoder`); None: the decoder
            itself. :attr:`compiled` switches between the two (each is kept: switching back and
            forth, as a benchmark's A B A B does, builds nothing again).
    """

    def __init__(self, prompt_encoder, mask_decoder, max_shares: int,
                 step: Optional[Callable[[SharedDecoder], Callable]] = None,
                 decoder_cls: Callable[..., SharedDecoder] = SharedDecoder) -> None:
        self.prompt_encoder, self.mask_decoder, self.max_shares = prompt_encoder, mask_decoder, max(2, int(max_shares))
        self.decoder_cls = decoder_cls
        self.step = step
        self.compiled = step is not None
        self._decoders: Dict[torch.dtype, SharedDecoder] = {}
        self._steps: Dict[torch.dtype, Callable] = {}
        self._shares: "OrderedDict[Tuple[str, torch.dtype], Tuple[object, ImageShare]]" = OrderedDict()

    def eager(self, dtype: torch.dtype) -> SharedDecoder:
        """The decoder for ``dtype`` itself."""
        dec = self._decoders.get(dtype)
        if dec is None:
            dec = self._decoders[dtype] = self.decoder_cls(self.prompt_encoder, self.mask_decoder, dtype)
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
        embedding and dtype from ``features()``: ``(image_embed, high_res_feats or None)``, HQ-SAM:
        ``(image_embed, intermediate_embeddings)``);
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
