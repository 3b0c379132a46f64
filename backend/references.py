"""Durable per-project, per-label references: SQLite (WAL) rows pointing at files written atomically.

Layout under the data directory::

    references.db          one row per (project, label): kind, feature model, file names, hashes
    refs/<sha256>.npy      the feature vector
    refs/<sha256>.png      the mask (image + mask references), for viewing and re-featurising
    refs/<sha256>.jpg      the reference image (image references)

A file is fully written, fsynced and renamed into place before the row that names it commits,
so a crash at any moment leaves every reference either the old one or the new one, complete.
Files are named by their content hash, and a row stores the hash: a damaged file is detected,
reported, and ignored (the label then answers in pure-IS mode) instead of being used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from smartsam.selector import Reference

log = logging.getLogger("smartsam.references")

SCHEMA_VERSION = 1


class ReferenceStoreError(RuntimeError):
    """The store cannot be used (newer schema, unreadable database): the message says what to do."""


class CorruptReference(RuntimeError):
    """A stored reference whose file is missing or damaged."""


@dataclass
class StoredReference:
    project: str
    label: str
    kind: str
    extractor: str
    text: Optional[str]
    source: Dict
    created_at: float
    feature_file: str
    feature_sha: str
    mask_file: Optional[str]
    image_file: Optional[str]

    def public(self) -> Dict:
        return {"project": self.project, "label": self.label, "kind": self.kind, "extractor": self.extractor,
                "text": self.text, "source": self.source, "created_at": self.created_at,
                "has_mask": self.mask_file is not None}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ReferenceStore:
    """Thread- and process-safe store of references (SQLite serialises writers).

    Args:
        data_dir: the one directory holding everything (a Docker volume in production).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.files = self.data_dir / "refs"
        self.files.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "references.db"
        self._local = threading.local()
        self._migrate()

    # -- database --------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA busy_timeout=30000")
            self._local.conn = c
        return c

    def _migrate(self) -> None:
        try:
            c = self._conn()
            version = c.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise ReferenceStoreError(f"reference database {self.db_path} is unreadable ({e}); restore it from a "
                                      f"backup or move it aside to start empty") from None
        if version > SCHEMA_VERSION:
            raise ReferenceStoreError(f"reference database {self.db_path} has schema {version}, newer than this "
                                      f"backend's {SCHEMA_VERSION}: upgrade the backend, or restore an older backup")
        c.execute("BEGIN IMMEDIATE")
        try:
            if version == 0:
                c.execute("""CREATE TABLE IF NOT EXISTS refs (
                    project TEXT NOT NULL, label TEXT NOT NULL, kind TEXT NOT NULL, extractor TEXT NOT NULL,
                    text TEXT, source TEXT NOT NULL, created_at REAL NOT NULL,
                    feature_file TEXT NOT NULL, feature_sha TEXT NOT NULL, mask_file TEXT, image_file TEXT,
                    PRIMARY KEY (project, label))""")
            # Future schema changes add "elif version == N:" steps here, each moving N -> N + 1.
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            c.execute("COMMIT")
        except Exception:
            c.execute("ROLLBACK")
            raise

    # -- files -----------------------------------------------------------------------------
    def _write_file(self, data: bytes, suffix: str) -> str:
        sha = hashlib.sha256(data).hexdigest()
        name = f"{sha}{suffix}"
        dest = self.files / name
        if dest.exists():
            # reused by content: refresh its time so a concurrent garbage collection (which only
            # removes unnamed files older than a minute) cannot delete it before our row names it
            try:
                os.utime(dest)
            except FileNotFoundError:
                pass
        if not dest.exists():
            tmp = self.files / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            _fsync_dir(self.files)
        return name

    def _read_file(self, name: str, sha: Optional[str] = None) -> bytes:
        path = self.files / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CorruptReference(f"reference file {name} is missing ({e.strerror})") from None
        expected = sha or name.split(".")[0]
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptReference(f"reference file {name} is damaged (checksum mismatch)")
        return data

    # -- API -------------------------------------------------------------------------------
    def put(self, project: str, label: str, reference: Reference, source: Dict, mask: Optional[np.ndarray] = None,
            image: Optional[np.ndarray] = None, only_if_absent: bool = False) -> bool:
        """Store ``reference`` for (project, label). Returns False when ``only_if_absent`` and one exists."""
        buf = io.BytesIO()
        np.save(buf, reference.feature.astype(np.float32), allow_pickle=False)
        feature_file = self._write_file(buf.getvalue(), ".npy")
        mask_file = image_file = None
        if mask is not None:
            b = io.BytesIO()
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(b, format="PNG")
            mask_file = self._write_file(b.getvalue(), ".png")
        if image is not None:
            b = io.BytesIO()
            Image.fromarray(image).save(b, format="JPEG", quality=92)
            image_file = self._write_file(b.getvalue(), ".jpg")
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            if only_if_absent and c.execute("SELECT 1 FROM refs WHERE project=? AND label=?", (str(project), label)).fetchone():
                c.execute("ROLLBACK")
                return False
            c.execute("INSERT OR REPLACE INTO refs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                      (str(project), label, reference.kind, reference.extractor, reference.text, json.dumps(source),
                       time.time(), feature_file, feature_file.split(".")[0], mask_file, image_file))
            c.execute("COMMIT")
        except Exception:
            c.execute("ROLLBACK")
            raise
        log.info("reference set: project %s label %r kind %s source %s", project, label, reference.kind, source)
        return True

    def _row(self, r) -> StoredReference:
        return StoredReference(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9], r[10])

    def list(self, project: Optional[str] = None) -> List[StoredReference]:
        c = self._conn()
        q = "SELECT * FROM refs" + (" WHERE project=?" if project is not None else "") + " ORDER BY project, label"
        return [self._row(r) for r in c.execute(q, (() if project is None else (str(project),)))]

    def meta(self, project: str, label: str) -> Optional[StoredReference]:
        r = self._conn().execute("SELECT * FROM refs WHERE project=? AND label=?", (str(project), label)).fetchone()
        return None if r is None else self._row(r)

    def get(self, project: str, label: str) -> Optional[Reference]:
        """The reference for (project, label), None when unset; CorruptReference when damaged."""
        m = self.meta(project, label)
        if m is None:
            return None
        data = self._read_file(m.feature_file, m.feature_sha or None)
        try:
            feat = np.load(io.BytesIO(data), allow_pickle=False)
            return Reference(m.kind, feat, m.extractor, m.text)
        except (ValueError, OSError) as e:
            raise CorruptReference(f"reference for label {label!r} is unreadable ({e})") from None

    def mask_png(self, project: str, label: str) -> Optional[bytes]:
        m = self.meta(project, label)
        if m is None or m.mask_file is None:
            return None
        return self._read_file(m.mask_file)

    def delete(self, project: str, label: Optional[str] = None) -> int:
        """Remove one label's reference (or all of a project's). Returns how many rows went."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            if label is None:
                n = c.execute("DELETE FROM refs WHERE project=?", (str(project),)).rowcount
            else:
                n = c.execute("DELETE FROM refs WHERE project=? AND label=?", (str(project), label)).rowcount
            c.execute("COMMIT")
        except Exception:
            c.execute("ROLLBACK")
            raise
        self.collect_garbage()
        return n

    def collect_garbage(self, min_age_s: float = 60.0) -> int:
        """Delete files no row names (older than ``min_age_s``, so a writer's fresh file survives)."""
        used = set()
        for r in self._conn().execute("SELECT feature_file, mask_file, image_file FROM refs"):
            used.update(x for x in r if x)
        n = 0
        now = time.time()
        for p in self.files.iterdir():
            if p.name not in used and now - p.stat().st_mtime > min_age_s:
                p.unlink(missing_ok=True)
                n += 1
        return n

    def check(self) -> List[str]:
        """Integrity problems, as sentences (empty when all is well)."""
        problems = []
        r = self._conn().execute("PRAGMA integrity_check").fetchone()[0]
        if r != "ok":
            problems.append(f"database: {r}")
        for m in self.list():
            try:
                self.get(m.project, m.label)
            except CorruptReference as e:
                problems.append(f"project {m.project} label {m.label!r}: {e}")
        return problems
