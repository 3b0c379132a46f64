"""Metrics of the interactive-segmentation literature (after RITM's ``isegm/inference/utils.py``)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..masks import mask_iou

__all__ = ["mask_iou", "noc", "summarize"]


def noc(ious: Sequence[float], threshold: float, max_clicks: int) -> int:
    """Number of clicks to reach ``threshold`` IoU (1-based); ``max_clicks`` when never reached."""
    for i, v in enumerate(ious[:max_clicks]):
        if v >= threshold:
            return i + 1
    return max_clicks


def summarize(per_sample_ious: List[Sequence[float]], max_clicks: int,
              iou_best: Optional[Sequence[float]] = None) -> Dict[str, object]:
    """Metrics over samples, each a list of IoUs after click 1, 2, ...

    Returns mIoU@1 and Ratio@K in percent, NoC@K in clicks, IoU_best in percent (the best
    candidate at click 1, when given), and ``miou_per_click`` (percent; a sample that stopped
    early keeps its last IoU).
    """
    n = len(per_sample_ious)
    if n == 0:
        raise ValueError("no samples")
    first = np.asarray([s[0] for s in per_sample_ious], np.float64)
    padded = np.asarray([list(s[:max_clicks]) + [s[-1]] * (max_clicks - len(s[:max_clicks])) for s in per_sample_ious])
    out: Dict[str, object] = {
        "n": n,
        "mIoU@1": 100 * first.mean(),
        "Ratio@75": 100 * (first >= 0.75).mean(),
        "Ratio@85": 100 * (first >= 0.85).mean(),
        "NoC@75": float(np.mean([noc(s, 0.75, max_clicks) for s in per_sample_ious])),
        "NoC@85": float(np.mean([noc(s, 0.85, max_clicks) for s in per_sample_ious])),
        "NoC@90": float(np.mean([noc(s, 0.90, max_clicks) for s in per_sample_ious])),
        "miou_per_click": (100 * padded.mean(0)).tolist(),
    }
    if iou_best is not None and len(iou_best) and all(v is not None for v in iou_best):
        out["IoU_best"] = 100 * float(np.mean(iou_best))
    return out
