"""Pre-label a whole Label Studio project on Ray: one machine out of the box, or a cluster.

    python -m backend.prelabel --project ID [--ray-address auto|ADDR] [--workers N] [--limit N]
                               [--label L (--reference-text T | --reference-image I --reference-mask M)]
    python -m backend.prelabel --project ID --embed-only     (precompute embeddings for the backend)

Reads the project's tasks page by page through ``label-studio-sdk``, skips tasks that already
carry this model version's prediction (so re-runs are idempotent and resume), runs image fetch +
encoder + agent + selection on Ray Data actors that each hold the models (one per GPU, or CPU
actors), and writes the predictions back in batches from the driver alone, once per task. A task
whose image fails is reported and the run goes on; a killed worker is restarted by Ray and its
tasks retried. References come from the backend's store (``SMARTSAM_DATA_DIR``) and/or the
command line. Settings are the backend's environment variables (``LABEL_STUDIO_URL``,
``LABEL_STUDIO_API_KEY``, ``SMARTSAM_BACKBONE``, ...); ``SMARTSAM_EMBED_CACHE_DIR`` makes the
workers fill the embedding cache the interactive backend reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, Iterator, List, Optional

import numpy as np

log = logging.getLogger("smartsam.prelabel")

PASS_ENV = ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "SMARTSAM_BACKBONE", "SMARTSAM_CHECKPOINT", "SMARTSAM_FEATURES",
            "SMARTSAM_TEXT_FEATURES", "SMARTSAM_DEVICE", "SMARTSAM_DATA_DIR", "SMARTSAM_HOME", "SMARTSAM_EMBED_CACHE_DIR",
            "SMARTSAM_EMBED_CACHE_BYTES", "SMARTSAM_ALLOWED_HOSTS", "LOCAL_FILES_DOCUMENT_ROOT", "SMARTSAM_SEED",
            "SMARTSAM_IMAGE_TIMEOUT", "SMARTSAM_IMAGE_MAX_BYTES", "SMARTSAM_MAX_PIXELS", "HF_HOME", "HF_HUB_OFFLINE")


class PrelabelWorker:
    """A Ray Data actor: holds the models, turns a batch of tasks into predictions."""

    def __init__(self, env: Dict[str, str], label_config: str, project: str, embed_only: bool = False) -> None:
        os.environ.update(env)
        import torch

        torch.set_num_threads(int(env.get("SMARTSAM_WORKER_THREADS", "1")))
        from .config import Settings
        from .model import Engine, SmartSAMBackend

        self.engine = Engine(Settings())
        self.engine._load()  # synchronously: this actor exists to run the model
        self.model = SmartSAMBackend(label_config=label_config, engine=self.engine)
        self.project = project
        self.embed_only = embed_only

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, List]:
        out = {"task_id": [], "prediction": [], "error": [], "seconds": []}
        for raw in batch["task"]:
            task = json.loads(raw)
            t = time.perf_counter()
            if self.embed_only:  # fill the embedding cache only (the backend reads it)
                pred, errors = self._embed(task)
            else:
                pred = self.model.predict([task], project=self.project)[0]
                errors = list(self.model.errors)
            out["task_id"].append(int(task["id"]))
            out["prediction"].append(json.dumps(pred) if pred else "")
            out["error"].append("; ".join(errors))
            out["seconds"].append(time.perf_counter() - t)
        return out


    def _embed(self, task):
        from .images import ImageFetchError
        from .model import LabelConfig

        try:
            image = self.model._image(task, LabelConfig.parse(self.model.parsed_label_config))
        except (ImageFetchError, ValueError) as e:
            return {}, [str(e)]
        bb = self.engine.ready_agent().backbone
        with self.engine.lock:
            bb.set_image(image)
        return {"embedded": True}, []


def iter_tasks(client, project: int, page_size: int = 100) -> Iterator[Dict]:
    """Every task of the project with its predictions' model versions, page by page."""
    page = 1
    while True:
        try:
            resp = client.tasks.list(project=project, page=page, page_size=page_size, fields="all")
        except Exception as e:  # the SDK raises ApiError on the last page's 404
            if "404" in str(e) and page > 1:
                return
            raise
        items = list(resp.items or [])
        for t in items:
            d = t if isinstance(t, dict) else t.dict()
            yield {"id": d["id"], "data": d["data"],
                   "versions": [p.get("model_version") for p in (d.get("predictions") or []) if isinstance(p, dict)]}
        if len(items) < page_size:
            return
        page += 1


def set_cli_reference(args, store) -> None:
    """--label with --reference-text / --reference-image [--reference-mask]: store it first."""
    from .admin import reference_from_files
    from .config import Settings

    ref, mask, image = reference_from_files(Settings(), args.reference_image, args.reference_mask, args.reference_text)
    store.put(str(args.project), args.label, ref, {"prelabel": ref.kind, "image": args.reference_image}, mask=mask,
              image=image, how="admin")


