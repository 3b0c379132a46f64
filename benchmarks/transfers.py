"""Host transfers of one agent click, on each chain-click path (issue 38's step on the device).

    python benchmarks/transfers.py [--backbone NAME] [--device cpu|cuda] [--image PATH] [--chain-length N]

One cached click (its image encoded before counting) on each chain-click path ("host": OpenCV
places the chain clicks; "device": the step stays on the device, one copy back per step and
one per answer). What is counted: :mod:`smartsam.host_transfers`.

Prints a markdown table. Random weights are fine: what moves is the same whatever the weights.
Besides the counts, each path's seconds per cached click (median of ``--rounds`` rounds, the two
paths taking turns, A B A B, a fresh agent each time so that no answer comes from its cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, sync, table  # noqa: E402

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
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bb = load_backbone(args.backbone, device=args.device)
    image = load_image(args.image)
    h, w = image.shape[:2]
    click = (w / 2, h / 2)
    keys = list(KINDS)
    paths = ("host", "device")
    counted, seconds = {}, {where: [] for where in paths}
    for r in range(args.rounds):
        for where in paths:
            agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=args.chain_length), chain_clicks=where)
            d0 = bb.decoder_calls
            if r == 0:
                counted[where] = (count_click(agent, image, click), bb.decoder_calls - d0)
            else:
                agent.set_image(image)
                sync(bb.device)
                t = time.perf_counter()
                agent.predict(click)
                sync(bb.device)
                seconds[where].append(time.perf_counter() - t)
    rows = [[where, counted[where][1], *[counted[where][0].get(k, 0) for k in keys],
             f"{statistics.median(seconds[where]):.3f}" if seconds[where] else "-"] for where in paths]
    print(f"Host transfers of one cached agent click: {bb.name} on {bb.device}, chain length "
          f"{args.chain_length}, click at the image's centre; {machine()}"
          + (" (RANDOM weights)" if bb.random_weights else ""))
    print()
    print(table(["chain clicks", "decoder calls", *keys, "s per click (median)"], rows))


if __name__ == "__main__":
    main()
