"""Latency per click, broken down, and how the agent's cost grows with its work.

    python benchmarks/latency.py [--backbone NAME] [--checkpoint PATH] [--device cpu|cuda] [--image PATH]

Prints markdown tables. Random-weight configurations are fine for timing (the cost does not
depend on the weights) and are labelled as such. Speed is measured here, never in the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine, peak_rss_mb, sync, table  # noqa: E402

from smartsam.agent import SmartSAMAgent  # noqa: E402
from smartsam.backbones.base import Prompt  # noqa: E402
from smartsam.clickers import NextChainClicker  # noqa: E402
from smartsam.io import load_image  # noqa: E402
from smartsam.models import load_backbone, load_features  # noqa: E402
from smartsam.sampler import PrioriInitialSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "datasets" / "GrabCut" / "img" / "106024.jpg"


def median_time(fn, repeats: int, device) -> float:
    ts = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    ap.add_argument("--checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()

    bb = load_backbone(args.backbone, args.checkpoint, args.device)
    image = load_image(args.image)
    h, w = image.shape[:2]
    click = (w * 0.5, h * 0.55)
    weights = "RANDOM weights (timing only)" if bb.random_weights else (args.checkpoint or "registry checkpoint")
    print(f"# SmartSAM latency: {bb.name} ({weights}) on {args.device}; image {w}x{h}")
    print(f"machine: {machine()}\n")

    rows = []
    # plain backbone
    bb._cache.clear()
    t = time.perf_counter()
    bb.set_image(image)
    enc = time.perf_counter() - t

    def plain():
        r = bb.predict([Prompt([click], [1])], multimask=True)
        bb.upsample(r.low_res_logits[0, [int(np.argmax(r.scores[0]))]])

    dec0 = bb.decoder_calls
    plain_s = median_time(plain, args.repeats, args.device)
    rows.append(["plain backbone", "first click (new image)", enc, plain_s, 0.0, enc + plain_s, 1, (bb.decoder_calls - dec0) // args.repeats])
    rows.append(["plain backbone", "later click (cached)", 0.0, plain_s, 0.0, plain_s, 0, (bb.decoder_calls - dec0) // args.repeats])
    for label, dedupe in [("SmartSAM fast path", 0.9), ("SmartSAM literal", None)]:
        agent = SmartSAMAgent(bb, dedupe_iou=dedupe)
        agent.set_image(image)
        res = []
        for k in range(args.repeats):
            agent._results.clear()
            res.append(agent.predict((click[0] + k * 0.01, click[1])))  # a new click each time: no result cache
        dec = float(np.median([r.timings["initial"] + r.timings["chains"] for r in res]))
        sel = float(np.median([r.timings["select"] + r.timings["upsample"] for r in res]))
        calls = res[0].calls["decoder"]
        rows.append([label, "first click (new image)", enc, dec, sel, enc + dec + sel, 1, calls])
        rows.append([label, "later click (cached)", 0.0, dec, sel, dec + sel, 0, calls])
    # reference selection cost (DINOv2 tiny random: structure only)
    feats = load_features("dinov2-tiny-random" if bb.random_weights else "dinov2-base", args.device)
    agent = SmartSAMAgent(bb, image_features=feats)
    agent.set_image(image)
    m = np.zeros(image.shape[:2], bool)
    m[h // 4: h // 2, w // 4: w // 2] = True
    ref = agent.reference_from_mask(image, m)
    r = agent.predict(click, ref)
    rows.append([f"SmartSAM reference ({feats.name})", "later click (cached)", 0.0, r.timings["initial"] + r.timings["chains"],
                 r.timings["select"] + r.timings["upsample"], r.timings["total"], 0, r.calls["decoder"]])
    print(table(["method", "click", "encoder s", "decoder s", "select+upsample s", "total s", "encoder calls", "decoder calls"], rows))
    print(f"\npeak RSS: {peak_rss_mb():.0f} MB" + (f"; peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if args.device.startswith("cuda") else ""))

    # Chunked decoding: the same 30 chained prompts, decoded in chunks of k prompts per pass.
    bb.set_image(image)
    init = bb.predict([Prompt([click], [1]) for _ in range(10)], multimask=True)
    chained = [Prompt([click, (w * 0.2, h * 0.2)], [1, 0], mask_input=init.low_res_logits[i // 3, i % 3]) for i in range(30)]
    rows, default_chunk = [], bb.decode_chunk
    for k in (1, 2, 4, 8, 30):
        bb.decode_chunk = k
        rows.append([k, median_time(lambda: bb.predict(chained, multimask=False), args.repeats, args.device)])
    bb.decode_chunk = default_chunk
    print("\n## One decoder call of 30 chained prompts, by prompts per forward pass\n")
    print(table(["prompts per pass", "seconds"], rows))

    if args.skip_scaling:
        return
    print("\n## How the cost grows (later clicks, cached embedding, fast path)\n")
    rows = []
    for n_points, aspects in [(0, ()), (1, ()), (3, (1.0,)), (6, (0.67, 1.0, 1.5))]:
        agent = SmartSAMAgent(bb, sampler=PrioriInitialSampler(num_points=n_points, box_aspects=aspects))
        agent.set_image(image)
        r = agent.predict(click)
        rows.append(["initial prompts", 1 + n_points + len(aspects), r.timings["total"], r.calls["decoder"]])
    for chain in range(0, 6):
        agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=chain))
        agent.set_image(image)
        r = agent.predict(click)
        rows.append(["chain length", chain, r.timings["total"], r.calls["decoder"]])
    for side in (320, 640, 1280):
        s = side / max(h, w)
        import cv2

        im = cv2.resize(image, (int(w * s), int(h * s)))
        agent = SmartSAMAgent(bb)
        t = time.perf_counter()
        agent.set_image(im)
        enc = time.perf_counter() - t
        r = agent.predict((im.shape[1] * 0.5, im.shape[0] * 0.55))
        rows.append(["image longest side", side, r.timings["total"], f"{r.calls['decoder']} (+ encoder {enc:.2f} s)"])
    print(table(["knob", "value", "agent s per click", "decoder calls"], rows))


if __name__ == "__main__":
    main()
