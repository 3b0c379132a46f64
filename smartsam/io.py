"""Reading images as annotators see them, and writing masks."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

# Larger images are refused by default: a decompression bomb must not take the server's memory.
# 40 MP covers every common camera; callers pass their own cap (the backend's SMARTSAM_MAX_PIXELS).
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def to_rgb8(img: Image.Image) -> np.ndarray:
    """A PIL image -> ``(H, W, 3)`` uint8 RGB, oriented as displayed (EXIF), any mode accepted.

    Grayscale is replicated, alpha dropped (composited on black, as the browser shows it on the
    canvas's default background), palette expanded, 16-bit and float scaled to 8 bits.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 0
        scale = 255.0 / (65535.0 if img.mode.startswith("I;16") or hi > 255 else max(hi, 1.0))
        a = np.clip(a * scale, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _open(source, max_pixels: int, what: str = "image") -> Image.Image:
    """Open lazily (header only) and refuse more than ``max_pixels`` before any pixel is decoded.
    Pillow's own bomb check (a process-wide setting) is left as it is: its warning is ours to
    decide on, its error (over twice Pillow's limit) still refuses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(source)
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageError(f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (SMARTSAM_MAX_PIXELS)")
    return img


def load_image(source: Union[str, Path, bytes], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file (or its bytes) as ``(H, W, 3)`` uint8 RGB; ImageError if unusable or
    larger than ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source, max_pixels)
            img.load()
            return to_rgb8(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image file not found: {source}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image refused: over the limit of {max_pixels} pixels (SMARTSAM_MAX_PIXELS): {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        name = "image data" if isinstance(source, (bytes, bytearray)) else str(source)
        raise ImageError(f"cannot read {name} as an image ({e})") from None


def load_mask(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a mask file (or file object): nonzero pixels (of the first channel) are the object ->
    ``(H, W)`` bool; ImageError if unusable or larger than ``max_pixels``."""
    try:
        with _open(path, max_pixels, "mask") as img:
            a = np.asarray(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"mask file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"mask refused: over the limit of {max_pixels} pixels (SMARTSAM_MAX_PIXELS): {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        name = "mask data" if not isinstance(path, (str, Path)) else str(path)
        raise ImageError(f"cannot read {name} as a mask ({e})") from None
    if a.ndim == 3:
        a = a[..., 0]
    return a > 0


def save_mask(mask: np.ndarray, path: Union[str, Path]) -> None:
    """Write a boolean mask as an 8-bit PNG (255 object, 0 background)."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


def overlay(image: np.ndarray, mask: np.ndarray, color=(30, 144, 255), alpha: float = 0.5) -> np.ndarray:
    """The image with the mask tinted in ``color`` -> ``(H, W, 3)`` uint8."""
    out = image.astype(np.float32).copy()
    out[mask] = out[mask] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    return out.astype(np.uint8)
