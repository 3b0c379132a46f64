"""The first click as an annotator meets it: through the real HTTP path, end to end.

    python benchmarks/first_click.py [--backbone NAME] [--images 5] [--chain-length 3]

Starts the real backend process (gunicorn) and a local image server standing in for Label
Studio's file endpoint, then for each of N GrabCut images sends Label Studio's interactive
``/predict`` request: the first click on a new image (request, image download, decode, encoder,
agent, RLE, answer) and a later click on the same image (embedding cached). Encoder and decoder
calls come from the backend's own counters (``/health``), not from assumptions. Prints the
median seconds and the calls per click. Random-weight backbones are fine for timing and labelled.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _common import machine, table  # noqa: E402
from backend_helpers import TOKEN, Backend, ImageServer, keypoint, predict_body  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "GrabCut" / "img"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--chain-length", type=int, default=3)
    ap.add_argument("--fast-path", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()

    import tempfile

    from PIL import Image

    files = sorted(p for p in DATA.iterdir() if p.suffix == ".jpg")[: args.images]
    server = ImageServer({p.name: p.read_bytes() for p in files})
    tmp = Path(tempfile.mkdtemp(prefix="smartsam-bench-"))
    b = Backend(tmp / "data", backbone=args.backbone, env={"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": TOKEN,
                                                            "SMARTSAM_CHAIN_LENGTH": str(args.chain_length),
                                                            "SMARTSAM_FAST_PATH": args.fast_path})
    b.log_path = tmp / "backend.log"
    b.start()
    try:
        h = b.health()
        weights = "RANDOM weights (timing only)" if h["random_weights"] else "real weights"
        print(f"# First click through HTTP: {h['model']} ({weights}) on {h['device']}, chain length {args.chain_length}, "
              f"fast path {args.fast_path}\nmachine: {machine()}\n")
        rows = {"first click (new image)": [], "later click (cached embedding)": []}
        calls = {k: [] for k in rows}
        path = None
        for p in files:
            w, hgt = Image.open(p).size
            for kind, (x, y) in (("first click (new image)", (50, 55)), ("later click (cached embedding)", (40, 45))):
                before = b.health()
                t = time.perf_counter()
                status, r = b.post("/predict", predict_body(f"/data/upload/1/{p.name}", [keypoint(x, y, w=w, h=hgt)]))
                rows[kind].append(time.perf_counter() - t)
                after = b.health()
                assert status == 200 and r["results"][0]["result"], r
                path = r["results"][0].get("path")
                calls[kind].append((after["encoder_calls"] - before["encoder_calls"], after["decoder_calls"] - before["decoder_calls"]))
        out = []
        for kind, ts in rows.items():
            enc = sorted({c[0] for c in calls[kind]})
            dec = sorted({c[1] for c in calls[kind]})
            out.append([kind, len(ts), statistics.median(ts), max(ts), "/".join(map(str, enc)), "/".join(map(str, dec))])
        print(table(["click", "requests", "median s", "max s", "encoder calls", "decoder calls"], out))
        print(f"\nagent path: {path}")
    finally:
        b.stop()
        server.close()


if __name__ == "__main__":
    main()
