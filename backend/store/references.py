"""Durable per-project, per-label references with their history, in the backend's database
(:mod:`backend.store.db`: an SQLite file ``references.db`` under the data directory, or the
PostgreSQL database every replica shares).

Tables::

    versions          every reference version ever set
    annotation_state  the last seen "Use as reference" state of each annotation
    blobs             content-addressed data: a feature vector (.npy), a mask (.png), the image
                      and a small thumbnail with the mask drawn (.jpg, for the admin page)

History. Nothing is overwritten: setting, editing, clearing (a ``none`` version) and restoring
each append a version. A label has up to ``exemplars`` slots (K, default 1 as in the paper); a
slot's current reference is its newest version not withdrawn. Deleting an annotation in Label
Studio withdraws the versions it made, so the slot falls back to the version before them (or
none), and the admin can restore any version (a new version copying it).

Crash safety. A version's blobs and its row commit in one transaction, so a crash at any moment
leaves every slot either the old version or the new one, complete. Blobs are named by their
content hash: a damaged one is detected, reported, and ignored (the label then answers in pure-IS
mode) instead of being used. Garbage collection deletes blobs no version names, in one
transaction with the writers' lock held.

Nothing is cached between requests: every read goes to the database, so a reference set through
one replica is what every replica answers with at its next click.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import sqlalchemy as sa
from PIL import Image, ImageDraw

from backend.store.db import Conn, Database, DatabaseUnavailable
from smartsam.selector import Reference

log = logging.getLogger("smartsam.references")

SCHEMA_VERSION = 3  # 3: blobs in the database (2 kept them as files under refs/)
THUMB_SIDE = 256

class ReferenceStoreError(RuntimeError):
    """The store cannot be used (newer schema, unreadable database): the message says what to do."""


class CorruptReference(RuntimeError):
    """A stored reference whose file is missing or damaged."""


@dataclass
class StoredReference:
    """One reference version (a row of ``versions``)."""

    id: int
    project: str
    label: str
    slot: int
    kind: str  # "mask", "image", "text", or "none" (the slot was cleared)
    extractor: str
    text: Optional[str]
    source: Dict  # how it was set: event, task, annotation, user, admin, restored
    annotation: Optional[int]  # the Label Studio annotation it came from
    how: str  # "first", "edited", "forced", "admin", "clear", "restore", "migrated"
    created_at: float
    feature_file: Optional[str]
    feature_sha: Optional[str]
    mask_file: Optional[str]
    image_file: Optional[str]
    thumb_file: Optional[str]
    withdrawn_at: Optional[float]
    withdrawn_reason: Optional[str]

    def public(self) -> Dict:
        return {"version": self.id, "project": self.project, "label": self.label, "slot": self.slot,
                "kind": self.kind, "extractor": self.extractor, "text": self.text, "source": self.source,
                "annotation": self.annotation, "how": self.how, "created_at": self.created_at,
                "has_mask": self.mask_file is not None, "has_thumbnail": self.thumb_file is not None,
                "withdrawn_at": self.withdrawn_at, "withdrawn_reason": self.withdrawn_reason}


_COLUMNS = ("id, project, label, slot, kind, extractor, text, source, annotation, how, created_at, feature_file, "
            "feature_sha, mask_file, image_file, thumb_file, withdrawn_at, withdrawn_reason")

# the newest live version of every slot
_CURRENT = ("SELECT MAX(id) FROM versions WHERE withdrawn_at IS NULL GROUP BY project, label, slot")


def thumbnail(image: np.ndarray, mask: Optional[np.ndarray] = None, side: int = THUMB_SIDE) -> bytes:
    """JPEG of ``image`` (H, W, 3) at most ``side`` px, with ``mask`` (H, W) tinted and outlined."""
    im = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if mask is not None:
        m = np.asarray(mask, bool)
        rgb = np.asarray(im).astype(np.float32)
        rgb[m] = 0.55 * rgb[m] + 0.45 * np.array([255, 64, 160], np.float32)
        im = Image.fromarray(rgb.astype(np.uint8))
    im.thumbnail((side, side))
    if mask is not None:
        small = np.asarray(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).resize(im.size)) > 127
        ys, xs = np.nonzero(small)
        if len(xs):
            ImageDraw.Draw(im).rectangle([xs.min(), ys.min(), xs.max(), ys.max()], outline=(255, 230, 0), width=2)
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=85)
    return b.getvalue()


TABLES = sa.MetaData()
sa.Table("versions", TABLES,
         sa.Column("id", sa.Integer, primary_key=True, autoincrement=True), sa.Column("project", sa.Text, nullable=False),
         sa.Column("label", sa.Text, nullable=False), sa.Column("slot", sa.Integer, nullable=False),
         sa.Column("kind", sa.Text, nullable=False), sa.Column("extractor", sa.Text, nullable=False),
         sa.Column("text", sa.Text), sa.Column("source", sa.Text, nullable=False), sa.Column("annotation", sa.Integer),
         sa.Column("how", sa.Text, nullable=False), sa.Column("created_at", sa.Double, nullable=False),
         sa.Column("feature_file", sa.Text), sa.Column("feature_sha", sa.Text), sa.Column("mask_file", sa.Text),
         sa.Column("image_file", sa.Text), sa.Column("thumb_file", sa.Text), sa.Column("withdrawn_at", sa.Double),
         sa.Column("withdrawn_reason", sa.Text),
         sa.Index("versions_slot", "project", "label", "slot", "id"), sa.Index("versions_annotation", "annotation"),
         sqlite_autoincrement=True)  # ids are never reused: the history and the admin name versions by id
sa.Table("annotation_state", TABLES, sa.Column("annotation", sa.Integer, primary_key=True, autoincrement=False),
         sa.Column("project", sa.Text, nullable=False), sa.Column("forced", sa.Integer, nullable=False),
         sa.Column("updated_at", sa.Double, nullable=False))
sa.Table("blobs", TABLES, sa.Column("name", sa.Text, primary_key=True),
         sa.Column("data", sa.LargeBinary, nullable=False))
# a project's generation: bumped by every write that changes what its answers depend on (its
# references here; its settings and its annotators' decisions by their stores' hooks), so that
# every process and replica knows with one read whether what it cached of the project still holds
sa.Table("generations", TABLES, sa.Column("project", sa.Text, primary_key=True),
         sa.Column("gen", sa.Integer, nullable=False))


class ReferenceStore:
    """Thread-, process- and replica-safe store of references (writers serialise).

    Args:
        data_dir: the data directory (``references.db`` goes there without ``database_url``).
        exemplars: K, the most references a label keeps at once (the paper uses 1); selection
            takes the best similarity to any of them.
        database_url: the shared database (``SMARTSAM_DATABASE_URL``); None: the SQLite file.
    """

    def __init__(self, data_dir: Path, exemplars: int = 1, database_url: Optional[str] = None) -> None:
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / "references.db"
        if int(exemplars) < 1:
            raise ValueError("exemplars (SMARTSAM_EXEMPLARS) must be at least 1")
        self.exemplars = int(exemplars)
        # K per project (a project's extra params may set its own); the store-wide K by default
        self.exemplars_for: Callable[[str], int] = lambda project: self.exemplars
        self.db = Database.open(database_url, self.db_path, "references")
        self._migrate()

    # -- database --------------------------------------------------------------------------
    def _query(self, sql: str, args=()) -> List:
        return self.db.query(sql, args)

    def _write(self):
        return self.db.write()

    def _migrate(self) -> None:
        where = self.db.where() if self.db.postgres else str(self.db_path)
        try:
            version = self.db.schema_version()
            if version is None and not self.db.postgres:
                # a file of an earlier release: its version is SQLite's user_version (0: new)
                version = int(self.db.query_one("PRAGMA user_version")[0])
        except DatabaseUnavailable:
            raise
        except sa.exc.DatabaseError as e:
            raise ReferenceStoreError(f"reference database {where} is unreadable ({getattr(e, 'orig', e)}); restore it "
                                      f"from a backup or move it aside to start empty") from None
        version = version or 0
        if version > SCHEMA_VERSION:
            raise ReferenceStoreError(f"reference database {where} has schema {version}, newer than this "
                                      f"backend's {SCHEMA_VERSION}: upgrade the backend, or restore an older backup")
        if version == SCHEMA_VERSION:
            return
        if version in (1, 2):
            self._migrate_sqlite_files(version)
        self.db.create(TABLES)
        with self._write() as c:
            self.db.set_schema_version(c, SCHEMA_VERSION)

    def _migrate_sqlite_files(self, version: int) -> None:
        """An SQLite store of an earlier release: 1 (one row per label) -> 2 (versions in slots),
        then 2 -> 3 (the files under ``refs/`` copied into ``blobs``; the folder is left as it was)."""
        self.db.create(TABLES)
        files = self.data_dir / "refs"
        with self._write() as c:
            if version == 1:
                for r in c.execute("SELECT * FROM refs ORDER BY created_at").fetchall():
                    src = json.loads(r[5])
                    ann = src.get("annotation") if isinstance(src.get("annotation"), int) else None
                    c.execute(f"INSERT INTO versions ({_COLUMNS}) VALUES (NULL,?,?,0,?,?,?,?,?,'migrated',?,?,?,?,?,NULL,NULL,NULL)",
                              (r[0], r[1], r[2], r[3], r[4], r[5], ann, r[6], r[7], r[8], r[9], r[10]))
                c.execute("DROP TABLE refs")
            names = {x for r in c.execute("SELECT feature_file, mask_file, image_file, thumb_file FROM versions")
                     for x in r if x}
            for name in sorted(names):
                try:
                    data = (files / name).read_bytes()
                except OSError as e:  # check() reports the version; the rest of the store moves on
                    log.warning("reference file %s not migrated: %s", name, e.strerror)
                    continue
                c.execute("INSERT INTO blobs (name, data) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, data))
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("reference store %s migrated from schema %d to %d (%d blobs)", self.db_path, version, SCHEMA_VERSION,
                 len(names))

    # -- blobs -----------------------------------------------------------------------------
    @staticmethod
    def _put_blob(c: Conn, data: bytes, suffix: str) -> str:
        name = f"{hashlib.sha256(data).hexdigest()}{suffix}"
        c.execute("INSERT INTO blobs (name, data) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, data))
        return name

    def _read_file(self, name: str, sha: Optional[str] = None) -> bytes:
        r = self.db.query_one("SELECT data FROM blobs WHERE name = ?", (name,))
        if r is None:
            raise CorruptReference(f"reference data {name} is missing")
        data = bytes(r[0])
        expected = sha or name.split(".")[0]
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptReference(f"reference data {name} is damaged (checksum mismatch)")
        return data

    # -- reading ---------------------------------------------------------------------------
    def _row(self, r) -> StoredReference:
        return StoredReference(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9], r[10], r[11],
                               r[12], r[13], r[14], r[15], r[16], r[17])

    def current(self, project: str, label: str) -> List[StoredReference]:
        """The label's live exemplars, by slot (at most ``exemplars``; empty when unset)."""
        return self._current_in(None, project, label)

    def k(self, project: str) -> int:
        """K, the exemplars a label of ``project`` keeps at once."""
        return int(self.exemplars_for(str(project)))

    def list(self, project: Optional[str] = None) -> List[StoredReference]:
        """Every live exemplar (of one project), ordered by project, label and slot."""
        q = f"SELECT {_COLUMNS} FROM versions WHERE id IN ({_CURRENT}) AND kind != 'none'"
        args: tuple = ()
        if project is not None:
            q += " AND project=? AND slot < ?"
            args += (str(project), self.k(project))
        rows = [self._row(r) for r in self._query(q + " ORDER BY project, label, slot", args)]
        return rows if project is not None else [m for m in rows if m.slot < self.k(m.project)]

    def projects(self) -> List[str]:
        return [r[0] for r in self._query("SELECT DISTINCT project FROM versions ORDER BY project")]

    def labels(self, project: str) -> List[str]:
        """Labels that have, or had, a reference in ``project``."""
        return [r[0] for r in self._query("SELECT DISTINCT label FROM versions WHERE project=? ORDER BY label",
                                                  (str(project),))]

    def history(self, project: str, label: Optional[str] = None) -> List[StoredReference]:
        """Every version (newest first), live or not."""
        q = f"SELECT {_COLUMNS} FROM versions WHERE project=?" + (" AND label=?" if label is not None else "")
        args = (str(project),) + ((label,) if label is not None else ())
        return [self._row(r) for r in self._query(q + " ORDER BY id DESC", args)]

    def version(self, version_id: int) -> Optional[StoredReference]:
        r = self.db.query_one(f"SELECT {_COLUMNS} FROM versions WHERE id=?", (int(version_id),))
        return None if r is None else self._row(r)

    def meta(self, project: str, label: str) -> Optional[StoredReference]:
        """The label's first live exemplar (slot order), None when unset."""
        cur = self.current(project, label)
        return cur[0] if cur else None

    def _feature(self, m: StoredReference) -> np.ndarray:
        data = self._read_file(m.feature_file, m.feature_sha or None)
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CorruptReference(f"reference for label {m.label!r} is unreadable ({e})") from None

    def get(self, project: str, label: str) -> Optional[Reference]:
        """The label's reference, None when unset; CorruptReference when damaged. With several
        exemplars, one :class:`Reference` holding all their features (``(K, D)``), made by the
        same feature model (exemplars of another model are left out and logged)."""
        cur = self.current(project, label)
        if not cur:
            return None
        first = cur[0]
        feats = [self._feature(first)]
        for m in cur[1:]:
            if m.extractor != first.extractor or (m.kind == "text") != (first.kind == "text"):
                log.warning("project %s label %r: exemplar %d (%s, %s) left out: not comparable with %s, %s", project,
                            label, m.id, m.kind, m.extractor, first.kind, first.extractor)
                continue
            feats.append(self._feature(m))
        try:
            return Reference(first.kind, np.stack([f.reshape(-1) for f in feats]) if len(feats) > 1 else feats[0],
                             first.extractor, first.text)
        except ValueError as e:
            raise CorruptReference(f"reference for label {label!r} is unreadable ({e})") from None

    def mask_png(self, project: str, label: str) -> Optional[bytes]:
        m = self.meta(project, label)
        if m is None or m.mask_file is None:
            return None
        return self._read_file(m.mask_file)

    def version_file(self, version_id: int, what: str) -> Optional[bytes]:
        """A version's ``mask`` (PNG), ``thumb`` or ``image`` (JPEG); None when it has none."""
        m = self.version(version_id)
        name = None if m is None else {"mask": m.mask_file, "thumb": m.thumb_file, "image": m.image_file}[what]
        return None if name is None else self._read_file(name)

    # -- writing ---------------------------------------------------------------------------
    def put(self, project: str, label: str, reference: Reference, source: Dict, mask: Optional[np.ndarray] = None,
            image: Optional[np.ndarray] = None, annotation: Optional[int] = None, how: str = "admin",
            policy: str = "replace") -> Optional[int]:
        """Append a version for (project, label); returns its id, or None when the policy keeps the
        current one.

        Args:
            reference: the feature(s) to store (``(D,)``).
            source: how it was set (shown in the history).
            mask: ``(H, W)`` bool, the object (image + mask references).
            image: ``(H, W, 3)`` uint8, kept with a thumbnail (the mask drawn on it).
            annotation: the Label Studio annotation it came from (deleting it withdraws this version).
            how: a word for the history ("first", "edited", "forced", "admin", ...).
            policy: "replace": this becomes the label's only exemplar (the other slots are cleared);
                "auto" (annotations): the annotation's own slot is updated (skipped when unchanged),
                else a free slot is taken, else nothing changes.
        """
        if policy not in ("replace", "auto"):
            raise ValueError(f"unknown policy {policy!r}")
        buf = io.BytesIO()
        np.save(buf, reference.feature.astype(np.float32), allow_pickle=False)
        blobs = {"feature": (buf.getvalue(), ".npy")}
        if mask is not None:
            b = io.BytesIO()
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(b, format="PNG")
            blobs["mask"] = (b.getvalue(), ".png")
        if image is not None:
            b = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image[..., :3])).save(b, format="JPEG", quality=92)
            blobs["image"] = (b.getvalue(), ".jpg")
            blobs["thumb"] = (thumbnail(image, mask), ".jpg")
        names = {k: f"{hashlib.sha256(d).hexdigest()}{x}" for k, (d, x) in blobs.items()}
        feature_file, mask_file = names["feature"], names.get("mask")
        row = dict(kind=reference.kind, extractor=reference.extractor, text=reference.text, source=json.dumps(source),
                   annotation=annotation, how=how, feature_file=feature_file, feature_sha=feature_file.split(".")[0],
                   mask_file=mask_file, image_file=names.get("image"), thumb_file=names.get("thumb"))
        with self._write() as c:
            cur = self._current_in(c, project, label)
            if policy == "replace":
                if annotation is not None and [(m.slot, m.annotation, m.how, m.feature_sha, m.mask_file) for m in cur] == [
                        (0, annotation, how, row["feature_sha"], mask_file)]:
                    return None  # already so by the same rule: the same annotation applied again (a crash, a retry)
                slot = 0
                for other in cur:
                    if other.slot != 0:
                        self._insert(c, project, label, other.slot, _none_row(source, annotation, how))
            else:
                own = [m for m in cur if annotation is not None and m.annotation == annotation]
                if own:
                    m = own[0]
                    if (m.feature_sha, m.mask_file) == (row["feature_sha"], mask_file):
                        return None  # the same mask again (a repeated delivery, an unrelated edit)
                    slot = m.slot
                else:
                    used = {m.slot for m in cur}
                    free = [s for s in range(self.k(project)) if s not in used]
                    if not free:
                        return None
                    slot = free[0]
            for data, suffix in blobs.values():  # in the version's transaction: both or neither
                self._put_blob(c, data, suffix)
            vid = self._insert(c, project, label, slot, row)
            self._bump(c, project)
        log.info("reference set: project %s label %r slot %d kind %s how %s source %s", project, label, slot,
                 reference.kind, how, source)
        return vid

    def _current_in(self, c: Optional[Conn], project: str, label: str) -> List[StoredReference]:
        q = (f"SELECT {_COLUMNS} FROM versions WHERE id IN ({_CURRENT}) AND project=? AND label=? AND kind != 'none' "
             f"AND slot < ? ORDER BY slot")
        args = (str(project), label, self.k(project))
        return [self._row(r) for r in (c.execute(q, args) if c is not None else self._query(q, args))]

    def _insert(self, c: Conn, project: str, label: str, slot: int, row: Dict) -> int:
        cur = c.execute(f"INSERT INTO versions ({_COLUMNS[4:]}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,NULL) "
                        f"RETURNING id",
                        (str(project), label, slot, row["kind"], row["extractor"], row["text"], row["source"],
                         row["annotation"], row["how"], time.time(), row["feature_file"], row["feature_sha"],
                         row["mask_file"], row["image_file"], row["thumb_file"]))
        return int(cur.scalar_one())

    def delete(self, project: str, label: Optional[str] = None, source: Optional[Dict] = None) -> int:
        """Clear one label's reference (or all of a project's): a ``none`` version in each live
        slot, so the history keeps what was there. Returns how many labels were cleared."""
        source = source or {"admin": "clear"}
        labels = set()
        with self._write() as c:
            for lab in ([label] if label is not None else
                        [r[0] for r in c.execute("SELECT DISTINCT label FROM versions WHERE project=?", (str(project),))]):
                for m in self._current_in(c, project, lab):
                    self._insert(c, project, lab, m.slot, _none_row(source, None, "clear"))
                    labels.add(lab)
            self._bump(c, project)
        return len(labels)

    def restore(self, version_id: int, source: Optional[Dict] = None) -> int:
        """Make version ``version_id`` current again (in its slot) as a new version; returns its id.
        A ``none`` version restores "no reference". KeyError when there is no such version."""
        m = self.version(version_id)
        if m is None:
            raise KeyError(f"no reference version {version_id}")
        src = dict(m.source, restored=m.id, **(source or {}))
        with self._write() as c:
            vid = self._insert(c, m.project, m.label, m.slot, dict(
                kind=m.kind, extractor=m.extractor, text=m.text, source=json.dumps(src), annotation=m.annotation,
                how="restore", feature_file=m.feature_file, feature_sha=m.feature_sha, mask_file=m.mask_file,
                image_file=m.image_file, thumb_file=m.thumb_file))
            self._bump(c, m.project)
        log.info("reference restored: project %s label %r version %d -> %d", m.project, m.label, m.id, vid)
        return vid

    def withdraw_annotation(self, annotation: int, reason: str, project: Optional[str] = None,
                            label: Optional[str] = None) -> List[StoredReference]:
        """The annotation is gone from Label Studio (or, with ``project`` and ``label``, no longer
        has a mask of that label): withdraw the versions it made there, so each slot falls back
        to its version before them. Returns the withdrawn versions."""
        where, args = "annotation=? AND withdrawn_at IS NULL", [int(annotation)]
        if label is not None:
            where += " AND project=? AND label=?"
            args += [str(project), label]
        with self._write() as c:
            rows = [self._row(r) for r in c.execute(f"SELECT {_COLUMNS} FROM versions WHERE {where}", args)]
            c.execute(f"UPDATE versions SET withdrawn_at=?, withdrawn_reason=? WHERE {where}", [time.time(), reason, *args])
            for p in sorted({m.project for m in rows}):
                self._bump(c, p)
            if label is None:
                c.execute("DELETE FROM annotation_state WHERE annotation=?", (int(annotation),))
        return rows

    # -- generations -------------------------------------------------------------------------
    def generation(self, project: str) -> int:
        """The project's generation (0 before its first change): one read."""
        r = self.db.query_one("SELECT gen FROM generations WHERE project=?", (str(project),))
        return int(r[0]) if r else 0

    def bump(self, project: str) -> None:
        """A change to what the project's answers depend on, made elsewhere (its settings, its
        annotators' decisions): whoever cached the project reads it again."""
        with self._write() as c:
            self._bump(c, project)

    @staticmethod
    def _bump(c: Conn, project: str) -> None:
        c.execute("INSERT INTO generations (project, gen) VALUES (?, 1) ON CONFLICT (project) DO UPDATE SET "
                  "gen = generations.gen + 1", (str(project),))

    # -- "Use as reference" as a transition ---------------------------------------------------
    def annotation_forced(self, annotation: int) -> bool:
        """Whether the choice was ticked the last time this annotation was seen (False if never)."""
        r = self.db.query_one("SELECT forced FROM annotation_state WHERE annotation=?", (int(annotation),))
        return bool(r and r[0])

    def set_annotation_forced(self, annotation: int, project: str, forced: bool) -> None:
        with self._write() as c:
            c.execute("INSERT INTO annotation_state (annotation, project, forced, updated_at) VALUES (?,?,?,?) "
                      "ON CONFLICT (annotation) DO UPDATE SET project = excluded.project, forced = excluded.forced, "
                      "updated_at = excluded.updated_at",
                      (int(annotation), str(project), int(bool(forced)), time.time()))

    # -- maintenance -----------------------------------------------------------------------
    def collect_garbage(self) -> int:
        """Delete the blobs no version names; how many (one transaction: a writer's new version
        and its blobs commit together, before or after it)."""
        with self._write() as c:
            return int(c.execute(
                "DELETE FROM blobs WHERE name NOT IN (SELECT feature_file FROM versions WHERE feature_file IS NOT NULL "
                "UNION SELECT mask_file FROM versions WHERE mask_file IS NOT NULL UNION SELECT image_file FROM versions "
                "WHERE image_file IS NOT NULL UNION SELECT thumb_file FROM versions WHERE thumb_file IS NOT NULL)").rowcount)

    def check(self) -> List[str]:
        """Integrity problems, as sentences (empty when all is well)."""
        problems = self.db.integrity()
        for m in self.list():
            try:
                self._feature(m)
                if m.mask_file:
                    self._read_file(m.mask_file)
            except CorruptReference as e:
                problems.append(f"project {m.project} label {m.label!r} (version {m.id}): {e}")
        return problems


def _none_row(source: Dict, annotation: Optional[int], how: str) -> Dict:
    """A cleared slot."""
    return dict(kind="none", extractor="", text=None, source=json.dumps(source), annotation=annotation, how=how,
                feature_file=None, feature_sha=None, mask_file=None, image_file=None, thumb_file=None)
