"""A click beside busy neighbours: the backend on a shared box (Label Studio, another replica, a job).

    python benchmarks/contention.py [--backbone NAME] [--clicks 3] [--busy 0,1,2] [--rounds 2]
                                    [--policies passive,active]

The backend is launched as the README does (``run.sh``, its defaults: threads per worker from the
usable cores) once per wait policy (``SMARTSAM_WAIT_POLICY``), the policies interleaved round by
round (A B A B: these machines drift). In each launch a GrabCut image is encoded by a first click,
then each condition clicks ``--clicks`` times on it, each click a new position (no cached
answer), with 0, 1 or 2 busy processes (``python -c "while True: pass"``) running beside it.
Prints each condition's median click through HTTP and its ratio to the same policy's click alone.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table  # noqa: E402
from backend_helpers import BUSY  # noqa: E402  (a hog that ends with this process)

DATA = ROOT.parent / "shared" / "datasets"
# named variants; any other name is a SMARTSAM_WAIT_POLICY value (adaptive, passive, spin:<n>, active)
VARIANTS = {
    # what the backend did before threads were planned: torch's threads = the machine's cores, OpenMP's
    # default wait (GNU OpenMP: 300,000 spins), nothing adapting
    "before": {"SMARTSAM_WAIT_POLICY": "spin:300000", "SMARTSAM_TORCH_THREADS": str(__import__("os").cpu_count())},
}


def run(policy: str, backbone: str, clicks: int, busy_counts: List[int], k0: int) -> Dict[int, List[float]]:
    from backend_helpers import TOKEN, Backend, ImageServer, keypoint, predict_body

    img = (DATA / "GrabCut" / "img" / "106024.jpg").read_bytes()
    server = ImageServer({"penguin.jpg": img})
    tmp = Path(tempfile.mkdtemp(prefix="smartsam-contention-"))
    env = {"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN, **VARIANTS.get(policy, {"SMARTSAM_WAIT_POLICY": policy})}
    b = Backend(tmp / "data", backbone=backbone, run_sh=True, env=env).start()
    out: Dict[int, List[float]] = {}
    try:
        def click(k: int) -> float:
            body = predict_body("/data/upload/1/penguin.jpg", [keypoint(30 + (k * 7) % 40, 30 + (k * 11) % 40)])
            t0 = time.perf_counter()
            status, r = b.post("/predict", body)
            took = time.perf_counter() - t0
            assert status == 200 and r["results"][0]["result"], r
            return took

        click(k0)  # encodes the image: every click below is on a cached image
        k = k0 + 1
        for n in busy_counts:
            hogs = [subprocess.Popen(BUSY) for _ in range(n)]
            try:
                time.sleep(1.0)
                out[n] = []
                for _ in range(clicks):
                    out[n].append(click(k))
                    k += 1
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
        threads = b.health()["compute_threads"] or b.health()["threads_per_worker"]
    finally:
        b.stop()
        server.close()
    print(f"  {policy}: compute threads {threads}; " +
          ", ".join(f"{n} busy: {', '.join(f'{t:.2f}' for t in ts)} s" for n, ts in out.items()), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    ap.add_argument("--clicks", type=int, default=3)
    ap.add_argument("--busy", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policies", default="before,adaptive,passive")
    args = ap.parse_args(argv)
    busy = [int(x) for x in args.busy.split(",")]
    policies = args.policies.split(",")
    print(f"machine: {machine()}; backbone {args.backbone} (random weights: speed does not depend on them)")
    times: Dict[Tuple[str, int], List[float]] = {}
    for r in range(args.rounds):
        for p in policies:  # A B A B
            for n, ts in run(p, args.backbone, args.clicks, busy, 1000 * r).items():
                times.setdefault((p, n), []).extend(ts)
    rows = []
    for p in policies:
        alone = statistics.median(times[(p, 0)]) if (p, 0) in times else None
        for n in busy:
            med = statistics.median(times[(p, n)])
            rows.append([p, n, len(times[(p, n)]), med, f"{med / alone:.2f}x" if alone else "-"])
    print(table(["wait policy", "busy processes beside", "clicks", "median click (s)", "vs alone"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
