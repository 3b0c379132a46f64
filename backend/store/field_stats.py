"""Field statistics: does SmartSAM help on this project? Measured on the team's own data.

Every suggestion the backend serves (interactive answers and pre-labels) is recorded: project,
task, label, mode, arm, clicks, seconds and the mask (a 1-bit PNG, at the size Label Studio
displays). When an annotation arrives (read back from Label Studio, like every webhook), each of
its brush regions is matched to the suggestion of the same task and label that overlaps it most,
and one outcome is recorded per region: IoU between suggestion and final mask, accepted
unchanged (IoU = 1: the same pixels) or edited, and the clicks after the agent's first answer.

The *arm* is what answered the first click of the object: ``smartsam`` (the agent, any mode),
``plain`` (the backbone's top-1 mask, a share of first clicks set by ``SMARTSAM_COMPARE``, so both
arms are seen on the same annotators and images) or ``prelabel``. Refinement clicks inherit the
arm of the click they refine.

Stored beside the references (``stats.db`` under the data directory, or the shared database, so
the table holds every replica's suggestions and outcomes), bounded: the oldest suggestions beyond ``max_suggestions`` are dropped. Suggestions are
written by a background thread (:meth:`FieldStats.record` only queues: a PNG encode and a
durable SQLite commit stay off the annotator's request); :meth:`FieldStats.close` writes what is
queued before the process exits (for at most ``CLOSE_TIMEOUT_S``), and :meth:`FieldStats.observe`
first waits for what was served before it (for at most ``FLUSH_TIMEOUT_S``).

A region is matched only to suggestions served *before its annotation was created* (Label
Studio's ``created_at``): a pre-label made later for the same task (an import, a late "Retrieve
predictions") is not what the annotator saw, and must not take the object from its arm.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import sqlalchemy as sa
from PIL import Image

from backend.labelstudio.regions import region_shown_mask
from backend.store.db import Database
from smartsam.masks import mask_iou

log = logging.getLogger("smartsam.stats")

ARMS = ("smartsam", "plain", "prelabel")
QUEUE_MAX = 512  # suggestions waiting to be written (see FieldStats.__init__)
# How long an annotation's outcomes wait for the suggestions served before it to be written. A full
# queue (QUEUE_MAX) is written in under 5 s (benchmarks/stats_writer.py on the 2-core dev machine:
# 512 in 3.4 s on SQLite, beside a running test); three times that means the database is failing,
# and the webhook's reference must not wait on statistics (StatsBehind instead).
FLUSH_TIMEOUT_S = 15.0
# At shutdown, what is queued is written for at most this long: gunicorn kills a worker 30 s
# (graceful_timeout) after asking it to stop, and then nothing at all would be written.
CLOSE_TIMEOUT_S = 20.0


MATCH_TOLERANCE = 0.05  # IoU: suggestions this close to the best match are one object; the newest counts


class StatsBehind(RuntimeError):
    """The suggestions served before a call were not all written within its time limit."""


def draw_plain(seed: int, share: float, project: str, task, label: str, click_xy: Tuple[float, float]) -> bool:
    """Whether this first click goes to the plain arm: a seeded draw per (project, task, label,
    click), so every request of one click chain lands in the same arm."""
    if share <= 0:
        return False
    key = f"{seed}\0{project}\0{task}\0{label}\0{click_xy[0]:.2f}\0{click_xy[1]:.2f}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64
    return u < share


def raster_fingerprint(mask: np.ndarray) -> str:
    """A digest of a mask's pixels (with its size): two regions that rasterise the same match."""
    m = np.asarray(mask, bool)
    return hashlib.sha1(f"{m.shape}".encode() + np.packbits(m).tobytes()).hexdigest()[:16]


def _png(mask: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.asarray(mask, bool)).save(b, format="PNG", optimize=True)
    return b.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(bool)


