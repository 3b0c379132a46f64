"""Command line: ``smartsam segment | explain | eval | models``.

Errors a user can fix (a bad path, a click outside the image, an unreadable image or checkpoint)
end with one line on stderr and exit code 2; a model that cannot be had exits 1 with the reason.

The library takes every knob as an argument; this module is where the command line's flags and
its documented environment variables (``SMARTSAM_BACKBONE``, ``SMARTSAM_FAST_PATH``,
``SMARTSAM_REQUIRE_CLICK``, ``SMARTSAM_REFERENCE_PREP``, ``SMARTSAM_CPU_BF16``,
``SMARTSAM_SHARED_DECODER``, ``SMARTSAM_EMBED_CACHE_DIR`` / ``_BYTES``, ``SMARTSAM_MAX_PIXELS``,
``SMARTSAM_DINOV2_PATH``, ``SMARTSAM_CLIP_PATH``) become those arguments (a flag wins).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

from .cli_common import (UsageError, _add_model_args, _env, cli_agent_options, cli_load_backbone,  # noqa: F401
                         cli_load_features, cli_max_pixels)
from .models import ModelError

RANDOM_NOTE = "NOTE: {name} has RANDOM weights (a test configuration): this mask says nothing about quality."


def _point(text: str) -> Tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (two numbers), got {text!r}") from None
    return x, y



def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="smartsam", description="One click, the mask you meant (SmartSAM).")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment one object from a click", description=
                       "Segment the object at --click. With a reference (an example image + mask, an image, or a "
                       "text) the candidate most similar to it wins; without one, the best-scored candidate that "
                       "contains the click. --negative clicks then refine the answer the ordinary SAM way.")
    s.add_argument("image", help="image file (any format PIL reads; EXIF orientation is applied)")
    s.add_argument("--click", type=_point, required=True, metavar="X,Y", help="the positive click, in image pixels (x = column, y = row)")
    s.add_argument("--negative", type=_point, action="append", default=[], metavar="X,Y", help="a negative click (repeatable)")
    s.add_argument("--positive", type=_point, action="append", default=[], metavar="X,Y", help="a further positive click (repeatable)")
    s.add_argument("--reference-image", help="example image showing the kind of object meant")
    s.add_argument("--reference-mask", help="mask of the object in --reference-image (nonzero = object)")
    s.add_argument("--reference-text", help="text naming the object meant (CLIP)")
    s.add_argument("--out", required=True, help="output mask PNG (255 object, 0 background)")
    s.add_argument("--overlay", help="also write the image with the mask tinted")
    s.add_argument("--json", action="store_true", help="print the result's details as JSON")
    _add_model_args(s)

    e = sub.add_parser("explain", help="draw how SmartSAM reached its answer (figure)")
    e.add_argument("image")
    e.add_argument("--click", type=_point, required=True, metavar="X,Y")
    e.add_argument("--out", required=True, help="output PNG")
    _add_model_args(e)

    m = sub.add_parser("models", help="list or download models")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="name, size, downloaded or not, path")
    d = msub.add_parser("download", help="download (or register with --from) checkpoints, verified")
    d.add_argument("names", nargs="+")
    d.add_argument("--from", dest="source", help="a checkpoint file you already have (checked the same way); for SAM 3 "
                   "and HQ-SAM the folder holding the hub repository's files")
    d.add_argument("--url", help="download from this URL instead of the official one")

    em = sub.add_parser("embed", help="precompute image embeddings into the disk cache", description=
                        "Encode images once and store their embeddings (fp16, content-addressed, per backbone) in "
                        "$SMARTSAM_EMBED_CACHE_DIR (or --cache-dir). A backend using the same cache answers the first "
                        "click on these images without an encoder call.")
    em.add_argument("paths", nargs="+", help="image files or folders of images")
    em.add_argument("--cache-dir", help="cache directory (default $SMARTSAM_EMBED_CACHE_DIR)")
    em.add_argument("--backbone")
    em.add_argument("--checkpoint")
    em.add_argument("--device")

    from .eval.cli import add_eval_parser
    from .eval.paper import add_paper_parser

    add_eval_parser(sub)
    add_paper_parser(sub)
    ds = sub.add_parser("datasets", help="build benchmark datasets")
    dsub = ds.add_subparsers(dest="datasets_command", required=True)
    a = dsub.add_parser("amb-occ", help="build Amb-Occ from COCO and LVIS annotations (paper App. C)", description=
                        "Pairs of a COCO instance (the target) and a smaller LVIS instance inside it (the click area) "
                        "on the same image, densely clustered same-category instances left out; written in the RITM "
                        "layout with an area/ folder (smartsam eval --first-click area, smartsam paper).")
    a.add_argument("--coco", required=True, help="COCO instances JSON (e.g. instances_val2017.json)")
    a.add_argument("--lvis", required=True, help="LVIS annotations JSON of the same images (e.g. lvis_v1_val.json)")
    a.add_argument("--images", required=True, help="the images folder (e.g. val2017/)")
    a.add_argument("--out", required=True)
    a.add_argument("--containment", type=float, default=0.95, help="share of the LVIS mask inside the COCO mask "
                   "(\"fully contains\", with the two datasets' outline tolerance; default 0.95)")
    a.add_argument("--max-area-ratio", type=float, default=0.5, help="the LVIS instance is at most this share of the "
                   "target's area (default 0.5)")
    a.add_argument("--min-area", type=int, default=1024, help="targets smaller than this many pixels are left out")
    a.add_argument("--cluster-iou", type=float, default=0.0, help="a target whose box overlaps another instance of its "
                   "category by more than this box IoU is clustered, and left out (default 0: any overlap)")
    a.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    return ap


def _load_agent(args, need_image: bool = False, need_text: bool = False):
    from .agent import SmartSAMAgent

    bb = cli_load_backbone(args)
    img_f = cli_load_features(args, "image", bb.random_weights) if need_image else None
    txt_f = cli_load_features(args, "text", bb.random_weights) if need_text else None
    agent = SmartSAMAgent(bb, image_features=img_f, text_features=txt_f, seed=args.seed, **cli_agent_options(args))
    agent.warm_up()  # SMARTSAM_COMPILE: compiled before the clicks (nothing to do when eager)
    return agent


def _read_image(path: str):
    from .io import ImageError, load_image

    try:
        return load_image(path, cli_max_pixels())
    except ImageError as e:
        raise UsageError(str(e)) from None


def cmd_segment(args) -> int:
    from .agent import InvalidClick
    from .batch import check_click
    from .io import ImageError, load_mask, overlay, save_mask

    if args.reference_mask and not args.reference_image:
        raise UsageError("--reference-mask needs --reference-image")
    if args.reference_text and args.reference_image:
        raise UsageError("give an image reference or a text reference, not both")
    image = _read_image(args.image)
    ref_image = _read_image(args.reference_image) if args.reference_image else None
    try:  # a click outside the image is said before any model loads (seconds, not a load)
        for xy in [args.click, *args.positive, *args.negative]:
            check_click(xy, image.shape[:2])
    except InvalidClick as e:
        raise UsageError(str(e)) from None
    agent = _load_agent(args, need_image=ref_image is not None, need_text=bool(args.reference_text))
    try:
        reference = None
        if ref_image is not None and args.reference_mask:
            reference = agent.reference_from_mask(ref_image, load_mask(args.reference_mask, cli_max_pixels()))
        elif ref_image is not None:
            reference = agent.reference_from_image(ref_image)
        elif args.reference_text:
            reference = agent.reference_from_text(args.reference_text)
        agent.set_image(image)
        result = agent.predict(args.click, reference)
        if args.negative or args.positive:
            pts = [args.click] + args.positive + args.negative
            labels = [1] * (1 + len(args.positive)) + [0] * len(args.negative)
            result = agent.refine(pts, labels, result)
    except (InvalidClick, ImageError, ValueError) as e:
        raise UsageError(str(e)) from None
    try:
        save_mask(result.mask, args.out)
        if args.overlay:
            from PIL import Image

            Image.fromarray(overlay(image, result.mask)).save(args.overlay)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot write output: {e}") from None
    if agent.backbone.random_weights:
        print(RANDOM_NOTE.format(name=agent.backbone.name), file=sys.stderr)
    info = {
        "backbone": agent.backbone.name,
        "random_weights": agent.backbone.random_weights,
        "mode": result.mode,
        "path": result.path,
        "require_click": agent.require_click,
        "score": round(result.score, 4),
        "similarity": None if result.similarity is None else round(result.similarity, 4),
        "source": {"prompt": result.candidate.prompt_kind, "prompt_index": result.candidate.prompt_index,
                   "mask_index": result.candidate.mask_index, "chain_step": result.candidate.chain_step},
        "area": int(result.mask.sum()),
        "seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "out": args.out,
    }
    print(json.dumps(info) if args.json else f"{args.out}: {info['area']} px, mode {result.mode}, score {result.score:.3f}")
    return 0


def cmd_explain(args) -> int:
    from .figure import explain_figure

    image = _read_image(args.image)
    agent = _load_agent(args)
    agent.set_image(image)
    try:
        result = agent.predict(args.click, return_candidates=True)
    except ValueError as e:
        raise UsageError(str(e)) from None
    explain_figure(image, args.click, result, args.out, agent.backbone.name, agent.backbone.random_weights)
    print(args.out)
    return 0


def cmd_embed(args) -> int:
    from pathlib import Path

    from .io import ImageError, load_image

    if not (args.cache_dir or _env("SMARTSAM_EMBED_CACHE_DIR")):
        raise UsageError("give --cache-dir or set SMARTSAM_EMBED_CACHE_DIR")
    files = []
    for p in map(Path, args.paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"))
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"no such file or folder: {p}")
    bb = cli_load_backbone(args, cache_size=1)
    from tqdm import tqdm

    done = failed = 0
    for f in tqdm(files, desc="embedding", unit="image"):
        try:
            bb.set_image(load_image(f, cli_max_pixels()))
            done += 1
        except ImageError as e:
            print(f"skipped {f}: {e}", file=sys.stderr)
            failed += 1
    print(f"{done} images embedded ({bb.encoder_calls} encoded, {bb.disk_hits} already cached), {failed} skipped, "
          f"cache {bb.disk_cache.root} ({bb.disk_cache.size_bytes() / 1e6:.1f} MB)")
    return 0 if not failed else 1


def cmd_models(args) -> int:
    from pathlib import Path

    from .cli_common import cli_sources
    from .models import REGISTRY, checkpoint_path, download, get_spec, is_downloaded, register_local

    src = cli_sources()
    if args.models_command == "list":
        rows = [("name", "kind", "size", "downloaded", "path / source", "note")]
        for s in REGISTRY.values():
            if s.random:
                rows.append((s.name, s.family, "-", "built", "(random weights, tests only)", s.note))
            elif s.files:
                rows.append((s.name, s.family, "?", "yes" if is_downloaded(s, src) else "no", str(checkpoint_path(s, src)) + "/",
                             s.note))
            elif s.url:
                size = f"{s.size / 1e6:.0f} MB" if s.size else "?"
                rows.append((s.name, s.family, size, "yes" if is_downloaded(s, src) else "no", str(checkpoint_path(s, src)), s.note))
            else:
                rows.append((s.name, s.family, "-", "hf cache", s.hf_id or "", s.note))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
        return 0
    if args.source and len(args.names) != 1:
        raise UsageError("--from registers one file: give exactly one name")
    for name in args.names:
        spec = get_spec(name)
        if args.source:
            if spec.files and not Path(args.source).is_dir():  # SAM 3, HQ-SAM: the repository's files in one folder
                raise UsageError(f"{name} is a folder of files ({', '.join(spec.files)}): give that folder, not {args.source}")
            if not spec.files and not Path(args.source).is_file():
                raise UsageError(f"no such file: {args.source}")
            print(f"{name}: verified and registered at {register_local(spec, Path(args.source), src)}")
        else:
            print(f"{name}: {download(spec, url=args.url, sources=src)}")
    return 0


def cmd_datasets(args) -> int:
    from .eval.coco import build_amb_occ

    for name in ("containment", "max_area_ratio"):
        if not 0 < getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1]")
    try:
        st = build_amb_occ(Path(args.coco), Path(args.lvis), Path(args.images), Path(args.out), args.containment,
                           args.max_area_ratio, args.min_area, args.cluster_iou, link=not args.copy)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(f"Amb-Occ in {args.out}: {st['images']} images, {st['pairs']} pairs, {st['categories']} categories "
          f"(the paper: 2,744 / 4,470 / 80); left out: {st['filtered']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    # sam2 still calls torch.jit.script at import; the deprecation is not the user's concern.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "segment":
            return cmd_segment(args)
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "embed":
            return cmd_embed(args)
        if args.command == "eval":
            from .eval.cli import cmd_eval

            return cmd_eval(args)
        if args.command == "paper":
            from .eval.paper import run

            args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
            return run(args)
        if args.command == "datasets":
            return cmd_datasets(args)
    except UsageError as e:
        print(f"smartsam: error: {e}", file=sys.stderr)
        return 2
    except ModelError as e:
        print(f"smartsam: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