def run(args) -> Dict[str, object]:
    import ray
    from label_studio_sdk import LabelStudio
    from tqdm import tqdm

    from smartsam import __version__
    from smartsam.models import default_backbone

    from .config import Settings
    from .references import ReferenceStore

    s = Settings()
    if not s.label_studio_url or not s.label_studio_api_key:
        raise SystemExit("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    os.environ.setdefault("SMARTSAM_BACKBONE", s.backbone or default_backbone())
    store = ReferenceStore(s.data_dir, exemplars=s.exemplars)
    if args.label:
        set_cli_reference(args, store)
    if not args.embed_only and not store.list(str(args.project)):
        raise SystemExit(f"error: project {args.project} has no reference: set one (--label with --reference-text / "
                         f"--reference-image, the admin API, or an annotation) before pre-labeling")
    from .model import checkpoint_tag, references_digest

    # the backend's model_version for this project: weights and references included, so a new
    # reference or checkpoint pre-labels again instead of skipping
    version = f"smartsam-{__version__}-{os.environ['SMARTSAM_BACKBONE']}-{checkpoint_tag(Settings())}-" \
              f"{references_digest(store, str(args.project))}"
    client = LabelStudio(base_url=s.label_studio_url, api_key=s.label_studio_api_key)
    try:
        label_config = client.projects.get(id=args.project).label_config
    except Exception as e:  # ApiError: 404 unknown project, 401 bad key, or no connection
        code = getattr(e, "status_code", None)
        raise SystemExit(f"error: cannot read project {args.project} from {s.label_studio_url}"
                         f"{f' (HTTP {code})' if code else ''}: {'no such project' if code == 404 else 'check LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY'}") from None
    todo, skipped = [], 0
    for t in iter_tasks(client, args.project):
        if version in t["versions"] and not args.embed_only:
            skipped += 1
            continue
        todo.append({"id": t["id"], "data": t["data"]})
        if args.limit and len(todo) >= args.limit:
            break
    summary = {"project": args.project, "model_version": version, "skipped": skipped, "done": 0, "failed": 0, "failures": []}
    if not todo:
        print(json.dumps(summary))
        return summary
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    env["SMARTSAM_WORKER_THREADS"] = str(args.threads)
    import torch

    gpus = 1 if torch.cuda.is_available() and not args.ray_address else 0
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in todo], override_num_blocks=len(todo))
    out = ds.map_batches(PrelabelWorker, fn_constructor_kwargs={"env": env, "label_config": label_config, "project": str(args.project),
                                                                  "embed_only": args.embed_only},
                         batch_size=1, concurrency=args.workers, num_cpus=0 if gpus else 1, num_gpus=gpus, batch_format="numpy")
    written, pending = set(), []
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="task", desc=f"pre-labeling project {args.project}")

    def flush():
        if pending:
            client.projects.import_predictions(id=args.project, request=pending)
            pending.clear()

    for row in out.iter_rows():
        tid = int(row["task_id"])
        if tid in written:  # a retried task's second answer: never two predictions
            continue
        written.add(tid)
        if row["prediction"] and args.embed_only:
            summary["done"] += 1
        elif row["prediction"]:
            pred = json.loads(row["prediction"])
            pending.append({"task": tid, "result": pred["result"], "score": pred.get("score"), "model_version": version})
            summary["done"] += 1
        else:
            summary["failed"] += 1
            summary["failures"].append({"task": tid, "reason": row["error"]})
            log.warning("task %s: %s", tid, row["error"])
        if len(pending) >= args.write_batch:
            flush()
        bar.update(1)
        rate = len(written) / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(done=summary["done"], failed=summary["failed"], img_s=f"{rate:.2f}")
    flush()
    bar.close()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["images_per_second"] = round(len(written) / max(summary["seconds"], 1e-9), 3)
    ray.shutdown()
    print(json.dumps(summary))
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.prelabel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=int, required=True)
    ap.add_argument("--ray-address", help="an existing cluster (auto or ADDRESS); default: start a local Ray")
    ap.add_argument("--workers", type=int, default=2, help="model-holding actors (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU actor (default 1)")
    ap.add_argument("--limit", type=int, help="at most N tasks this run")
    ap.add_argument("--write-batch", type=int, default=20, help="predictions per write to Label Studio")
    ap.add_argument("--embed-only", action="store_true", help="only fill the embedding cache (SMARTSAM_EMBED_CACHE_DIR) "
                    "for every task: the backend's first click on them then makes no encoder call")
    ap.add_argument("--label", help="set this label's reference from the options below first")
    ap.add_argument("--reference-text")
    ap.add_argument("--reference-image")
    ap.add_argument("--reference-mask")
    args = ap.parse_args(argv)
    if args.label and not (args.reference_text or args.reference_image):
        ap.error("--label needs --reference-text or --reference-image")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.embed_only and not os.environ.get("SMARTSAM_EMBED_CACHE_DIR"):
        ap.error("--embed-only needs SMARTSAM_EMBED_CACHE_DIR")
    summary = run(args)
    return 0 if not summary.get("failed") else 3


if __name__ == "__main__":
    sys.exit(main())
