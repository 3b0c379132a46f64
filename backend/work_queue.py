"""The durable side of the background work: what ``/webhook`` answered 201 for and what
"Retrieve predictions" handed to the background survive a crash (``kill -9``) and a restart.

Each notice and each task is written (SQLite under ``SMARTSAM_DATA_DIR``, WAL, synchronous
FULL: on disk before the answer goes out) when it is accepted and deleted when its work is
done; at start the worker threads take up what is left, in the order it came. A task whose
prediction was written just before a crash is predicted again after it and then skipped at
write time (Label Studio already holds that model version's prediction), so every task still
ends with exactly one.

Several worker processes (``SMARTSAM_WORKERS``) share the file: each row names the process that
accepted it (``host:pid``), and a process starting takes over only the rows of processes that
are no longer running, so no row is worked twice.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .db import Database

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, action TEXT NOT NULL, "
    "annotation INTEGER NOT NULL, claimed TEXT, queued_at REAL NOT NULL, owner TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS prelabel (seq INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, "
    "task INTEGER NOT NULL, body TEXT NOT NULL, label_config TEXT NOT NULL, queued_at REAL NOT NULL, "
    "owner TEXT NOT NULL, UNIQUE (project, task))",
)


class WorkQueue:
    """The accepted webhook notices and background pre-labeling tasks, on disk.

    Args:
        path: the SQLite file (``SMARTSAM_DATA_DIR/jobs.sqlite3``).
    """

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = Database(Path(path))
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        with self._db.write() as c:
            for statement in SCHEMA:
                c.execute(statement)

    def take_over(self) -> int:
        """Make this process the owner of every row whose process is gone; how many."""
        host = socket.gethostname()
        n = 0
        with self._db.write() as c:
            owners = {o for (o,) in c.execute("SELECT owner FROM events UNION SELECT owner FROM prelabel")}
            for o in owners:
                h, _, pid = o.rpartition(":")
                if o != self.owner and h == host and not _running(int(pid)):
                    for table in ("events", "prelabel"):
                        n += c.execute(f"UPDATE {table} SET owner = ? WHERE owner = ?", (self.owner, o)).rowcount
        return n

    # -- events ----------------------------------------------------------------------------
    def add_event(self, action: str, annotation: int, claimed: Optional[str]) -> int:
        """Record a notice; its row id (on disk when this returns)."""
        with self._db.write() as c:
            return int(c.execute("INSERT INTO events (action, annotation, claimed, queued_at, owner) VALUES (?,?,?,?,?)",
                                 (action, int(annotation), claimed, time.time(), self.owner)).lastrowid)

    def event_done(self, row: int) -> None:
        with self._db.write() as c:
            c.execute("DELETE FROM events WHERE id = ?", (int(row),))

    def events(self) -> List[Tuple[int, str, int, Optional[str]]]:
        """This process's notices not done yet, oldest first: ``(row, action, annotation, claimed)``."""
        return [tuple(r) for r in self._db.conn().execute(
            "SELECT id, action, annotation, claimed FROM events WHERE owner = ? ORDER BY id", (self.owner,))]

    # -- pre-labeling tasks ------------------------------------------------------------------
    def add_tasks(self, project: str, tasks: List[Dict], label_config: str) -> List[Dict]:
        """Record tasks for background pre-labeling; the ones that were not queued already."""
        new = []
        with self._db.write() as c:
            for t in tasks:
                cur = c.execute("INSERT OR IGNORE INTO prelabel (project, task, body, label_config, queued_at, owner) "
                                "VALUES (?,?,?,?,?,?)", (project, int(t["id"]), json.dumps(t), label_config, time.time(),
                                                         self.owner))
                if cur.rowcount:
                    new.append(t)
        return new

    def task_done(self, project: str, task: int) -> None:
        with self._db.write() as c:
            c.execute("DELETE FROM prelabel WHERE project = ? AND task = ?", (project, int(task)))

    def tasks(self) -> List[Tuple[str, Dict, str]]:
        """This process's tasks not done yet, oldest first: ``(project, task, label_config)``."""
        rows = self._db.conn().execute("SELECT project, body, label_config FROM prelabel WHERE owner = ? ORDER BY seq",
                                       (self.owner,))
        return [(p, json.loads(body), cfg) for p, body, cfg in rows]


def _running(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
