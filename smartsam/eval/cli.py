"""``smartsam eval``: the standard protocol on a dataset folder, for one mode."""

from __future__ import annotations

import json
from pathlib import Path


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate on a benchmark (mIoU@1, Ratio@K, NoC@K, IoU_best)", description=
                       "Run the standard click protocol (first click at the object's middle, then at the middle of "
                       "the larger error region) on a dataset in the RITM layout and write <mode>.csv, <mode>.json and "
                       "miou_vs_clicks.png to --out. Re-running with the same --out resumes.")
    e.add_argument("--dataset", required=True, help="dataset folder with img/ and gt/ (e.g. ../shared/datasets/GrabCut)")
    e.add_argument("--mode", required=True, choices=["backbone", "pure-is", "reference", "oracle", "empty"],
                   help="backbone: plain SAM; pure-is: SmartSAM without reference; reference: SmartSAM with another "
                   "instance of the same category as reference (COCO_MVal); oracle/empty: harness checks")
    e.add_argument("--max-clicks", type=int, default=20)
    e.add_argument("--trials", type=int, default=5, help="repeats with seeds SEED..SEED+N-1, mean and spread reported "
                   "(default 5, as the paper)")
    e.add_argument("--limit", type=int, help="first N samples only")
    e.add_argument("--stop-iou", type=float, default=1.01, help="stop a sample's clicks at this IoU (default: never)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--exemplars", type=int, default=1, help="reference mode: K references per object, the next K "
                   "instances of its category; the best similarity to any wins (default 1, the paper)")
    e.add_argument("--no-progress", action="store_true")
    from ..cli import _add_model_args

    _add_model_args(e)


def cmd_eval(args) -> int:
    from ..cli import UsageError
    from .datasets import load_dataset, load_sample

    try:
        all_samples = load_dataset(Path(args.dataset))  # references may come from past --limit
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    return run_eval(args, all_samples, Path(args.dataset).resolve().name, load_sample)


def run_eval(args, all_samples, dataset: str, loader) -> int:
    """The protocol for ``args.mode`` on ``all_samples`` (first ``--limit``), read by ``loader``
    (sample -> image, ground truth, ignore mask); prints the table, writes the outputs. Shared by
    ``smartsam eval`` and the backend's project evaluation."""
    from ..cli import UsageError, cli_agent_options, cli_load_backbone, cli_load_features
    from .datasets import references_for
    from .runner import evaluate
    from .segmenters import AgentSegmenter, BackboneSegmenter, EmptySegmenter, OracleSegmenter

    samples = all_samples[: args.limit] if args.limit else all_samples
    if args.max_clicks < 1:
        raise UsageError("--max-clicks must be at least 1")
    if args.trials < 1:
        raise UsageError("--trials must be at least 1")
    if args.exemplars < 1:
        raise UsageError("--exemplars must be at least 1")
    previous = Path(args.out) / f"{args.mode}.json"
    if previous.exists():
        # resuming reuses the finished samples: they must come from the same settings
        try:
            old = json.loads(previous.read_text())
        except ValueError:
            old = {}
        now = {"seed": args.seed}
        if args.mode == "reference":
            now.update(reference_prep=cli_agent_options(args)["reference_prep"], exemplars=args.exemplars)
        for k, v in now.items():
            if k in old and old[k] != v:
                flag = "--" + k.replace("_", "-")
                raise UsageError(f"{args.out} holds {args.mode} results of {flag} {old[k]}: resume with that {flag}, or "
                                 f"use another --out")
    if args.mode == "oracle":
        make = lambda t: OracleSegmenter(lambda s: loader(s)[1])  # noqa: E731
    elif args.mode == "empty":
        make = lambda t: EmptySegmenter()  # noqa: E731
    else:
        import numpy as np

        from ..agent import SmartSAMAgent
        from ..features import FeatureSet
        from ..reference import ReferenceBuilder
        from ..selector import Reference

        bb = cli_load_backbone(args)
        if args.mode == "backbone":
            make = lambda t: BackboneSegmenter(bb)  # noqa: E731
        else:
            feats = ref_fn = None
            if args.mode == "reference":
                if not any(s.category for s in samples):
                    raise UsageError(f"reference mode needs categories in the file names (COCO_MVal); {dataset} has none")
                feats = cli_load_features(args, "image", bb.random_weights)
                # makes references: same checks and preparation (--reference-prep) as everywhere
                refs = ReferenceBuilder(FeatureSet(feats), cli_agent_options(args)["reference_prep"])
                cache = {}

                def one(r):
                    if r.name not in cache:
                        image, gt, _ = loader(r)
                        cache[r.name] = refs.from_mask(image, gt)
                    return cache[r.name]

                def reference(sample):
                    rs = [one(r) for r in references_for(sample, all_samples, args.exemplars)]
                    if not rs:
                        return None
                    return Reference(rs[0].kind, np.stack([r.feature for r in rs]), rs[0].extractor)

                ref_fn = reference

            def make(trial):
                agent = SmartSAMAgent(bb, image_features=feats, seed=args.seed + trial, **cli_agent_options(args))
                return AgentSegmenter(agent, ref_fn)

    summary = evaluate(samples, make, Path(args.out), args.mode, dataset, args.max_clicks, args.trials, args.stop_iou,
                       progress=not args.no_progress, loader=loader)
    summary.update({"seed": args.seed, "seeds": list(range(args.seed, args.seed + args.trials))})
    if args.mode in ("pure-is", "reference"):
        probe = make(0).agent
        summary.update({"path": probe.path, "require_click": probe.require_click})
    if args.mode == "reference":
        summary.update({"reference_prep": probe.reference_prep, "exemplars": args.exemplars})
    (Path(args.out) / f"{args.mode}.json").write_text(json.dumps(summary, indent=2))
    keys = ["n", "mIoU@1", "Ratio@75", "Ratio@85", "NoC@75", "NoC@85", "NoC@90", "IoU_best", "sec_first_click"]
    print("| dataset | mode | segmenter | " + " | ".join(keys) + " |")
    print("|" + " --- |" * (3 + len(keys)))
    cells = [f"{summary[k]:.2f}" if isinstance(summary.get(k), float) else str(summary.get(k, "-")) for k in keys]
    print(f"| {dataset} | {args.mode} | {summary['segmenter']} | " + " | ".join(cells) + " |")
    if summary.get("random_weights"):
        print("NOTE: RANDOM weights: these numbers test the harness, not the method.")
    print(json.dumps({"out": str(Path(args.out) / f"{args.mode}.json")}))
    return 0
