"""Host transfers of one agent click: the baseline for a step that stays on the device (issue 38).

    python benchmarks/transfers.py [--backbone NAME] [--device cpu|cuda] [--image PATH] [--chain-length N]

One cached click (its image encoded before counting) on each chain-click path ("host": OpenCV
places the chain clicks; "device": they are placed with tensor operations, the chains' logits
kept on the device). Counted while the click runs:

- scalar reads: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``): on CUDA each
  waits for the device;
- copies to the CPU: ``aten._to_copy`` / ``aten.copy_`` from another device onto the CPU (none
  on a CPU);
- ``.cpu()``, ``.numpy()``, ``.tolist()`` calls, counted in Python: free on a CPU, each one a
  transfer (and a wait) on CUDA.

Prints a markdown table. Random weights are fine: what moves is the same whatever the weights.
Nothing is timed here; the numbers are counts.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, table  # noqa: E402

from smartsam.agent import SmartSAMAgent  # noqa: E402
from smartsam.clickers import NextChainClicker  # noqa: E402
from smartsam.io import load_image  # noqa: E402
from smartsam.models import load_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "datasets" / "GrabCut" / "img" / "106024.jpg"
aten = torch.ops.aten


class HostTransfers(TorchDispatchMode):
    """Counts the aten calls that bring a tensor's values to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.counts["scalar reads"] += 1
        elif func is aten._to_copy.default and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu":
                self.counts["copies to the CPU"] += 1
        elif func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.counts["copies to the CPU"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def python_reads(counts: Counter):
    """Count ``Tensor.cpu``, ``Tensor.numpy`` and ``Tensor.tolist`` calls meanwhile."""
    saved = {name: getattr(torch.Tensor, name) for name in ("cpu", "numpy", "tolist")}

    def counting(name, fn):
        def wrapper(self, *a, **k):
            counts[f".{name}()"] += 1
            return fn(self, *a, **k)
        return wrapper

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, counting(name, fn))
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def count_click(agent: SmartSAMAgent, image, click) -> Counter:
    agent.set_image(image)  # encoded outside the count: a cached click
    mode = HostTransfers()
    with python_reads(mode.counts), mode:
        agent.predict(click)
    return mode.counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    ap.add_argument("--device", default=None)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--chain-length", type=int, default=3)
    args = ap.parse_args()
    bb = load_backbone(args.backbone, device=args.device)
    image = load_image(args.image)
    h, w = image.shape[:2]
    click = (w / 2, h / 2)
    keys = ["scalar reads", "copies to the CPU", ".cpu()", ".numpy()", ".tolist()"]
    rows = []
    for where in ("host", "device"):
        agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=args.chain_length), chain_clicks=where)
        d0 = bb.decoder_calls
        counts = count_click(agent, image, click)
        rows.append([where, bb.decoder_calls - d0, *[counts.get(k, 0) for k in keys]])
    print(f"Host transfers of one cached agent click: {bb.name} on {bb.device}, chain length "
          f"{args.chain_length}, click at the image's centre; {machine()}"
          + (" (RANDOM weights)" if bb.random_weights else ""))
    print()
    print(table(["chain clicks", "decoder calls", *keys], rows))


if __name__ == "__main__":
    main()
