"""How fast the field-statistics writer stores suggestions (the basis of FLUSH_TIMEOUT_S).

    python benchmarks/stats_writer.py [--database-url postgresql://...] [-n 500]

Queues ``n`` suggestions as a click does (a 481 x 321 disk mask and the brush region it is
served as in the shipped label_config.xml) and waits until the background writer has stored them: one transaction per
suggestion, its PNG, its region fingerprint. SQLite under a temporary directory unless a
database URL is given. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository

from backend.labelstudio.label_config import LabelConfig  # noqa: E402
from backend.labelstudio.regions import PolygonOptions, answer_results  # noqa: E402
from backend.store.db import safe_url  # noqa: E402
from backend.store.field_stats import QUEUE_MAX, FieldStats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--database-url", default=None)
    ap.add_argument("-n", type=int, default=QUEUE_MAX)
    args = ap.parse_args()
    yy, xx = np.ogrid[:321, :481]
    mask = (yy - 160) ** 2 + (xx - 240) ** 2 < 80**2
    cfg = LabelConfig.parse((ROOT / "label_config.xml").read_text())
    regions = answer_results(mask, cfg, "Object", 0.9, None, 40_000_000, PolygonOptions(8, 10), 0)[0]
    with tempfile.TemporaryDirectory() as d:
        st = FieldStats(Path(d), database_url=args.database_url)
        t0 = time.perf_counter()
        for k in range(args.n):
            st.record("1", k, "Object", "pure-is", "smartsam", 1, 0.05, mask, "bench", regions)
        st.flush(timeout=600)
        dt = time.perf_counter() - t0
        st.close()
    where = safe_url(args.database_url) if args.database_url else "SQLite (temporary directory)"
    print("| database | suggestions | seconds | suggestions/s | lost | dropped |")
    print("|---|---|---|---|---|---|")
    print(f"| {where} | {args.n} | {dt:.2f} | {args.n / dt:.0f} | {st.lost} | {st.dropped} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
