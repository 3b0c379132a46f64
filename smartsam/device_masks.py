"""The mask maths of one agent step as tensor work on the logits' device: the same numbers.

A step that stays on the device (``SmartSAMAgent(chain_clicks="device")``) needs, besides the
chain clicks of :mod:`smartsam.chain_clicks`, the uncertain band of an image's initial masks,
the IoU between a step's masks (the fast path's de-duplication) and which masks contain the
click (pure-IS selection). These are the twins of :mod:`smartsam.masks`' NumPy functions, written
so that every rounding is NumPy's: float32 where NumPy computes in float32, the same order of
operations, the same tie rules (``tests/test_chain_clicks.py`` holds each equal to its twin), so
both paths give the same candidates and the same mask.

All functions keep their inputs' device and never read a value back to the host.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .masks import LowResFrame, sample_logits_at


def uncertainty_band(logits: torch.Tensor, band_fraction: float = 0.25, percentile: float = 90.0) -> torch.Tensor:
    """:func:`smartsam.masks.uncertainty_band` of ``(..., h, w)`` float32 logits as a 0-d
    float32 tensor: ``band_fraction`` times NumPy's linear ``percentile`` of ``|logit|``.

    NumPy's arithmetic for a float32 array and Python-float arguments, step for step: the
    quantile ``percentile / 100`` and the virtual index ``(n - 1) * q`` in float32 (so the
    interpolation weight is as coarse as NumPy's), the two neighbouring order statistics, and the
    float32 ``_lerp``; NaN where a logit is NaN. Only the index and the weight are computed on the
    host: they depend on the size alone.
    """
    band_fraction, percentile = float(band_fraction), float(percentile)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError("Percentiles must be in the range [0, 100]")
    mags = logits.detach().float().abs().reshape(-1)
    n = mags.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=logits.device)
    q = np.asanyarray(np.true_divide(percentile, np.float32(100)))  # numpy.percentile's first step
    virtual = np.asanyarray((n - 1) * q)
    prev = int(np.floor(virtual))
    if virtual >= n - 1:  # numpy takes the largest value
        prev = nxt = n - 1
    elif virtual < 0:
        prev = nxt = 0
    else:
        nxt = prev + 1
    gamma = np.asanyarray(virtual - np.floor(virtual), dtype=virtual.dtype)
    a = torch.kthvalue(mags, prev + 1).values
    b = a if nxt == prev else torch.kthvalue(mags, nxt + 1).values
    diff = b - a
    if gamma >= 0.5:  # numpy's _lerp: from the nearer end
        value = b - diff * float(1 - gamma)
    else:
        value = a + diff * float(gamma)
    value = torch.where(torch.isnan(mags).any(), torch.nan, value)  # kthvalue skips NaN, NumPy does not
    return value * band_fraction  # float32, as NumPy multiplies a float32 scalar by a Python float


def batch_iou(masks: torch.Tensor) -> torch.Tensor:
    """:func:`smartsam.masks.batch_iou` of ``(N, H, W)`` bool masks with themselves: ``(N, N)``
    float32 (pixel counts are exact in float32 below 2**24 pixels, so the division rounds as
    NumPy's does)."""
    a = masks.reshape(masks.shape[0], -1).float()
    inter = a @ a.T
    area = a.sum(1)
    union = area[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / torch.clamp(union, min=1e-9), torch.ones_like(inter))


def contains_click(logits: torch.Tensor, frame: LowResFrame, click_xy: Tuple[float, float]) -> torch.Tensor:
    """:func:`smartsam.selector.contains_click` of ``(K, g, g)`` logits: ``(K,)`` bool, which
    maps are positive at the click (the same bilinear sample: its weights are host numbers)."""
    return sample_logits_at(logits, frame, click_xy) > 0
