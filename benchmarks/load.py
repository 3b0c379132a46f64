"""Throughput and latency of the running backend under several concurrent annotators.

    python benchmarks/load.py [--clients 4] [--clicks 25] [--backbone NAME]

Starts the real backend (gunicorn) and a local image server on 127.0.0.1, then each client
clicks on its own image and project: a first click every 5 clicks (the agent), refinements in
between (one decoder call each). Bounded in count and time; prints p50/p95 per kind of click.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table  # noqa: E402
from backend_helpers import TOKEN, Backend, ImageServer, keypoint, predict_body  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--clicks", type=int, default=25)
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    args = ap.parse_args()
    names = sorted(p.name for p in (DATA / "GrabCut" / "img").iterdir())[: args.clients]
    files = {n: (DATA / "GrabCut" / "img" / n).read_bytes() for n in names}
    server = ImageServer(files)
    tmp = Path(tempfile.mkdtemp(prefix="smartsam-load-"))
    b = Backend(tmp / "data", env={"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN}, backbone=args.backbone).start()
    lat = {"first click": [], "refinement": []}
    lock = threading.Lock()

    def client(c: int) -> None:
        from PIL import Image
        import io

        w, h = Image.open(io.BytesIO(files[names[c]])).size
        url = f"/data/upload/{names[c]}"
        first = None
        for k in range(args.clicks):
            if k % 5 == 0:
                first = keypoint(30 + 8 * (k // 5), 40 + 5 * c, w=w, h=h)
                ctx, kind = [first], "first click"
            else:
                ctx, kind = [first, keypoint(10 + 15 * (k % 5), 20, positive=False, w=w, h=h)], "refinement"
            t = time.perf_counter()
            status, r = b.post("/predict", predict_body(url, ctx, project=f"{c + 1}.1"))
            dt = time.perf_counter() - t
            assert status == 200 and r["results"][0]["result"], r
            with lock:
                lat[kind].append(dt)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    wall = time.perf_counter() - t0
    b.stop()
    server.close()
    rows = []
    for kind, v in lat.items():
        if v:
            rows.append([kind, len(v), float(np.percentile(v, 50)), float(np.percentile(v, 95))])
    total = sum(len(v) for v in lat.values())
    print(f"# backend under load: {args.clients} clients x {args.clicks} clicks, {args.backbone}"
          f"{' (RANDOM weights: timing only)' if args.backbone.endswith('-random') else ''}\nmachine: {machine()}\n")
    print(table(["request", "count", "p50 s", "p95 s"], rows))
    print(f"\n{total} requests in {wall:.1f} s: {total / wall:.2f} requests/s")


if __name__ == "__main__":
    main()
