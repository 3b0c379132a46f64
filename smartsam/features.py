"""Image features for the reference selector: DINOv2 (image references) and CLIP (text).

Each extractor computes the image's patch tokens once per image (cached by content hash) and
turns any number of candidate masks into features by masked average pooling over the patch grid,
so scoring 120 candidates costs one forward pass, not 120.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Tuple

import cv2
import numpy as np
import torch

from .backbones.base import default_device, image_key

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def pool_masks(tokens: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Masked average pooling.

    Args:
        tokens: ``(gh, gw, D)`` patch features.
        masks: ``(N, h, w)`` boolean or [0, 1] masks aligned with the image (any resolution).

    Returns:
        ``(N, D)`` features; an empty mask gives a zero vector.
    """
    gh, gw, d = tokens.shape
    masks = np.asarray(masks, np.float32)
    # INTER_AREA keeps the share of each patch that the mask covers: a patch half inside
    # weighs half.
    weights = np.stack([cv2.resize(m, (gw, gh), interpolation=cv2.INTER_AREA) for m in masks]) if len(masks) else np.zeros((0, gh, gw), np.float32)
    w = weights.reshape(len(masks), -1)
    total = w.sum(1, keepdims=True)
    feats = w @ tokens.reshape(-1, d)
    return np.where(total > 0, feats / np.maximum(total, 1e-9), 0.0).astype(np.float32)


