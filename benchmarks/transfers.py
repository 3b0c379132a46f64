"""Host transfers of one agent click, on each chain-click path (issue 38's step on the device).

    python benchmarks/transfers.py [--backbone NAME] [--device cpu|cuda] [--image PATH] [--chain-length N]

One cached click (its image encoded before counting) on each chain-click path ("host": OpenCV
places the chain clicks; "device": the step stays on the device, one copy back per step and
one per answer). What is counted: :mod:`smartsam.host_transfers`.

Prints a markdown table. Random weights are fine: what moves is the same whatever the weights.
Nothing is timed here; the numbers are counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, table  # noqa: E402

from smartsam.agent import SmartSAMAgent  # noqa: E402
from smartsam.clickers import NextChainClicker  # noqa: E402
from smartsam.host_transfers import KINDS, host_transfers  # noqa: E402
from smartsam.io import load_image  # noqa: E402
from smartsam.models import load_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "datasets" / "GrabCut" / "img" / "106024.jpg"


def count_click(agent: SmartSAMAgent, image, click) -> dict:
    agent.set_image(image)  # encoded outside the count: a cached click
    with host_transfers() as counts:
        agent.predict(click)
    return counts


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
    keys = list(KINDS)
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
