"""A deterministic test backbone: it draws a disk at the prompt.

Random weights can show sizes, modes and call counts, never *where* a mask lands. This backbone
answers a prompt with disks centred on its first positive point (or its box's centre), so a test
can check that a click at (x, y) gives a mask at (x, y): percent -> pixel conversion, x/y order,
EXIF orientation, RLE orientation. With a ``mask_input`` (a later click) it edits that mask: the
newest point adds a disk (positive) or cuts one (negative), so a test can also tell which
earlier answer a refinement started from. It is not a model and never a default.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..masks import LowResFrame
from .base import Backbone, Prompt

# Radii of the 3 multimask outputs, as fractions of the image's shorter side; scores favour none.
RADII = (0.06, 0.12, 0.2)


class DiskBackbone(Backbone):
    """Disks of radius ``RADII[j] * min(H, W)`` centred on the prompt (logits +-10)."""

    def __init__(self, name: str = "disk-test", cache_size: int = 8, device: Optional[str] = None) -> None:
        super().__init__(name, cache_size, device or "cpu")

    def _encode(self, image: np.ndarray) -> Any:
        return None

    def _activate(self, state: Any, image_hw: Tuple[int, int]) -> None:
        pass

    def _frame(self, image_hw: Tuple[int, int]) -> LowResFrame:
        h, w = image_hw
        return LowResFrame(image_hw=(h, w), valid_hw=(256, 256), scale_xy=(w / 256.0, h / 256.0))

    def _decode(self, prompts: Sequence[Prompt], multimask: bool):
        h, w = self.image_hw
        frame = self._frame((h, w))
        # centres of the low-res cells in image pixels
        ys = (np.arange(256) + 0.5) * frame.scale_xy[1] - 0.5
        xs = (np.arange(256) + 0.5) * frame.scale_xy[0] - 0.5
        radii = RADII if multimask else (RADII[1],)
        out = np.zeros((len(prompts), len(radii), 256, 256), np.float32)
        def disk(cx, cy, r):
            return np.sqrt((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) <= r * min(h, w)

        for i, p in enumerate(prompts):
            if p.mask_input is not None and len(p.points):
                (cx, cy), positive = p.points[-1], p.labels[-1] == 1
                base = np.asarray(p.mask_input) > 0
                for j, r in enumerate(radii):
                    m = base | disk(cx, cy, r) if positive else base & ~disk(cx, cy, r)
                    out[i, j] = np.where(m, 10.0, -10.0)
                continue
            pos = p.points[p.labels == 1]
            if len(pos):
                cx, cy = pos[0]
            else:
                x0, y0, x1, y1 = p.box
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            for j, r in enumerate(radii):
                out[i, j] = np.where(disk(cx, cy, r), 10.0, -10.0)
        scores = torch.full((len(prompts), len(radii)), 0.9)
        return torch.from_numpy(out), scores

    def _upsample(self, low_res: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
        return F.interpolate(low_res, size=tuple(image_hw), mode="bilinear", align_corners=False)
