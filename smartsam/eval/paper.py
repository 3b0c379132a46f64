"""``smartsam paper``: the paper's experiments in one command.

Every table is a set of *cells*; a cell is one ``smartsam eval`` run (a mode, the agent's
ablation knobs, a first-click protocol) in its own folder ``OUT/<dataset>/<cell>/``, so the
whole matrix resumes where it stopped and cells that are the same run (the paper's method
appears in several tables) run once. From the cells' summaries it writes ``paper.md`` (every
table), ``tables/<table>.csv`` and the figures ``fig10.png`` and ``fig15.png``.

Tables (shaped like the paper's):

* ``1`` (also Tables 3 and 9): plain backbone, SmartSAM pure-IS and, where the dataset has
  categories, with a reference: mIoU@1, Ratio@75/85, NoC@85/90, IoU_best.
* ``6``: sampler and chain clicker ablation (the paper's six rows: none, random or gamma sampler
  x none, random or NCC chain clicks; and gamma + random clicks).
* ``7``: which action produced the chosen mask (Add, Cut, Add&Cut, no action; by inner clicks).
* ``10``: first click at the centre, a random inside position, the plain backbone's worst one
  (pure-IS, and in reference mode as the paper ran it where the dataset has categories).
* ``12``: Gamma against Normal (same mode) and Uniform (same mean), in reference mode as the
  paper ran it where the dataset has categories (else pure-IS), beside the plain backbone.
* ``fig10``: number of initial prompts; ``fig15``: chain length (inner interactions).
* ``ambocc``: the area protocol, on a dataset with click areas (``smartsam datasets amb-occ``).

The paper's published numbers (``paper_published.json`` beside this module: Tables 1, 3, 6, 7,
9, 10 and 12, with notes where the paper is ambiguous) sit beside ours where they give the same
table, backbone (registry name), dataset (names compared without case or punctuation), setting
and metric; ``--published FILE`` reads another file, ``--published none`` none. The command ends
with "paper vs ours" per cell, also in ``paper.md`` and ``tables/paper_vs_ours.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

TABLES = ("1", "6", "7", "10", "12", "fig10", "fig15", "ambocc")
METRICS = ("mIoU@1", "Ratio@75", "Ratio@85", "NoC@85", "NoC@90", "IoU_best")
# The paper's numbers, shipped with the code (data from the paper, not ours).
PUBLISHED = Path(__file__).with_name("paper_published.json")
# the paper's tables each of ours holds (our Table 1 has Table 3's and Table 9's columns too)
PAPER_TABLES = {"1": ("1", "3", "9")}
# the method's flags (chain_length None: $SMARTSAM_CHAIN_LENGTH, else 3)
DEFAULTS = {"sampler": "gamma", "points": 6, "boxes": 3, "clicker": "ncc", "chain_length": None, "first_click": "center"}


@dataclass(frozen=True)
class Cell:
    """One evaluation run of the matrix: a mode and the flags that differ from the method's."""

    mode: str
    flags: Tuple[Tuple[str, object], ...] = ()

    @property
    def key(self) -> str:
        """The cell's folder name: the mode and its non-default flags."""
        parts = [self.mode] + [f"{k.replace('_', '-')}-{v}" for k, v in self.flags]
        return "__".join(str(p) for p in parts)

    def value(self, name: str):
        return dict(self.flags).get(name, DEFAULTS.get(name))


def cell(mode: str, **flags) -> Cell:
    """A cell; flags equal to the method's defaults are dropped, so equal runs share a folder."""
    kept = tuple(sorted((k, v) for k, v in flags.items() if DEFAULTS.get(k) != v))
    return Cell(mode, kept)


@dataclass
class Row:
    table: str
    setting: str
    cell: Cell
    x: Optional[float] = None  # the figures' x axis


