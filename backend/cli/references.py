"""Reference admin from the command line, on the backend's data directory.

    python -m backend.cli.references list [--project ID]
    python -m backend.cli.references show PROJECT LABEL [--mask-out mask.png]
    python -m backend.cli.references set PROJECT LABEL (--image I [--mask M] | --text T)
    python -m backend.cli.references clear PROJECT [LABEL]
    python -m backend.cli.references history PROJECT LABEL      every version, newest first
    python -m backend.cli.references restore VERSION            make a version current again
    python -m backend.cli.references check
    python -m backend.cli.references gc                          remove data no version names
    python -m backend.cli.references stats [--project ID] [--json]   field statistics (suggestions vs annotations)
    python -m backend.cli.references migrate --to postgresql://USER:PASSWORD@HOST:PORT/DB
                                                        copy the SQLite store into an empty PostgreSQL

Uses the backend's store (``SMARTSAM_DATABASE_URL``, else the SQLite files in ``SMARTSAM_DATA_DIR``)
and the same feature models as the server (``SMARTSAM_FEATURES``, ``SMARTSAM_TEXT_FEATURES``; the
random test models when ``SMARTSAM_BACKBONE`` is a ``-random`` one). Safe while the server runs:
writers serialise (stop the server before ``migrate``: what it writes meanwhile is not copied).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from backend.config import Settings
from backend.errors import SettingsError
from backend.store.db import DatabaseUnavailable, safe_url
from backend.store.project_settings import ProjectSettings
from backend.store.references import ReferenceStore, ReferenceStoreError


def reference_builder(s: Settings):
    """A :class:`~smartsam.reference.ReferenceBuilder` with the server's feature models (loaded on
    first need) and its preparation."""
    from smartsam.features import FeatureSet
    from smartsam.models import default_features, load_features
    from smartsam.reference import ReferenceBuilder

    random = s.backbone_name.endswith("-random") or s.backbone_name == "disk-test"

    def load(kind):
        name = (s.features if kind == "image" else s.text_features) or default_features(kind, random)
        return load_features(name, s.device, s.dinov2_path if kind == "image" else s.clip_path)

    return ReferenceBuilder(FeatureSet(loader=load), s.reference_prep)


def reference_from_files(s: Settings, image_path=None, mask_path=None, text=None):
    """A reference from an image file (+ mask file) or a text, with the server's feature models.

    Returns ``(reference, mask or None, image or None)``; raises ImageError / ValueError."""
    from smartsam.io import load_image, load_mask

    builder = reference_builder(s)
    if text is not None:
        return builder.from_text(text), None, None
    image = load_image(image_path, s.max_pixels)
    mask = load_mask(mask_path, s.max_pixels) if mask_path else None
    ref = builder.from_mask(image, mask) if mask is not None else builder.from_image(image)
    return ref, mask, image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.cli.references", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list")
    p.add_argument("--project")
    p = sub.add_parser("show")
    p.add_argument("project")
    p.add_argument("label")
    p.add_argument("--mask-out")
    p = sub.add_parser("set")
    p.add_argument("project")
    p.add_argument("label")
    p.add_argument("--image")
    p.add_argument("--mask")
    p.add_argument("--text")
    p = sub.add_parser("clear")
    p.add_argument("project")
    p.add_argument("label", nargs="?")
    p = sub.add_parser("history")
    p.add_argument("project")
    p.add_argument("label")
    p = sub.add_parser("restore")
    p.add_argument("version", type=int)
    sub.add_parser("check")
    sub.add_parser("gc")
    p = sub.add_parser("stats")
    p.add_argument("--project")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("migrate", help="copy the SQLite store into an empty PostgreSQL database")
    p.add_argument("--to", required=True, metavar="postgresql://...")
    args = ap.parse_args(argv)
    try:
        s = Settings.from_env()
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "migrate":
        return migrate(s, args.to)
    try:
        store = ReferenceStore(s.data_dir, exemplars=s.exemplars, database_url=s.database_url)
        projects = ProjectSettings(s.data_dir, s.database_url)
        store.exemplars_for = lambda p: projects.agent(s.agent, p).exemplars  # a project's own K, as the server
    except (ReferenceStoreError, DatabaseUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.cmd == "list":
        for r in store.list(args.project):
            print(json.dumps(r.public()))
        return 0
    if args.cmd == "show":
        m = store.meta(args.project, args.label)
        if m is None:
            print(f"error: no reference for project {args.project} label {args.label!r}", file=sys.stderr)
            return 2
        print(json.dumps(m.public(), indent=2))
        if args.mask_out:
            png = store.mask_png(args.project, args.label)
            if png is None:
                print("(this reference has no mask)", file=sys.stderr)
            else:
                Path(args.mask_out).write_bytes(png)
        return 0
    if args.cmd == "clear":
        print(f"deleted {store.delete(args.project, args.label)}")
        return 0
    if args.cmd == "history":
        current = {m.id for m in store.current(args.project, args.label)}
        for v in store.history(args.project, args.label):
            print(json.dumps(dict(v.public(), current=v.id in current)))
        return 0
    if args.cmd == "restore":
        try:
            vid = store.restore(args.version, {"admin": "cli"})
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
        print(f"restored version {args.version} as version {vid}")
        return 0
    if args.cmd == "stats":
        from backend.serving.versions import instance_report
        from backend.store.field_stats import FieldStats, instance_table, table

        stats = FieldStats(s.data_dir, s.stats_max, s.database_url)
        summary = stats.summary(args.project)
        instances = instance_report(stats, store, s, args.project)
        print(json.dumps(dict(summary, instances=instances), indent=2) if args.json else
              table(summary) + "\n\n" + instance_table(instances))
        return 0
    if args.cmd == "gc":
        print(f"removed {store.collect_garbage()} unused blobs")
        return 0
    if args.cmd == "check":
        from backend.store.field_stats import FieldStats

        problems = store.check() + FieldStats(s.data_dir, s.stats_max, s.database_url).db.integrity()
        for p in problems:
            print(p)
        return 1 if problems else 0
    # set
    from smartsam.io import ImageError

    if not (args.text or args.image):
        print("error: give --image [--mask] or --text", file=sys.stderr)
        return 2
    try:
        ref, mask, image = reference_from_files(s, args.image, args.mask, args.text)
    except (ImageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store.put(args.project, args.label, ref, {"admin": "cli", "image": args.image, "text": args.text,
                                              "prep": s.reference_prep if mask is not None else None},
              mask=mask, image=image, how="admin")
    print(f"set {ref.kind} reference for project {args.project} label {args.label!r}")
    return 0


def migrate(s: Settings, target: str) -> int:
    """Copy every store (references and their data, project settings, field statistics, the
    work queue and the applied-events record) from the SQLite files of ``SMARTSAM_DATA_DIR`` into
    the empty database ``target``; prints the rows per table on both sides."""
    from backend.store import field_stats, project_settings, references, work_queue
    from backend.store.db import Database, copy_rows, has_rows

    if s.database_url:
        print("error: migrate copies the SQLite store of SMARTSAM_DATA_DIR: unset SMARTSAM_DATABASE_URL", file=sys.stderr)
        return 2
    if not target.split("://", 1)[0].split("+")[0] in ("postgresql", "postgres"):
        print("error: --to must be a postgresql:// URL", file=sys.stderr)
        return 2
    # each store: its tables, and how to open it on a database (None: its SQLite file); opening a
    # store brings an older file to the current schema first, and creates the target's tables
    stores = {
        "references": (references.TABLES, lambda url: ReferenceStore(s.data_dir, s.exemplars, database_url=url).db),
        "project_settings": (project_settings.TABLES, lambda url: ProjectSettings(s.data_dir, url).db),
        "field_stats": (field_stats.TABLES, lambda url: field_stats.FieldStats(s.data_dir, s.stats_max, url).db),
        "work_queue": (work_queue.TABLES, lambda url: work_queue.WorkQueue(s.data_dir / "jobs.db", url).db),
    }
    try:
        sources = {name: open_db(None) for name, (_, open_db) in stores.items()}
        full = {}
        for name, (tables, _) in stores.items():
            full.update(has_rows(Database(target, name), tables))
        if full:
            print(f"error: {safe_url(target)} already holds SmartSAM data ({', '.join(f'{t}: {n} rows' for t, n in full.items())}):"
                  f" migrate into an empty database", file=sys.stderr)
            return 1
        print(f"migrating {s.data_dir} -> {safe_url(target)}")
        ok = True
        for name, (tables, open_db) in stores.items():
            dst = open_db(target)
            for table, n in copy_rows(tables, sources[name], dst).items():
                there = dst.count(table)
                ok &= there == n
                print(f"  {table:<18} {n:>7} rows -> {there:>7}")
    except (ReferenceStoreError, DatabaseUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("done: set SMARTSAM_DATABASE_URL to the target on every replica" if ok else "error: counts differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
