"""Pre-label a whole Label Studio project on Ray: one machine out of the box, or a cluster.

    python -m backend.cli.prelabel --project ID [--ray-address auto|ADDR] [--workers N] [--limit N]
                               [--label L (--reference-text T | --reference-image I --reference-mask M)]
    python -m backend.cli.prelabel --project ID --embed-only     (precompute embeddings for the backend)

Reads the project's tasks page by page through the backend's Label Studio client (task lists
that never make Label Studio predict), skips tasks that already
carry this model version's prediction (so re-runs are idempotent and resume), runs image fetch +
encoder + agent + selection on Ray Data actors that each hold the models (one per GPU, or CPU
actors), and writes the predictions back in batches from the driver alone, once per task. A task
whose image fails is reported and the run goes on; a killed worker is restarted by Ray and its
tasks retried. References come from the backend's store (``SMARTSAM_DATA_DIR``) and/or the
command line. Settings are the backend's (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``,
``SMARTSAM_BACKBONE``, ...), read once by the driver and handed to every worker as one pickled
``Settings``; ``SMARTSAM_EMBED_CACHE_DIR`` makes the workers fill the embedding cache the
interactive backend reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from backend.config import Settings

log = logging.getLogger("smartsam.prelabel")


class PrelabelWorker:
    """A Ray Data actor: holds the models, turns a batch of tasks into predictions.

    Args:
        settings: the driver's :class:`Settings`, pickled by Ray: every worker runs exactly the
            driver's settings (agent, backbone, limits), whatever its own environment says.
        label_config: the project's labeling config.
        project: the project id.
        embed_only: only fill the embedding cache.
        threads: torch threads of this actor.
    """

    def __init__(self, settings: Settings, label_config: str, project: str, embed_only: bool = False,
                 threads: int = 1) -> None:
        import torch

        torch.set_num_threads(int(threads))
        from backend.server import Services

        self.services = Services(settings, load=False)
        self.services.models.load()  # synchronously: this actor exists to run the model
        self.model = self.services.backend(label_config)
        self.project = project
        self.embed_only = embed_only

    def effective(self) -> Dict[str, object]:
        """What this worker runs with (the test that every setting reaches a worker reads it)."""
        sv = self.services
        a = sv.models.agent(sv.versions.agent_settings(self.project))
        bb = sv.models.backbone
        return {"settings": sv.settings, "agent_settings": sv.versions.agent_settings(self.project),
                "chain_length": a.clicker.chain_length, "dedupe_iou": a.dedupe_iou, "require_click": a.require_click,
                "seed": a.seed, "reference_prep": a.references.reference_prep, "backbone": bb.name,
                "cpu_bf16": bb.cpu_bf16, "shared_decoder": getattr(bb, "shared_decoder", None),
                "embed_cache": str(bb.disk_cache.root) if bb.disk_cache is not None else None,
                "model_version": sv.versions.model_version(self.project)}

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
        from backend.errors import ImageFetchError

        try:
            self.services.answers.embed(task, self.model.cfg)
        except (ImageFetchError, ValueError) as e:
            return {}, [str(e)]
        return {"embedded": True}, []


def set_cli_reference(args, settings: Settings, store) -> None:
    """--label with --reference-text / --reference-image [--reference-mask]: store it first."""
    from backend.cli.references import reference_from_files

    ref, mask, image = reference_from_files(settings, args.reference_image, args.reference_mask, args.reference_text)
    store.put(str(args.project), args.label, ref, {"prelabel": ref.kind, "image": args.reference_image}, mask=mask,
              image=image, how="admin")


HF_CACHE_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "XDG_CACHE_HOME")


def run(args, settings: Optional[Settings] = None) -> Dict[str, object]:
    import ray
    from tqdm import tqdm

    from backend.errors import ImageFetchError
    from backend.labelstudio.client import LabelStudioClient
    from backend.server import open_stores
    from backend.serving.models import Models
    from backend.serving.versions import Versions

    s = (settings or Settings.from_env()).resolved()
    if args.embed_only and not s.embed_cache_dir:
        raise SystemExit("error: --embed-only needs SMARTSAM_EMBED_CACHE_DIR")
    if not s.label_studio_url or not s.label_studio_api_key:
        raise SystemExit("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    store, project_settings, stats = open_stores(s)
    # the model version the backend's way; the models load in the workers, not here
    versions = Versions(s, Models(s), store, project_settings, stats)
    project = str(args.project)
    if args.label:
        set_cli_reference(args, s, store)
    if not args.embed_only and not store.list(project):
        raise SystemExit(f"error: project {args.project} has no reference: set one (--label with --reference-text / "
                         f"--reference-image, the admin API, or an annotation) before pre-labeling")
    # the backend's model_version for this project, computed the backend's way: weights,
    # references and agent settings included, so a change pre-labels again instead of skipping
    version = versions.model_version(project)
    client = LabelStudioClient(s)
    try:
        label_config = client.project(args.project).get("label_config")
    except ImageFetchError as e:
        raise SystemExit(f"error: cannot read project {args.project} from {s.label_studio_url}"
                         f"{f' (HTTP {e.status})' if e.status else ''}: "
                         f"{'no such project' if e.status == 404 else 'check LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY'}") from None
    todo, skipped = [], 0
    for t in client.tasks(args.project):  # task lists that never make Label Studio predict
        versions = [p.get("model_version") for p in (t.get("predictions") or []) if isinstance(p, dict)]
        if version in versions and not args.embed_only:
            skipped += 1
            continue
        todo.append({"id": t["id"], "data": t["data"]})
        if args.limit and len(todo) >= args.limit:
            break
    summary = {"project": args.project, "model_version": version, "skipped": skipped, "done": 0, "failed": 0, "failures": []}
    if not todo:
        print(json.dumps(summary))
        return summary
    # Settings travel pickled (checkpoint sources included); the Hugging Face cache the feature
    # models load from is the hub library's own variables, which the workers need too
    runtime_env = {"env_vars": {k: os.environ[k] for k in HF_CACHE_ENV if os.environ.get(k)}}
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    import torch

    gpus = 1 if torch.cuda.is_available() and not args.ray_address else 0
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in todo], override_num_blocks=len(todo))
    out = ds.map_batches(PrelabelWorker, fn_constructor_kwargs={"settings": s, "label_config": label_config, "project": project,
                                                                  "embed_only": args.embed_only, "threads": args.threads},
                         batch_size=1, concurrency=args.workers, num_cpus=0 if gpus else 1, num_gpus=gpus, batch_format="numpy")
    written, pending = set(), []
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="task", desc=f"pre-labeling project {args.project}")

    def flush():
        if pending:
            client.import_predictions(args.project, pending)
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
    ap = argparse.ArgumentParser(prog="python -m backend.cli.prelabel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=int, required=True)
    ap.add_argument("--ray-address", help="an existing cluster (auto or ADDRESS); default: start a local Ray")
    ap.add_argument("--workers", type=int, default=2, help="model-holding actors (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU actor (default 1)")
    ap.add_argument("--limit", type=int, help="at most N tasks this run")
    ap.add_argument("--write-batch", type=int, default=20, help="predictions per write to Label Studio")
    ap.add_argument("--embed-only", action="store_true", help="only fill the embedding cache (SMARTSAM_EMBED_CACHE_DIR) "
                    "for every task: the backend's first click on them then makes no encoder call")
    ap.add_argument("--max-instances", type=int, help="at most N instances per label and task (default "
                    "$SMARTSAM_MAX_INSTANCES, else 20)")
    ap.add_argument("--label", help="set this label's reference from the options below first")
    ap.add_argument("--reference-text")
    ap.add_argument("--reference-image")
    ap.add_argument("--reference-mask")
    args = ap.parse_args(argv)
    if args.label and not (args.reference_text or args.reference_image):
        ap.error("--label needs --reference-text or --reference-image")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from backend.errors import SettingsError

    try:
        settings = Settings.from_env()
        if args.max_instances is not None:
            settings = settings.replace(max_instances=args.max_instances)
    except SettingsError as e:
        ap.error(str(e))
    if args.embed_only and not settings.embed_cache_dir:
        ap.error("--embed-only needs SMARTSAM_EMBED_CACHE_DIR")
    summary = run(args, settings)
    return 0 if not summary.get("failed") else 3


if __name__ == "__main__":
    sys.exit(main())