def matrix(tables: Sequence[str], categories: bool, areas: bool) -> List[Row]:
    """The rows of every asked table (several rows may share one cell)."""
    rows: List[Row] = []
    agent_modes = ["pure-is"] + (["reference"] if categories else [])
    # Tables 10 and 12: the paper ran SmartSAM with a reference; without categories, pure-IS
    paper_mode = "reference" if categories else "pure-is"
    if "1" in tables:
        rows.append(Row("1", "plain backbone", cell("backbone")))
        rows += [Row("1", f"SmartSAM {m}", cell(m)) for m in agent_modes]
    if "6" in tables:
        # "random" prompts of the paper's PIS=random row: uniform distances with the Gamma's mean
        for sampler, clicker, label in [("none", "none", "neither (the click alone, best of 3)"),
                                        ("uniform", "none", "random sampler, no chains"),
                                        ("gamma", "none", "Priori Initial Sampler only"),
                                        ("none", "random", "no sampler, random chain clicks"),
                                        ("none", "ncc", "Next Chain Clickers only"),
                                        ("gamma", "random", "sampler + random chain clicks"),
                                        ("gamma", "ncc", "both (SmartSAM)")]:
            rows.append(Row("6", label, cell("pure-is", sampler=sampler, clicker=clicker)))
    if "7" in tables:
        rows += [Row("7", f"SmartSAM {m}", cell(m)) for m in agent_modes]
    if "10" in tables:
        for fc in ("center", "inside-random", "inside-worst"):
            rows.append(Row("10", f"plain backbone, {fc}", cell("backbone", first_click=fc)))
            rows += [Row("10", f"SmartSAM {m}, {fc}", cell(m, first_click=fc)) for m in agent_modes]
    if "12" in tables:
        rows.append(Row("12", "plain backbone", cell("backbone")))
        for d in ("gamma", "normal", "uniform"):
            # the paper's setting names are its reference-mode rows; pure-IS says so in the name
            rows.append(Row("12", f"{d} distances" + ("" if categories else " (pure-is)"), cell(paper_mode, sampler=d)))
    if "fig10" in tables:
        for points, boxes in [(0, 0), (2, 1), (6, 3), (12, 6)]:
            rows.append(Row("fig10", f"{points} points + {boxes} boxes", cell("pure-is", points=points, boxes=boxes),
                            x=1 + points + boxes))
    if "fig15" in tables:
        for n in range(0, 6):
            rows.append(Row("fig15", f"{n} inner clicks", cell("pure-is", chain_length=n), x=n))
    if "ambocc" in tables and areas:
        rows.append(Row("ambocc", "plain backbone, click on the occluder", cell("backbone", first_click="area")))
        rows += [Row("ambocc", f"SmartSAM {m}, click on the occluder", cell(m, first_click="area")) for m in agent_modes]
    return rows


def _eval_args(base: argparse.Namespace, c: Cell, dataset: str, out: Path) -> argparse.Namespace:
    a = argparse.Namespace(**vars(base))
    a.dataset, a.mode, a.out = dataset, c.mode, str(out)
    for k in DEFAULTS:
        setattr(a, k, c.value(k))
    a.stop_iou, a.exemplars, a.no_progress = 1.01, 1, True
    return a


def published(path: Optional[str] = None) -> List[dict]:
    """Published numbers: ``[{"table", "backbone", "dataset", "setting", "metric", "value"[, "note"]}]``
    from ``path`` (None: the paper's, :data:`PUBLISHED`; "none": no numbers)."""
    if path is not None and path.strip().lower() == "none":
        return []
    path = path or str(PUBLISHED)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--published {path}: {e}") from None
    return list(data.get("numbers", data) if isinstance(data, dict) else data)


