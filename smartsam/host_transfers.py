"""Count what brings tensor values to the host while some code runs.

On a GPU every such read is a copy and a wait for the device; a step that stays on the device
makes as few as it can. Counted:

- ``scalar reads``: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``) and
  ``aten.equal`` (``torch.equal``: a bool read back);
- ``copies to the CPU``: ``aten._to_copy`` / ``aten.copy_`` from another device onto the CPU
  (none on a CPU);
- ``.cpu()``, ``.numpy()``, ``.tolist()`` calls, counted in Python: free on a CPU, each one a
  transfer on CUDA, so they show on a CPU what a GPU would pay.

``benchmarks/transfers.py`` prints them for one click; ``tests/test_chain_clicks.py`` holds the
device path's numbers.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
KINDS = ("scalar reads", "copies to the CPU", ".cpu()", ".numpy()", ".tolist()")


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.equal.default):
            self.counts["scalar reads"] += 1
        elif func is aten._to_copy.default and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu":
                self.counts["copies to the CPU"] += 1
        elif func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.counts["copies to the CPU"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_transfers() -> Iterator[Counter]:
    """``with host_transfers() as counts: ...``: ``counts`` (a Counter over :data:`KINDS`) holds
    what the block read back. Not thread-safe: it patches ``torch.Tensor`` methods meanwhile."""
    counts: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist")}

    def counting(name, fn):
        def wrapper(self, *a, **k):
            counts[f".{name}()"] += 1
            return fn(self, *a, **k)
        return wrapper

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, counting(name, fn))
        with _Dispatch(counts):
            yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
