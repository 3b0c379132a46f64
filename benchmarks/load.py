"""Several annotators clicking at once: latency (p50 / p95) and clicks per second.

    python benchmarks/load.py [--annotators 1,4,8] [--clicks 4] [--backbone NAME] [--device cpu|cuda]
                              [--prelabel] [--serial] [--http]

Each simulated annotator clicks on its own image (a GrabCut image; its first click encodes it),
every click a new one (no cached answer), and waits for the answer before the next.

In-process (the default): the backend's scheduler (:class:`backend.serving.scheduler.Scheduler`, its
row budgets for the device) over one backbone, as a worker process runs it. ``--serial`` adds
the same load answered one click at a time under one lock (how the backend served before the
scheduler). ``--prelabel`` adds rows with a pre-labeling queue running at the same time (agent
jobs of pre-labeling priority on other images, back to back).

``--http``: through the real backend process (gunicorn, launched as the README does) and a local
image server on 127.0.0.1: each annotator is a client thread posting /predict.
Bounded in count and time; prints one table.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"


def images(n: int) -> List[Path]:
    paths = sorted((DATA / "GrabCut" / "img").iterdir())
    return [paths[k % len(paths)] for k in range(n)]


def clicks_for(a: int, k: int, w: int, h: int):
    """Annotator ``a``'s ``k``-th click: new positions, inside the image's middle."""
    return (w * (0.3 + 0.05 * (k % 8)), h * (0.3 + 0.04 * ((k + a) % 10)))


def run_inprocess(args, n: int, mode: str) -> Dict[str, object]:
    """``mode``: "scheduler", "serial" (one click at a time under a lock) or "scheduler+prelabel"."""
    from backend.serving.scheduler import INTERACTIVE, PRELABEL, Scheduler, scheduler_rows
    from smartsam.agent import SmartSAMAgent
    from smartsam.clickers import NextChainClicker
    from smartsam.io import load_image
    from smartsam.models import load_backbone

    bb = load_backbone(args.backbone, device=args.device, cache_size=max(8, 2 * n + 4))
    agent = SmartSAMAgent(bb, clicker=NextChainClicker(chain_length=args.chain_length))
    imgs = [load_image(p) for p in images(n + 4)]
    sched = Scheduler(bb, **scheduler_rows(0, bb.device.type))
    lock = threading.Lock()  # --serial: one click at a time
    lat: List[float] = []
    lock_lat = threading.Lock()
    stop = threading.Event()

    def annotator(a: int) -> None:
        im = imgs[a]
        h, w = im.shape[:2]
        for k in range(args.clicks):
            job = agent.job(im, clicks_for(a, k, w, h), key=f"a{a}")
            t = time.perf_counter()
            if mode == "serial":
                with lock:
                    agent.run_jobs([job])
            else:
                sched.run([job], INTERACTIVE)
            dt = time.perf_counter() - t
            with lock_lat:
                lat.append(dt)

    def prelabeler() -> None:
        k = 0
        while not stop.is_set():
            im = imgs[n + k % 4]
            h, w = im.shape[:2]
            sched.run([agent.job(im, clicks_for(99, k, w, h), key=f"p{k % 4}")], PRELABEL)
            k += 1

    for im in imgs[n:n + 4]:  # the queue's images encoded before: it pre-labels, it does not wait
        bb.embed(im)
    bg = threading.Thread(target=prelabeler, daemon=True) if mode.endswith("prelabel") else None
    if bg:
        bg.start()
        time.sleep(1.0)
    d0 = bb.decoder_calls
    t0 = time.perf_counter()
    ths = [threading.Thread(target=annotator, args=(a,)) for a in range(n)]
    [t.start() for t in ths]
    [t.join() for t in ths]
    wall = time.perf_counter() - t0
    stop.set()
    if bg:
        bg.join(timeout=120)
    h = sched.health()
    sched.close()
    return {"mode": mode, "annotators": n, "clicks": len(lat), "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "per_s": len(lat) / wall,
            "decoder_per_click": (bb.decoder_calls - d0) / max(len(lat), 1),
            "batch_jobs_p50": h["batch_jobs"].get("p50", 0) if mode != "serial" else 1}


def run_http(args, n: int) -> Dict[str, object]:
    from PIL import Image

    from backend_helpers import TOKEN, Backend, ImageServer, keypoint, predict_body

    paths = images(n)
    files = {f"{a}-{p.name}": p.read_bytes() for a, p in enumerate(paths)}
    names = list(files)
    server = ImageServer(files)
    tmp = Path(tempfile.mkdtemp(prefix="smartsam-load-"))
    env = {"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN, "SMARTSAM_DEVICE": args.device}
    b = Backend(tmp / "data", env=env, backbone=args.backbone, run_sh=True).start()
    lat: List[float] = []
    lock = threading.Lock()

    def annotator(a: int) -> None:
        w, h = Image.open(io.BytesIO(files[names[a]])).size
        for k in range(args.clicks):
            x, y = clicks_for(a, k, w, h)
            body = predict_body(f"/data/upload/{names[a]}", [keypoint(100 * x / w, 100 * y / h, w=w, h=h)],
                                project=f"{a + 1}.1")
            t = time.perf_counter()
            status, r = b.post("/predict", body)
            dt = time.perf_counter() - t
            assert status == 200 and r["results"][0]["result"], r
            with lock:
                lat.append(dt)

    try:
        d0 = b.health()["decoder_calls"]
        t0 = time.perf_counter()
        ths = [threading.Thread(target=annotator, args=(a,)) for a in range(n)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        wall = time.perf_counter() - t0
        h = b.health()
    finally:
        b.stop()
        server.close()
    return {"mode": "http", "annotators": n, "clicks": len(lat), "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "per_s": len(lat) / wall,
            "decoder_per_click": (h["decoder_calls"] - d0) / max(len(lat), 1),
            "batch_jobs_p50": h["scheduler"]["batch_jobs"].get("p50", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", default="1,4,8", help="comma-separated team sizes")
    ap.add_argument("--clicks", type=int, default=4, help="clicks per annotator (each a new agent click)")
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--chain-length", type=int, default=3)
    ap.add_argument("--serial", action="store_true", help="also one click at a time under a lock (before the scheduler)")
    ap.add_argument("--prelabel", action="store_true", help="also with a pre-labeling queue running")
    ap.add_argument("--http", action="store_true", help="through the real backend process instead of in-process")
    args = ap.parse_args()
    rows = []
    for n in [int(v) for v in args.annotators.split(",")]:
        runs = [lambda: run_http(args, n)] if args.http else \
            [lambda m=m: run_inprocess(args, n, m) for m in
             ["scheduler"] + (["serial"] if args.serial else []) + (["scheduler+prelabel"] if args.prelabel else [])]
        for run in runs:
            r = run()
            rows.append([r["mode"], r["annotators"], r["clicks"], r["p50"], r["p95"], r["per_s"], r["decoder_per_click"],
                         r["batch_jobs_p50"]])
            print(f"  done: {rows[-1]}", file=sys.stderr)
    print(f"# {'through HTTP' if args.http else 'in-process'}: annotators clicking at once, {args.clicks} new agent clicks "
          f"each, {args.backbone} on {args.device}, chains of {args.chain_length}"
          f"{' (RANDOM weights: timing only)' if args.backbone.endswith('-random') else ''}\nmachine: {machine()}\n")
    print(table(["mode", "annotators", "clicks", "p50 s", "p95 s", "clicks/s", "decoder calls per click", "jobs per step (p50)"],
                rows))


if __name__ == "__main__":
    main()