def dataset_key(name: str) -> str:
    """A dataset's name for matching: no case, no punctuation ("Amb-Occ", "ambocc", "AMB_OCC" agree)."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def attach_published(line: dict, table: str, backbone: str, pub: Sequence[dict]) -> List[dict]:
    """Put the published numbers of ``line``'s cell into it as ``paper <metric>`` (a metric two of
    the paper's tables give differently: ``paper <metric> (Table N)``); return the comparisons
    ``{table, dataset, setting, metric, paper, ours, note}`` for those whose metric we have."""
    pairs = []
    for p in pub:
        if (str(p.get("table")) in PAPER_TABLES.get(table, (table,)) and p.get("backbone") == backbone
                and dataset_key(str(p.get("dataset", ""))) == dataset_key(line["dataset"])
                and p.get("setting") == line["setting"]):
            metric, value = str(p.get("metric")), p.get("value")
            key = f"paper {metric}"
            if key in line and line[key] != value:
                key = f"paper {metric} (Table {p.get('table')})"
            line[key] = value
            pairs.append({"table": str(p.get("table")), "dataset": line["dataset"], "setting": line["setting"],
                          "metric": metric, "paper": value, "ours": line.get(metric), "note": p.get("note", "")})
    return pairs


def run(args: argparse.Namespace) -> int:
    """Run the matrix and write the report (``smartsam paper``)."""
    from ..cli_common import UsageError
    from .cli import run_eval
    from .datasets import load_dataset, load_sample

    tables = [t.strip() for t in (args.tables or ",".join(TABLES)).split(",") if t.strip()]
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise UsageError(f"unknown tables {unknown}; known: {', '.join(TABLES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "runs.log", "a")
    pub = published(args.published)
    report: Dict[str, List[dict]] = {}
    versus: List[dict] = []
    backbone = weights = None
    from ..cli_common import cli_load_backbone

    bb = cli_load_backbone(args)  # one model for every cell
    feats: dict = {}
    for ds_path in args.dataset:
        try:
            samples = load_dataset(Path(ds_path))
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        ds = Path(ds_path).resolve().name
        from collections import Counter

        # reference mode needs another instance of the category to take the reference from
        shared = any(n > 1 for c, n in Counter(s.category for s in samples).items() if c)
        rows = matrix(tables, shared, any(s.area_path for s in samples))
        done: Dict[str, dict] = {}
        for r in rows:
            if r.cell.key not in done:
                folder = out / ds / r.cell.key
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    run_eval(_eval_args(args, r.cell, ds_path, folder), samples, ds, load_sample, backbone=bb, features=feats)
                log.write(f"== {ds} {r.cell.key}\n{buf.getvalue()}")
                log.flush()
                done[r.cell.key] = json.loads((folder / f"{r.cell.mode}.json").read_text())
                if not args.quiet:
                    print(f"{ds}: {r.cell.key} done", flush=True)
            s = done[r.cell.key]
            name = str(s.get("segmenter", "")).split(":")[-1]
            backbone = backbone or name
            weights = weights or ("RANDOM weights" if s.get("random_weights") else "released weights")
            line = {"table": r.table, "dataset": ds, "setting": r.setting, "cell": r.cell.key, "x": r.x, "n": s.get("n")}
            line.update({m: s.get(m) for m in METRICS})
            if r.table == "7":
                acts = s.get("actions") or {}
                line.update({f"action {k}": v for k, v in (acts.get("action") or {}).items()})
                line.update({f"{k} inner": v for k, v in sorted((acts.get("inner_clicks") or {}).items())})
            versus += attach_published(line, r.table, name, pub)
            report.setdefault(r.table, []).append(line)
    log.close()
    write_report(out, report, backbone or "?", weights or "?", args, versus)
    print("\n".join(versus_table(versus, backbone or "?", len(pub))))
    print(json.dumps({"out": str(out / "paper.md")}))
    return 0


TITLES = {
    "1": "Table 1 / 3 / 9: interactive segmentation (plain backbone vs SmartSAM)",
    "6": "Table 6: ablation of the Priori Initial Sampler and the Next Chain Clickers (pure-IS)",
    "7": "Table 7: which action produced the chosen mask (first click, every trial)",
    "10": "Table 10: imperfect first clicks (centre, random inside, the plain backbone's worst)",
    "12": "Table 12: distance distribution of the sampled prompts",
    "fig10": "Fig. 10: number of initial prompts",
    "fig15": "Fig. 15: number of inner interactions per chain",
    "ambocc": "Amb-Occ (section 4.2): the first click on the smaller occluding object, the whole object as target",
}


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def versus_table(versus: Sequence[dict], backbone: str, published_rows: int) -> List[str]:
    """"Paper vs ours" as Markdown lines: one row per published number our cells also measured."""
    if not versus:
        return [f"Paper vs ours: none of the {published_rows} published numbers is for backbone `{backbone}` on these "
                f"datasets and settings (the paper used released SAM, HQ-SAM and SAM 2.1 weights on DAVIS, "
                f"PartImageNet and Amb-Occ)."]
    lines = ["## Paper vs ours\n", "| table | dataset | setting | metric | paper | ours | ours - paper | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in versus:
        ours, paper = v["ours"], v["paper"]
        diff = ours - paper if isinstance(ours, (int, float)) and isinstance(paper, (int, float)) else None
        lines.append(f"| {v['table']} | {v['dataset']} | {v['setting']} | {v['metric']} | {_fmt(paper)} | {_fmt(ours)} | "
                     f"{_fmt(diff)} | {v['note']} |")
    return lines


def write_report(out: Path, report: Dict[str, List[dict]], backbone: str, weights: str, args,
                 versus: Sequence[dict] = ()) -> None:
    """``paper.md``, ``tables/<table>.csv``, ``tables/paper_vs_ours.csv`` and the two figures."""
    (out / "tables").mkdir(exist_ok=True)
    note = (f"backbone `{backbone}`, {weights}" + (": these numbers test the harness, not the method" if weights.startswith("RANDOM") else "")
            + f"; {args.trials} trial(s), at most {args.max_clicks} clicks" + (f", first {args.limit} samples" if args.limit else ""))
    md = ["# SmartSAM: the paper's experiments\n", f"Command: `smartsam paper {' '.join(getattr(args, 'argv', []))}`\n",
          f"All tables: {note}.\n"]
    for t in TABLES:
        lines = report.get(t)
        if not lines:
            continue
        cols = ["dataset", "setting", "n"] + [c for c in lines[0] if c not in ("table", "dataset", "setting", "cell", "x", "n")]
        for extra in lines:
            cols += [c for c in extra if c not in cols and c not in ("table", "cell", "x")]
        md.append(f"## {TITLES[t]}\n\n({note})\n")
        md.append("| " + " | ".join(cols) + " |")
        md.append("|" + " --- |" * len(cols))
        for ln in lines:
            md.append("| " + " | ".join(_fmt(ln.get(c)) for c in cols) + " |")
        md.append("")
        with open(out / "tables" / f"{t}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["table", "cell", "x"] + cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(lines)
        if t in ("fig10", "fig15"):
            _figure(out / f"{t}.png", lines, TITLES[t], note)
            md.append(f"![{t}]({t}.png)\n")
    md += versus_table(versus, backbone, len(published(getattr(args, "published", None))))
    with open(out / "tables" / "paper_vs_ours.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["table", "dataset", "setting", "metric", "paper", "ours", "note"])
        w.writeheader()
        w.writerows(versus)
    (out / "paper.md").write_text("\n".join(md) + "\n")


def _figure(path: Path, lines: List[dict], title: str, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ds in sorted({ln["dataset"] for ln in lines}):
        pts = sorted((ln["x"], ln.get("mIoU@1")) for ln in lines if ln["dataset"] == ds and ln.get("mIoU@1") is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=ds)
    ax.set_xlabel("initial prompts" if "prompts" in title else "inner clicks per chain")
    ax.set_ylabel("mIoU@1 (%)")
    ax.set_title(title, fontsize=9)
    ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=6, va="bottom")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_paper_parser(sub) -> None:
    p = sub.add_parser("paper", help="the paper's experiments in one command (tables, CSV, plots)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", required=True, help="a dataset folder (RITM layout, area/ for Amb-Occ); "
                   "repeat for several")
    p.add_argument("--out", required=True, help="output folder (re-running resumes)")
    p.add_argument("--tables", help=f"comma-separated subset of {','.join(TABLES)} (default all)")
    p.add_argument("--limit", type=int, help="first N samples of each dataset")
    p.add_argument("--trials", type=int, default=5, help="seeds per cell (default 5, as the paper)")
    p.add_argument("--max-clicks", type=int, default=20)
    p.add_argument("--band-fraction", type=float, default=0.25)
    p.add_argument("--band-percentile", type=float, default=90.0)
    p.add_argument("--min-distance", type=float, default=5.0, help="Table 10: pixels from the boundary at least")
    p.add_argument("--worst-of", type=int, default=10, help="Table 10: positions tried for the worst first click")
    p.add_argument("--published", help="a JSON file of published numbers to show beside ours (default: the paper's, "
                   "shipped as smartsam/eval/paper_published.json; none: no numbers)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--images", help=argparse.SUPPRESS)
    from ..cli_common import _add_model_args

    _add_model_args(p)