class _PatchFeatureExtractor:
    """Shared machinery: resize to a patch multiple, one forward per image, LRU of token grids."""

    patch_size: int = 14
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, name: str, image_size: int, device: Optional[str], cache_size: int) -> None:
        self.name = name
        self.image_size = int(image_size)
        self.device = torch.device(device or default_device())
        self.cache_size = int(cache_size)
        self._cache: "OrderedDict[str, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self.forward_calls = 0

    def _pixels(self, image: np.ndarray, square: bool) -> torch.Tensor:
        h, w = image.shape[:2]
        p = self.patch_size
        if square:
            th = tw = self.image_size
        else:
            s = self.image_size / max(h, w)
            th, tw = max(p, int(round(h * s / p)) * p), max(p, int(round(w * s / p)) * p)
        x = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if th < h else cv2.INTER_LINEAR)
        x = (x.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.as_tensor(x.transpose(2, 0, 1)[None], device=self.device)

    def tokens(self, image: np.ndarray, key: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(patch_grid (gh, gw, D), global (D,))`` for an ``(H, W, 3)`` uint8 image, cached."""
        key = key or image_key(image)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        with torch.inference_mode():
            out = self._forward(image)
        self.forward_calls += 1
        self._cache[key] = out
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def mask_features(self, image: np.ndarray, masks: np.ndarray, key: Optional[str] = None) -> np.ndarray:
        """``(N, D)`` masked-average-pooled features of ``(N, h, w)`` masks on ``image``."""
        grid, _ = self.tokens(image, key)
        return pool_masks(grid, masks)

    def image_feature(self, image: np.ndarray, key: Optional[str] = None) -> np.ndarray:
        """``(D,)`` whole-image feature (the CLS / pooled token)."""
        return self.tokens(image, key)[1]

    def _forward(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError


class DinoV2Features(_PatchFeatureExtractor):
    """DINOv2 patch tokens (``transformers.Dinov2Model``) for masked-average-pooled features.

    Args:
        model: a ``Dinov2Model``; or give ``model_name_or_path`` (a local directory or a model id
            already in the Hugging Face cache; nothing is fetched when ``HF_HUB_OFFLINE=1``).
        image_size: longest side, in pixels, the image is resized to (a multiple of 14 per side).
        cache_size: images whose token grids are kept.
    """

    def __init__(self, model=None, model_name_or_path: Optional[str] = None, image_size: int = 448,
                 device: Optional[str] = None, cache_size: int = 8, name: Optional[str] = None) -> None:
        if model is None:
            from transformers import Dinov2Model

            if model_name_or_path is None:
                raise ValueError("give a Dinov2Model or a model_name_or_path")
            model = Dinov2Model.from_pretrained(model_name_or_path)
        super().__init__(name or str(model_name_or_path or "dinov2"), image_size, device, cache_size)
        self.model = model.to(self.device).eval()
        self.patch_size = int(self.model.config.patch_size)

    def _forward(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        x = self._pixels(image, square=False)
        hidden = self.model(pixel_values=x).last_hidden_state[0].float().cpu().numpy()
        gh, gw = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        # CLS first, then (optional) register tokens, then the gh * gw patch tokens.
        patches = hidden[-gh * gw:].reshape(gh, gw, -1)
        return patches, hidden[0]


class ClipFeatures(_PatchFeatureExtractor):
    """CLIP features for text references.

    Candidates are scored MaskCLIP-style: the vision tower's patch tokens go through the final
    layer norm and the visual projection into the joint space, then are mask-pooled, so one
    forward per image serves every candidate.

    Args:
        model: a ``CLIPModel``; tokenizer: its tokenizer; or ``model_name_or_path`` for both.
    """

    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(self, model=None, tokenizer=None, model_name_or_path: Optional[str] = None,
                 device: Optional[str] = None, cache_size: int = 8, name: Optional[str] = None) -> None:
        if model is None or tokenizer is None:
            from transformers import AutoTokenizer, CLIPModel

            if model_name_or_path is None:
                raise ValueError("give a CLIPModel and tokenizer, or a model_name_or_path")
            model = model or CLIPModel.from_pretrained(model_name_or_path)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_name_or_path)
        vc = model.config.vision_config
        super().__init__(name or str(model_name_or_path or "clip"), int(vc.image_size), device, cache_size)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.patch_size = int(vc.patch_size)

    def _forward(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        x = self._pixels(image, square=True)
        vm = self.model.vision_model
        out = vm(pixel_values=x)
        tokens = self.model.visual_projection(vm.post_layernorm(out.last_hidden_state[0, 1:]))
        g = self.image_size // self.patch_size
        pooled = self.model.visual_projection(out.pooler_output[0])
        return tokens.float().cpu().numpy().reshape(g, g, -1), pooled.float().cpu().numpy()

    def text_feature(self, text: str) -> np.ndarray:
        """``(D,)`` CLIP text feature of ``text`` (prompted as "a photo of a {text}")."""
        if not text or not text.strip():
            raise ValueError("empty text reference")
        enc = self.tokenizer([f"a photo of a {text.strip()}"], padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(**{k: v.to(self.device) for k, v in enc.items()})
        feat = out if isinstance(out, torch.Tensor) else out.pooler_output
        return feat[0].float().cpu().numpy()


class ColourFeatures(_PatchFeatureExtractor):
    """A deterministic test extractor (registry ``colour-test``, never a default): each patch's
    feature is its mean colour (RGB in [0, 1]). A mask on pure red pools to red, a mask half on a
    grey background to a greyer red, so cosine similarity says which objects are "like" a red
    reference, and by how much: what random DINOv2 weights cannot show."""

    def __init__(self, image_size: int = 448, device: Optional[str] = None, cache_size: int = 8,
                 name: str = "colour-test") -> None:
        super().__init__(name, image_size, device, cache_size)

    def _forward(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        p = self.patch_size
        s = self.image_size / max(h, w)
        gh, gw = max(1, int(round(h * s / p))), max(1, int(round(w * s / p)))
        grid = cv2.resize(image.astype(np.float32) / 255.0, (gw, gh), interpolation=cv2.INTER_AREA)
        return grid.reshape(gh, gw, 3), grid.reshape(-1, 3).mean(0)

    def text_feature(self, text: str) -> np.ndarray:
        raise ValueError("colour-test features have no text side")


class FeatureSet:
    """The feature extractors an agent or a reference builder may need, by kind, each loaded on
    first use (pure-IS users never pay for DINOv2 or CLIP).

    Args:
        image: a DINOv2 extractor for image references, or None.
        text: a CLIP extractor for text references, or None.
        loader: ``kind -> extractor`` for a kind given as None ("image" or "text"), called once.
    """

    KINDS = ("image", "text")

    def __init__(self, image=None, text=None, loader=None) -> None:
        import threading

        self._have = {"image": image, "text": text}
        self._loader = loader
        self._lock = threading.Lock()

    def loaded(self, kind: str):
        """The extractor of ``kind`` if it is loaded, else None (never loads)."""
        return self._have[kind]

    def get(self, kind: str):
        """The extractor of ``kind`` ("image" or "text"), loading it if needed."""
        if kind not in self.KINDS:
            raise ValueError(f"feature kind is image or text, not {kind!r}")
        with self._lock:
            if self._have[kind] is None:
                if self._loader is None:
                    raise RuntimeError("image references need a DINOv2 feature extractor" if kind == "image"
                                       else "text references need a CLIP feature extractor")
                self._have[kind] = self._loader(kind)
            return self._have[kind]

    def for_reference(self, kind: str):
        """The extractor a reference of ``kind`` ("mask", "image" or "text") is compared with."""
        return self.get("text" if kind == "text" else "image")
