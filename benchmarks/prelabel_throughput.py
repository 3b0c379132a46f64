"""Pre-labeling throughput on a local Ray cluster for 1, 2 and 4 workers, with the time split.

    python benchmarks/prelabel_throughput.py [--images 12] [--workers 1 2 4] [--backbone NAME]

Serves GrabCut images from a local HTTP server standing in for Label Studio's file endpoint, and
runs the same Ray Data actor pipeline as ``python -m backend.cli.prelabel`` (a text reference, the
agent, selection), timing each stage inside the workers: image download, encoder, locating the
object, agent (initial + chains), selection + upsampling. Write-back to Label Studio is not part
of this benchmark (it is one batched API call per ``--write-batch`` tasks from the driver).
Also prints how a pre-embedded image changes the backend's first-click latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table  # noqa: E402
from backend_helpers import TOKEN, ImageServer  # noqa: E402

from backend.cli.prelabel import PrelabelWorker  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "GrabCut" / "img"


class TimedWorker(PrelabelWorker):
    """The pre-labeling actor, with each stage timed."""

    def __call__(self, batch):
        from smartsam.agent import locate

        out = {k: [] for k in ("download", "encoder", "locate", "agent", "select")}
        sv = self.services
        agent = sv.models.agent(sv.versions.agent_settings(self.project))
        for raw in batch["task"]:
            task = json.loads(raw)
            t0 = time.perf_counter()
            image = self.services.answers.image(task, self.model.cfg)
            t1 = time.perf_counter()
            key = agent.set_image(image)
            t2 = time.perf_counter()
            ref, _ = sv.versions.reference(self.project, "Object")
            click = locate(sv.models.features.get("text"), image, ref, key)
            t3 = time.perf_counter()
            r = agent.predict(click, ref)
            out["download"].append(t1 - t0)
            out["encoder"].append(t2 - t1)
            out["locate"].append(t3 - t2)
            out["agent"].append(r.timings["initial"] + r.timings["chains"])
            out["select"].append(r.timings["select"] + r.timings["upsample"])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--backbone", default="sam2.1_hiera_tiny-random")
    args = ap.parse_args()
    import ray

    from backend.store.references import ReferenceStore
    from smartsam.models import load_features
    from smartsam.selector import Reference

    names = sorted(p.name for p in DATA.iterdir() if p.suffix == ".jpg")[: args.images]
    server = ImageServer({n: (DATA / n).read_bytes() for n in names})
    tmp = Path(tempfile.mkdtemp(prefix="smartsam-prelabel-bench-"))
    store = ReferenceStore(tmp / "data")
    clip = load_features("clip-tiny-random")
    store.put("1", "Object", Reference("text", clip.text_feature("a thing"), clip.name, text="a thing"), {})
    from backend.config import Settings

    settings = Settings(label_studio_url=server.url, label_studio_api_key=TOKEN, backbone=args.backbone,
                        data_dir=tmp / "data")
    label_config = (ROOT / "label_config.xml").read_text()
    tasks = [json.dumps({"id": i, "data": {"image": f"/data/upload/{n}"}}) for i, n in enumerate(names)]
    rows = []
    for w in args.workers:
        ray.init(num_cpus=w, include_dashboard=False, log_to_driver=False)
        ds = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=len(tasks))
        t0 = time.perf_counter()
        res = ds.map_batches(TimedWorker, fn_constructor_kwargs={"settings": settings, "label_config": label_config, "project": "1"},
                             batch_size=1, concurrency=w, num_cpus=1, batch_format="numpy").take_all()
        wall = time.perf_counter() - t0
        ray.shutdown()
        stages = {k: float(np.sum([r[k] for r in res])) for k in ("download", "encoder", "locate", "agent", "select")}
        total = sum(stages.values())
        rows.append([w, len(res), wall, len(res) / wall] + [f"{100 * v / total:.0f}%" for v in stages.values()])
    server.close()
    # First click in the backend on a new image: encoder vs. a pre-embedded one (disk cache).
    from smartsam.agent import SmartSAMAgent
    from smartsam.embed_cache import EmbeddingDiskCache
    from smartsam.io import load_image
    from smartsam.models import load_backbone

    cache = EmbeddingDiskCache(tmp / "emb")
    image = load_image(DATA / names[0])
    first = []
    for label, pre in [("not embedded", False), ("pre-embedded", True)]:
        bb = load_backbone(args.backbone)
        bb.disk_cache = cache
        if pre:  # as `smartsam embed` or pre-labeling would have, in another process
            filler = load_backbone(args.backbone)
            filler.disk_cache = cache
            filler.set_image(image)
        agent = SmartSAMAgent(bb)
        t = time.perf_counter()
        agent.set_image(image)
        t_img = time.perf_counter() - t
        r = agent.predict((image.shape[1] / 2, image.shape[0] / 2))
        first.append([label, t_img, r.timings["total"], t_img + r.timings["total"], bb.encoder_calls])
    print(f"# pre-labeling throughput on a local Ray: {args.backbone}"
          f"{' (RANDOM weights: timing only)' if args.backbone.endswith('-random') else ''}, {args.images} GrabCut images\n"
          f"machine: {machine()}\n")
    print(table(["workers", "images", "wall s (incl. actor start)", "images/s", "download", "encoder", "locate", "agent", "select"], rows))
    print("\n## Backend first click on a new image\n")
    print(table(["image", "embedding s (encode or disk)", "agent s", "first click s", "encoder calls"], first))


if __name__ == "__main__":
    main()
