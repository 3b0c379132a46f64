"""Shared bits of the benchmark scripts: timing, memory, table printing, machine description."""

from __future__ import annotations

import os
import platform
import resource
import time
from contextlib import contextmanager
from typing import List, Sequence

import torch


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads visible, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def timed(out: dict, key: str, device="cpu"):
    sync(device)
    t = time.perf_counter()
    yield
    sync(device)
    out[key] = out.get(key, 0.0) + time.perf_counter() - t


def table(headers: Sequence[str], rows: List[Sequence]) -> str:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)
