"""Backbones: one small interface (:class:`Backbone`) over SAM and SAM 2.1."""

from .base import Backbone, DecodeResult, Prompt, image_key

__all__ = ["Backbone", "DecodeResult", "Prompt", "image_key"]
