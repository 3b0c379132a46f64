"""``smartsam eval``: the standard protocol on a dataset folder, for one mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


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
    e.add_argument("--images", help="with a COCO-style annotation file as --dataset (PartImageNet): the folder of its "
                   "images; each image's annotations together are the target (the whole object)")
    add_protocol_args(e)
    from ..cli_common import _add_model_args

    _add_model_args(e)


def add_protocol_args(e) -> None:
    """The ablation knobs of the agent and the first-click protocol (``eval`` and ``paper``)."""
    from ..clickers import PLACEMENTS
    from ..sampler import DISTRIBUTIONS
    from .first_click import PROTOCOLS

    g = e.add_argument_group("ablations (paper Tables 6 and 12, Fig. 10 and 15; defaults are the paper's method)")
    g.add_argument("--sampler", choices=DISTRIBUTIONS, default="gamma", help="distance of the sampled prompts: gamma "
                   "(the paper, beta * Gamma(2, 1)), normal (same mode), uniform (same mean) or none (the click alone)")
    g.add_argument("--points", type=int, default=6, help="sampled points (default 6)")
    g.add_argument("--boxes", type=int, default=3, help="sampled boxes, aspects 0.67, 1, 1.5 in turn (default 3)")
    g.add_argument("--clicker", choices=PLACEMENTS, default="ncc", help="chain clicks at the middle of the largest "
                   "uncertain region (ncc, the paper), at a random pixel of the chosen side (random), or no chains (none)")
    g.add_argument("--chain-length", type=int, default=None, help="inner clicks per chain (default "
                   "$SMARTSAM_CHAIN_LENGTH, else 3)")
    g.add_argument("--band-fraction", type=float, default=0.25, help="uncertain band: this fraction of the confident "
                   "logit scale (our choice, 0.25; the paper gives none)")
    g.add_argument("--band-percentile", type=float, default=90.0, help="the percentile of |logits| that is the "
                   "confident scale (our choice, 90)")
    f = e.add_argument_group("first click (paper Table 10 and Amb-Occ)")
    f.add_argument("--first-click", choices=PROTOCOLS, default="center", help="center (the standard protocol), "
                   "inside-random (seeded, at least --min-distance from the boundary), inside-worst (the worst of "
                   "--worst-of such positions for the plain backbone, then every method there), area (the middle of "
                   "the sample's click area, the dataset's area/ folder: Amb-Occ)")
    f.add_argument("--min-distance", type=float, default=5.0, help="inside-random / inside-worst: pixels from the "
                   "object's boundary at least (default 5)")
    f.add_argument("--worst-of", type=int, default=10, help="inside-worst: seeded positions tried (default 10)")


def agent_parts(args):
    """``(sampler, clicker)`` from the ablation flags (and ``SMARTSAM_CHAIN_LENGTH``)."""
    from ..cli_common import UsageError, _env
    from ..clickers import NextChainClicker
    from ..sampler import PrioriInitialSampler, box_aspects

    chain = getattr(args, "chain_length", None)
    try:
        if chain is None:
            chain = int(_env("SMARTSAM_CHAIN_LENGTH", "3"))
        sampler = PrioriInitialSampler(num_points=getattr(args, "points", 6), box_aspects=box_aspects(getattr(args, "boxes", 3)),
                                       distribution=getattr(args, "sampler", "gamma"))
        clicker = NextChainClicker(chain_length=chain, band_fraction=getattr(args, "band_fraction", 0.25),
                                   band_percentile=getattr(args, "band_percentile", 90.0),
                                   placement=getattr(args, "clicker", "ncc"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return sampler, clicker


def first_click_settings(args) -> dict:
    """The first-click protocol as it is named in outputs (and checked when resuming)."""
    p = getattr(args, "first_click", "center")
    out = {"first_click": p}
    if p in ("inside-random", "inside-worst"):
        out["min_distance"] = float(args.min_distance)
    if p == "inside-worst":
        out["worst_of"] = int(args.worst_of)
    return out


def first_click_fn(args, backbone=None):
    """``(sample, image, gt, ignore, trial) -> (row, col)`` for ``--first-click`` (None: center,
    the click simulator's own). inside-worst probes ``backbone``: its best-of-3 first answer."""
    import numpy as np

    from ..cli_common import UsageError
    from ..masks import mask_iou
    from . import first_click as fc
    from .datasets import load_area
    from .segmenters import BackboneSegmenter

    p = getattr(args, "first_click", "center")
    if p == "center":
        return None
    if p in ("inside-random", "inside-worst") and args.min_distance < 0:
        raise UsageError("--min-distance must be 0 or more")
    if p == "inside-worst" and args.worst_of < 1:
        raise UsageError("--worst-of must be at least 1")

    def pick(sample, image, gt, ignore, trial):
        if p == "area":
            try:
                return fc.area_position(load_area(sample))
            except ValueError as e:
                raise UsageError(f"{sample.name}: {e}") from None
        rng = np.random.default_rng(fc.sample_seed(sample.name, trial, args.seed))
        if p == "inside-random":
            return fc.inside_positions(gt, rng, 1, args.min_distance)[0]
        plain = BackboneSegmenter(backbone)

        def iou_at(yx):
            plain.start(image, sample)  # cached after the first: the probe costs decoder calls only
            return mask_iou(plain.click([[yx[1], yx[0]]], [1])[0], gt, ignore)

        return fc.worst_position(fc.inside_positions(gt, rng, args.worst_of, args.min_distance), iou_at)

    return pick


def cmd_eval(args) -> int:
    from ..cli_common import UsageError
    from .datasets import load_dataset, load_sample

    try:
        if str(args.dataset).endswith(".json"):  # COCO-style annotations (PartImageNet): whole objects
            from .coco import load_coco_objects

            if not args.images:
                raise UsageError("a COCO-style annotation file as --dataset needs --images (the folder of its images)")
            all_samples, loader = load_coco_objects(Path(args.dataset), Path(args.images))
            return run_eval(args, all_samples, Path(args.dataset).stem, loader)
        all_samples = load_dataset(Path(args.dataset))  # references may come from past --limit
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    return run_eval(args, all_samples, Path(args.dataset).resolve().name, load_sample)


def run_eval(args, all_samples, dataset: str, loader, backbone=None, features: Optional[dict] = None) -> int:
    """The protocol for ``args.mode`` on ``all_samples`` (first ``--limit``), read by ``loader``
    (sample -> image, ground truth, ignore mask); prints the table, writes the outputs. Shared by
    ``smartsam eval``, ``smartsam paper`` (which passes one loaded ``backbone`` and a ``features``
    cache for all its runs) and the backend's project evaluation."""
    from ..cli_common import UsageError, cli_agent_options, cli_load_backbone, cli_load_features
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
        now = {"seed": args.seed, **first_click_settings(args)}
        if args.mode == "reference":
            now.update(reference_prep=cli_agent_options(args)["reference_prep"], exemplars=args.exemplars)
        if args.mode in ("pure-is", "reference"):
            from ..agent import exploration_knobs

            now["agent"] = exploration_knobs(*agent_parts(args))
        for k, v in now.items():
            was = old.get(k)
            if k == "agent" and isinstance(was, dict):
                was = {kk: was.get(kk) for kk in v}
            if k in old and was != v:
                flag = "--" + k.replace("_", "-")
                raise UsageError(f"{args.out} holds {args.mode} results of {flag} {was}: resume with that setting, or "
                                 f"use another --out")
    bb = None
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

        bb = backbone or cli_load_backbone(args)
        if args.mode == "backbone":
            SmartSAMAgent(bb).warm_up()  # SMARTSAM_COMPILE: its kinds of call (nothing to do when eager)
            make = lambda t: BackboneSegmenter(bb)  # noqa: E731
        else:
            feats = ref_fn = None
            if args.mode == "reference":
                if not any(s.category for s in samples):
                    raise UsageError(f"reference mode needs categories in the file names (COCO_MVal); {dataset} has none")
                feats = (features or {}).get("image") or cli_load_features(args, "image", bb.random_weights)
                if features is not None:
                    features["image"] = feats
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

            warmed = []

            def make(trial):
                sampler, clicker = agent_parts(args)
                agent = SmartSAMAgent(bb, sampler=sampler, clicker=clicker, image_features=feats, seed=args.seed + trial,
                                      **cli_agent_options(args))
                if not warmed:  # SMARTSAM_COMPILE: compiled once, before the first sample (nothing to do when eager)
                    warmed.append(agent.warm_up())
                return AgentSegmenter(agent, ref_fn)

    if getattr(args, "first_click", "center") == "inside-worst" and bb is None:
        bb = backbone or cli_load_backbone(args)  # the plain backbone picks the positions, whatever is evaluated
    summary = evaluate(samples, make, Path(args.out), args.mode, dataset, args.max_clicks, args.trials, args.stop_iou,
                       progress=not args.no_progress, loader=loader, first_click=first_click_fn(args, bb))
    summary.update({"seed": args.seed, "seeds": list(range(args.seed, args.seed + args.trials)),
                    **first_click_settings(args)})
    if args.mode in ("pure-is", "reference"):
        probe = make(0).agent
        summary.update({"path": probe.path, "require_click": probe.require_click, "agent": probe.knobs()})
    if args.mode == "reference":
        summary.update({"reference_prep": probe.reference_prep, "exemplars": args.exemplars})
    (Path(args.out) / f"{args.mode}.json").write_text(json.dumps(summary, indent=2))
    keys = ["n", "mIoU@1", "Ratio@75", "Ratio@85", "NoC@75", "NoC@85", "NoC@90", "IoU_best", "sec_first_click"]
    print("| dataset | mode | segmenter | " + " | ".join(keys) + " |")
    print("|" + " --- |" * (3 + len(keys)))
    cells = [f"{summary[k]:.2f}" if isinstance(summary.get(k), float) else str(summary.get(k, "-")) for k in keys]
    print(f"| {dataset} | {args.mode} | {summary['segmenter']} | " + " | ".join(cells) + " |")
    named = dict(first_click_settings(args), **({"agent": summary["agent"]} if "agent" in summary else {}))
    print("settings: " + json.dumps(named))
    if summary.get("actions"):
        print("actions (Table 7): " + json.dumps(summary["actions"]["action"]))
    if summary.get("random_weights"):
        print("NOTE: RANDOM weights: these numbers test the harness, not the method.")
    print(json.dumps({"out": str(Path(args.out) / f"{args.mode}.json")}))
    return 0