TABLES = sa.MetaData()
sa.Table("suggestions", TABLES,
         sa.Column("id", sa.Integer, primary_key=True, autoincrement=True), sa.Column("project", sa.Text, nullable=False),
         sa.Column("task", sa.Integer), sa.Column("label", sa.Text, nullable=False), sa.Column("mode", sa.Text, nullable=False),
         sa.Column("arm", sa.Text, nullable=False), sa.Column("clicks", sa.Integer, nullable=False),
         sa.Column("seconds", sa.Double, nullable=False), sa.Column("created_at", sa.Double, nullable=False),
         sa.Column("width", sa.Integer, nullable=False), sa.Column("height", sa.Integer, nullable=False),
         sa.Column("mask", sa.LargeBinary, nullable=False), sa.Column("model_version", sa.Text),
         sa.Column("regions", sa.Text), sa.Column("similarity", sa.Double),
         sa.Index("suggestions_task", "project", "task", "label", "id"), sqlite_autoincrement=True)
# a pre-labeled instance the annotator kept (matched by a submitted region) or deleted
sa.Table("decisions", TABLES,
         sa.Column("annotation", sa.Integer, primary_key=True, autoincrement=False),
         sa.Column("suggestion", sa.Integer, primary_key=True, autoincrement=False),
         sa.Column("project", sa.Text, nullable=False), sa.Column("label", sa.Text, nullable=False),
         sa.Column("similarity", sa.Double, nullable=False), sa.Column("kept", sa.Integer, nullable=False),
         sa.Index("decisions_label", "project", "label"))
sa.Table("outcomes", TABLES,
         sa.Column("annotation", sa.Integer, primary_key=True, autoincrement=False),
         sa.Column("region", sa.Text, primary_key=True), sa.Column("project", sa.Text, nullable=False),
         sa.Column("task", sa.Integer), sa.Column("label", sa.Text, nullable=False), sa.Column("suggestion", sa.Integer),
         sa.Column("mode", sa.Text), sa.Column("arm", sa.Text), sa.Column("iou", sa.Double),
         sa.Column("accepted", sa.Integer, nullable=False), sa.Column("clicks", sa.Integer),
         sa.Column("extra_clicks", sa.Integer), sa.Column("seconds", sa.Double), sa.Column("user", sa.Integer),
         sa.Column("updated_at", sa.Double, nullable=False))


