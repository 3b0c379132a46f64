"""Building references: what the user meant, as a feature (paper section 4.1).

An image + mask (DINOv2, masked average pooling after the paper's preparation), an image alone
(its DINOv2 CLS token) or a text (CLIP). One class over the feature extractors, shared by the
agent, the backend and the evaluation, so a reference is built the same way everywhere.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .features import FeatureSet
from .masks import REFERENCE_PREPS, prepare_reference
from .selector import Reference


class ReferenceBuilder:
    """Turns examples into :class:`~smartsam.selector.Reference` objects.

    Args:
        features: the extractors (:class:`~smartsam.features.FeatureSet`), loaded on first need.
        reference_prep: "paper" (default): image + mask references are prepared as in the paper's
            section 4.1 (background removed, object cropped to ~70 % of the image,
            :func:`~smartsam.masks.prepare_reference`) before pooling; "none" pools the raw image.
    """

    def __init__(self, features: Optional[FeatureSet] = None, reference_prep: str = "paper") -> None:
        if reference_prep not in REFERENCE_PREPS:
            raise ValueError(f"reference_prep is 'paper' or 'none', got {reference_prep!r}")
        self.features = features or FeatureSet()
        self.reference_prep = reference_prep

    def from_mask(self, image: np.ndarray, mask: np.ndarray) -> Reference:
        """From an example ``(H, W, 3)`` uint8 image and a boolean ``(H, W)`` mask of the object."""
        extractor = self.features.get("image")
        mask = np.asarray(mask).astype(bool)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"reference mask {mask.shape} does not match image {image.shape[:2]}")
        if not mask.any():
            raise ValueError("reference mask is empty")
        if self.reference_prep == "paper":
            image, mask = prepare_reference(image, mask)
        return Reference("mask", extractor.mask_features(image, mask[None])[0], extractor.name)

    def from_image(self, image: np.ndarray) -> Reference:
        """From an example image alone (its CLS token)."""
        extractor = self.features.get("image")
        return Reference("image", extractor.image_feature(image), extractor.name)

    def from_text(self, text: str) -> Reference:
        """From a text (CLIP)."""
        extractor = self.features.get("text")
        return Reference("text", extractor.text_feature(text), extractor.name, text=text)
