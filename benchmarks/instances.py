""""All like this one" cost: seconds per task against instances per image, with the call counters.

    python benchmarks/instances.py [--backbone NAME] [--device cpu|cuda] [--instances 1 5 20] [--repeats 2]
                                   [--round-size 1 16]

One pre-labeling task = the image's encoding (cached after the first), the feature model's patch
tokens (once per image), then one agent run per instance (reference mode), ``--round-size`` of
them at a time as one batch of jobs (the backend: 1 on a CPU, 16 on CUDA). RANDOM weights: every
proposal is answered and kept (threshold -1, no de-duplication), so a task finds exactly the
instances asked for; the timing does not depend on the weights. Image: GrabCut 106024.jpg.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table  # noqa: E402

IMAGE = ROOT.parent / "shared" / "datasets" / "GrabCut" / "img" / "106024.jpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="sam2.1_hiera_small-random", help="default: the CPU default's architecture")
    ap.add_argument("--features", default="dinov2-tiny-random")
    ap.add_argument("--device")
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--round-size", type=int, nargs="+", default=[1, 16], help="proposals run as one batch of jobs")
    args = ap.parse_args()
    from smartsam.agent import SmartSAMAgent
    from smartsam.features import FeatureSet
    from smartsam.instances import InstanceFinder
    from smartsam.io import load_image
    from smartsam.models import load_backbone, load_features

    image = load_image(IMAGE)
    bb = load_backbone(args.backbone, device=args.device)
    feats = FeatureSet(load_features(args.features, args.device))
    agent = SmartSAMAgent(bb, features=feats)
    h, w = image.shape[:2]
    mask = image[..., 0] > -1
    mask[: h // 3] = False
    ref = agent.references.from_mask(image, mask)
    t = time.perf_counter()
    agent.set_image(image)
    feats.get("image").tokens(image)
    first = time.perf_counter() - t
    rows = []
    for n, rs in [(n, rs) for rs in args.round_size for n in args.instances]:
        times, found = [], 0
        enc0, dec0, f0 = bb.encoder_calls, bb.decoder_calls, feats.get("image").forward_calls
        for r in range(args.repeats):
            t = time.perf_counter()
            key = agent.set_image(image)
            # every proposal answered and kept (random weights: masks say nothing), so n agent runs
            finder = InstanceFinder(agent, max_instances=n, threshold=-1.0, dedupe_iou=1.01, containment=1.01, adaptive=False,
                                    skip_covered=False, round_size=rs)
            found = len(finder.find(image, ref, key))
            times.append(time.perf_counter() - t)
        best = min(times)
        rows.append([rs, n, found, best, best / max(found, 1), (bb.encoder_calls - enc0) / args.repeats,
                     (bb.decoder_calls - dec0) / args.repeats, (feats.get("image").forward_calls - f0) / args.repeats])
    print(f"# all like this one: {bb.name} on {bb.device}{' (RANDOM weights: timing only)' if bb.random_weights else ''}, "
          f"features {args.features}, {agent.path} path, chains of {agent.clicker.chain_length}\n"
          f"machine: {machine()}\nfirst sight of the image (encoder + patch tokens): {first:.2f} s\n")
    print(table(["round size", "instances asked", "found", "s per task (cached image)", "s per instance", "encoder calls", "decoder calls",
                 "feature calls"], rows))


if __name__ == "__main__":
    main()