class FieldStats:
    """Suggestions served, outcomes observed, aggregates.

    Args:
        data_dir: the backend's data directory (``stats.db`` goes there).
        max_suggestions: suggestions kept (the oldest go first); outcomes are few and kept.
    """

    def __init__(self, data_dir: Path, max_suggestions: int = 20000, database_url: Optional[str] = None) -> None:
        self.max_suggestions = int(max_suggestions)
        self.db = Database.open(database_url, Path(data_dir) / "stats.db", "field_stats")
        # bounded: while the database is away nothing is written, and each waiting suggestion holds
        # its mask (packed to a bit per pixel: about 19 KB for a 481 x 321 image, 5 MB at the 40 MP
        # limit); beyond QUEUE_MAX the newest are dropped and counted
        self._queue: "queue.Queue[Optional[tuple]]" = queue.Queue(QUEUE_MAX)
        self._writer: Optional[threading.Thread] = None
        # suggestions queued and suggestions the writer is done with (written or lost): flush waits
        # for the ones queued before it, never for an empty queue (clicks keep coming meanwhile).
        # The one lock of the writer's state: the counters, the writer thread, closed.
        self._queued = self._done = 0
        self._progress = threading.Condition()
        self._closed = False  # after close() nothing is queued (a late pre-label would restart the writer)
        self.lost = 0  # suggestions a write failed for (logged)
        # the composition root points this at the reference store's generation (learned thresholds)
        self.on_decisions: Callable[[str], None] = lambda project: None
        self.dropped = 0  # suggestions not queued: the queue was full
        self.db.create(TABLES)
        self.db.add_columns("suggestions", {"regions": "TEXT", "similarity": "REAL"})  # stats.db of earlier releases

    def _write(self):
        return self.db.write()

    # -- suggestions -----------------------------------------------------------------------
    def record(self, project: str, task, label: str, mode: str, arm: str, clicks: int, seconds: float,
               mask: np.ndarray, model_version: Optional[str] = None, regions: Optional[List[Dict]] = None,
               similarity: Optional[float] = None) -> None:
        """One suggestion served; ``mask`` ``(H, W)`` bool at the size Label Studio displays, and
        the ``regions`` it was served as (brush, polygons, bitmask, box: a submitted region that
        rasterises like one of them was accepted unchanged). Queued: the background writer stores
        it (see :meth:`flush`, :meth:`close`)."""
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}")
        m = np.asarray(mask, bool)
        item = (str(project), task if isinstance(task, int) else None, label, mode, arm, int(clicks), float(seconds),
                time.time(), (m.shape, np.packbits(m)), model_version, list(regions or []),
                None if similarity is None else float(similarity))
        with self._progress:  # queued and counted together: a flush's target is exactly what it waits for
            if self._closed:
                self.dropped += 1
                return
            self._start_writer()
            try:
                self._queue.put_nowait(item)
                self._queued += 1
            except queue.Full:
                self.dropped += 1

    def record_now(self, *args, **kwargs) -> int:
        """:meth:`record`, written before it returns; the suggestion's row id."""
        self.record(*args, **kwargs)
        self.flush()
        return int(self.db.query_one("SELECT MAX(id) FROM suggestions")[0])

    def _start_writer(self) -> None:
        """(under ``_progress``)"""
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, name="smartsam-stats", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._insert(item)
            except Exception as e:  # statistics never take the server down
                self.lost += 1
                log.warning("field statistics: a suggestion was not recorded (%s)", e)
            finally:
                with self._progress:
                    self._done += 1
                    self._progress.notify_all()

    def _insert(self, item: tuple) -> None:
        project, task, label, mode, arm, clicks, seconds, created, (shape, packed), version, regions, similarity = item
        mask = np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
        h, w = mask.shape
        prints = []
        for r in regions:
            try:
                prints.append(raster_fingerprint(region_shown_mask(r)))
            except ValueError:  # a region we made is always readable; never lose the row for it
                pass
        with self._write() as c:
            cur = c.execute("INSERT INTO suggestions (project, task, label, mode, arm, clicks, seconds, created_at, width, "
                            "height, mask, model_version, regions, similarity) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                            "RETURNING id",
                            (project, task, label, mode, arm, clicks, seconds, created, w, h, _png(mask), version,
                             json.dumps(prints), similarity))
            sid = int(cur.scalar_one())
            c.execute("DELETE FROM suggestions WHERE id <= ?", (sid - self.max_suggestions,))

    def flush(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until every suggestion queued before this call is written (or failed to be:
        ``lost``); those queued meanwhile are not waited for. StatsBehind after ``timeout`` s."""
        with self._progress:
            target = self._queued
            if not self._progress.wait_for(lambda: self._done >= target, timeout):
                raise StatsBehind(f"field statistics: {target - self._done} suggestions served earlier are not "
                                  f"written after {timeout:g} s (the database is slow or away)")

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """At shutdown: write what is queued, for at most ``timeout`` s, and stop the writer;
        what is left is counted in the log."""
        with self._progress:
            self._closed = True
            w, self._writer = self._writer, None
        if w is None or not w.is_alive():
            return
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            with self._progress:
                left = self._queued - self._done
            log.warning("field statistics: %d suggestions not written at shutdown (the database did not take them "
                        "within %g s)", left, timeout)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _suggestions(self, project: str, task, label: str, before: Optional[float]) -> Iterator[Tuple]:
        yield from self.db.query(
            "SELECT id, mode, arm, clicks, width, height, mask, regions FROM suggestions WHERE project=? AND "
            "task IS NOT DISTINCT FROM ? AND label=? "
            "AND created_at <= ? ORDER BY id", (str(project), task, label, float("inf") if before is None else before))

    # -- outcomes --------------------------------------------------------------------------
    def observe(self, project: str, task, annotation: int, regions: List[Tuple],
                lead_time: Optional[float] = None, user=None, created_at: Optional[float] = None) -> List[Dict]:
        """An annotation as Label Studio holds it: ``regions`` are ``(region id, label, mask at the
        displayed size[, its raster_fingerprint])``. Each is matched to the most-overlapping
        suggestion of its task and label (the newest of equals) served before ``created_at`` (the
        annotation's creation, seconds since the epoch; None: any); it was accepted unchanged when
        its pixels are the suggestion's (IoU 1) or it rasterises like a region the suggestion was
        served as (a polygon, a box). An annotation seen again replaces its earlier outcomes.
        Returns the outcomes recorded."""
        self.flush()
        out = []
        per_object = (float(lead_time) / len(regions)) if lead_time and regions else None
        for region in regions:
            rid, label, mask = region[:3]
            fingerprint = region[3] if len(region) > 3 else None
            cands = []
            for sid, mode, arm, clicks, w, h, blob, served in self._suggestions(project, task, label, created_at):
                if (h, w) != mask.shape:
                    continue
                same = fingerprint is not None and fingerprint in json.loads(served or "[]")
                cands.append((mask_iou(_unpng(blob), mask), sid, mode, arm, clicks, same))
            best = None
            if cands:
                # the region served as it is wins; else, among the suggestions within MATCH_TOLERANCE
                # of the best overlap, the newest: the annotator's last request for this object
                # (overlaps that close are the same object, and noise must not decide)
                exact = [c for c in cands if c[5]]
                top = max(c[0] for c in cands)
                best = max(exact or [c for c in cands if c[0] >= top - MATCH_TOLERANCE], key=lambda c: c[1])
            if best is None:
                rec = dict(region=rid, label=label, suggestion=None, mode=None, arm=None, iou=None, accepted=False,
                           clicks=None, extra_clicks=None)
            else:
                v, sid, mode, arm, clicks, same = best
                # clicks: what the annotator spent on the object (0 for an accepted pre-label)
                rec = dict(region=rid, label=label, suggestion=sid, mode=mode, arm=arm, iou=round(v, 6),
                           accepted=v == 1.0 or same, clicks=clicks, extra_clicks=max(0, clicks - 1))
            out.append(rec)
        decided = self._decisions(project, task, created_at, {r["suggestion"] for r in out
                                                              if r["suggestion"] is not None and (r["iou"] or 0) >= 0.5})
        with self._write() as c:
            c.execute("DELETE FROM outcomes WHERE annotation=?", (int(annotation),))
            before = c.execute("DELETE FROM decisions WHERE annotation=?", (int(annotation),)).rowcount
            for sid, label, sim, kept in decided:
                c.execute("INSERT INTO decisions (annotation, suggestion, project, label, similarity, kept) "
                          "VALUES (?,?,?,?,?,?)", (int(annotation), sid, str(project), label, sim, int(kept)))
            for rec in out:
                c.execute('INSERT INTO outcomes (annotation, region, project, task, label, suggestion, mode, arm, iou, '
                          'accepted, clicks, extra_clicks, seconds, "user", updated_at) '
                          'VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)',
                          (int(annotation), rec["region"], str(project), task if isinstance(task, int) else None,
                           rec["label"], rec["suggestion"], rec["mode"], rec["arm"], rec["iou"], int(rec["accepted"]),
                           rec["clicks"], rec["extra_clicks"], per_object, user if isinstance(user, int) else None,
                           time.time()))
        if before or decided:  # the project's learned thresholds may have moved
            self.on_decisions(str(project))
        return out

    def _decisions(self, project: str, task, before: Optional[float], kept_ids) -> List[Tuple[int, str, float, bool]]:
        """The pre-labeled instances of a task the annotator decided on: each kept when a submitted
        region matches it (IoU >= 0.5), deleted otherwise."""
        rows = self.db.query(
            "SELECT id, label, similarity FROM suggestions WHERE project=? AND task IS NOT DISTINCT FROM ? AND "
            "arm='prelabel' AND "
            "similarity IS NOT NULL AND created_at <= ?", (str(project), task, float("inf") if before is None else before))
        return [(int(sid), label, float(sim), sid in kept_ids) for sid, label, sim in rows]

    def decisions(self, project: str, label: str) -> List[Tuple[float, bool]]:
        """``(similarity, kept)`` of every decided pre-labeled instance of a project's label."""
        return [(float(s), bool(k)) for s, k in self.db.query(
            "SELECT similarity, kept FROM decisions WHERE project=? AND label=? ORDER BY similarity", (str(project), label))]

    def calibrate(self, project: str, label: str, precision: float = 0.9, min_decisions: int = 30) -> Dict:
        """The instance threshold learned from the team's decisions: ``{"threshold", "decisions",
        "kept", "curve"}``; ``threshold`` is None below ``min_decisions`` (the default applies)."""
        return calibrate_threshold(self.decisions(project, label), precision, min_decisions)

    def forget(self, annotation: int, project: Optional[str] = None) -> None:
        """The annotation was deleted in Label Studio. ``project``: the one the notice named; its
        generation moves even when no decision is left to delete (the retry of a deletion whose
        bump failed after its delete committed would otherwise find nothing and bump nothing)."""
        with self._write() as c:
            c.execute("DELETE FROM outcomes WHERE annotation=?", (int(annotation),))
            projects = {p for (p,) in c.execute("SELECT DISTINCT project FROM decisions WHERE annotation=?", (int(annotation),))}
            c.execute("DELETE FROM decisions WHERE annotation=?", (int(annotation),))
        if project is not None:
            projects.add(str(project))
        for p in sorted(projects):
            self.on_decisions(p)

    def outcomes(self, project: Optional[str] = None) -> List[Dict]:
        try:
            self.flush()  # what was served is counted, even when read right after it was served
        except StatsBehind as e:  # the page still answers, with what is written
            log.warning("%s", e)
        q = ("SELECT annotation, region, project, task, label, suggestion, mode, arm, iou, accepted, clicks, extra_clicks, "
             "seconds FROM outcomes")
        rows = self.db.query(q + (" WHERE project=?" if project else "") + " ORDER BY annotation, region",
                                    (str(project),) if project else ())
        keys = ("annotation", "region", "project", "task", "label", "suggestion", "mode", "arm", "iou", "accepted",
                "clicks", "extra_clicks", "seconds")
        return [dict(zip(keys, r), accepted=bool(r[9])) for r in rows]

    # -- aggregates ------------------------------------------------------------------------
    def summary(self, project: Optional[str] = None) -> Dict:
        """Per project, label and arm: objects, acceptance rate, IoU mean and histogram (10 bins
        over [0, 1]), clicks per object (of the matched suggestion; 0 for a pre-label), seconds per
        object (Label Studio's lead time over the annotation's regions); plus suggestions served."""
        groups: Dict[Tuple[str, str, str], List[Dict]] = {}
        for o in self.outcomes(project):
            groups.setdefault((o["project"], o["label"], o["arm"] or "unmatched"), []).append(o)
        rows = []
        for (proj, label, arm), os_ in sorted(groups.items()):
            ious = [o["iou"] for o in os_ if o["iou"] is not None]
            clicks = [o["clicks"] for o in os_ if o["clicks"] is not None]
            secs = [o["seconds"] for o in os_ if o["seconds"] is not None]
            hist = np.histogram(ious, bins=10, range=(0.0, 1.0))[0].tolist() if ious else [0] * 10
            rows.append({"project": proj, "label": label, "arm": arm, "objects": len(os_),
                         "accepted": sum(o["accepted"] for o in os_),
                         "acceptance_rate": round(sum(o["accepted"] for o in os_) / len(os_), 4),
                         "iou_mean": round(float(np.mean(ious)), 4) if ious else None, "iou_histogram": hist,
                         "clicks_per_object": round(float(np.mean(clicks)), 3) if clicks else None,
                         "seconds_per_object": round(float(np.mean(secs)), 2) if secs else None})
        q = "SELECT project, arm, mode, COUNT(*) FROM suggestions" + (" WHERE project=?" if project else "") + \
            " GROUP BY project, arm, mode ORDER BY project, arm, mode"
        served = [{"project": r[0], "arm": r[1], "mode": r[2], "suggestions": r[3]}
                  for r in self.db.query(q, (str(project),) if project else ())]
        return {"objects": rows, "served": served}


def calibrate_threshold(decisions: List[Tuple[float, bool]], precision: float = 0.9, min_decisions: int = 30) -> Dict:
    """The similarity threshold that keeps ``precision`` with the most recall on ``(similarity,
    kept)`` decisions, and the precision / recall curve (one point per distinct similarity).
    ``threshold`` is None with fewer than ``min_decisions`` decisions or no kept instance; of equal
    recall the higher threshold (more precise); when none reaches ``precision``, the most precise
    one (ties: the higher)."""
    n, kept = len(decisions), sum(k for _, k in decisions)
    curve = []
    for t in sorted({s for s, _ in decisions}):
        sel = [k for s, k in decisions if s >= t]
        tp = sum(sel)
        curve.append({"threshold": round(t, 6), "precision": round(tp / len(sel), 4) if sel else 1.0,
                      "recall": round(tp / kept, 4) if kept else 0.0})
    out = {"threshold": None, "decisions": n, "kept": kept, "curve": curve}
    if n < min_decisions or not kept:
        return out
    ok = [c for c in curve if c["precision"] >= precision]
    best = max(ok, key=lambda c: (c["recall"], c["threshold"])) if ok else max(curve, key=lambda c: (c["precision"], c["threshold"]))
    out["threshold"] = best["threshold"]
    return out


def table(summary: Dict) -> str:
    """The summary's per-arm rows as a Markdown table (the CLI prints it)."""
    lines = ["| project | label | arm | objects | accepted | acceptance | IoU mean | clicks/object | s/object |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["objects"]:
        f = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(f"| {r['project']} | {r['label']} | {r['arm']} | {r['objects']} | {r['accepted']} | "
                     f"{f(r['acceptance_rate'], 2)} | {f(r['iou_mean'])} | {f(r['clicks_per_object'], 2)} | "
                     f"{f(r['seconds_per_object'], 1)} |")
    return "\n".join(lines)


def instance_table(report: List[Dict]) -> str:
    """The instance thresholds as a Markdown table: decisions, kept, threshold in force and how."""
    lines = ["| project | label | decided | kept | threshold | from |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report:
        lines.append(f"| {r['project']} | {r['label']} | {r['decisions']} | {r['kept']} | {r['threshold']:.3f} | {r['how']} |")
    return "\n".join(lines)


def plot_png(summary: Dict) -> bytes:
    """Acceptance and mean IoU per arm, and clicks per object (matplotlib, PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["objects"]
    names = [f"{r['label']}\n{r['arm']}" for r in rows] or ["(no data)"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    x = np.arange(len(rows))
    if rows:
        axes[0].bar(x - 0.2, [r["acceptance_rate"] for r in rows], 0.4, label="accepted unchanged")
        axes[0].bar(x + 0.2, [r["iou_mean"] or 0 for r in rows], 0.4, label="mean IoU")
        axes[1].bar(x, [r["clicks_per_object"] or 0 for r in rows], 0.5, color="tab:green")
    for ax, title in zip(axes, ("acceptance and IoU (0-1)", "clicks per object")):
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylim(0, 1.05)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    b = io.BytesIO()
    fig.savefig(b, format="png")
    plt.close(fig)
    return b.getvalue()
