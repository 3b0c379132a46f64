"""The durable side of the background work: what ``/webhook`` answered 201 for and what
"Retrieve predictions" handed to the background survive a crash (``kill -9``) and a restart, and
are shared by every process and replica on the same database (:mod:`backend.db`).

Each notice and each task is written (committed before the answer goes out) when it is accepted
and deleted when its work is done. Rows are claimed with a lease: the claiming process
(``host:pid``; a notice's ``owner``, a task's ``claimed_by``, while a task's ``owner`` is the
process that queued it) renews its leases while it lives (:meth:`WorkQueue.renew`), and a row
whose lease ran out (its process died, its machine went away) is claimed by another. A notice is
first claimed by the process that accepted it (its order is kept); a pre-labeling task is claimed
by whichever worker asks first (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serialises
writers), so "Retrieve predictions" sent to one replica is worked by all. A process starting
frees at once the rows of processes of its own host that are no longer running.

A task whose prediction was written just before a crash is predicted again after it and then
skipped at write time (Label Studio already holds that model version's prediction), so every
task still ends with exactly one. A notice that Label Studio delivers twice, or to two replicas,
is applied once: :meth:`WorkQueue.first_application` records each annotation version applied.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import sqlalchemy as sa

from .db import Database

TABLES = sa.MetaData()
sa.Table("events", TABLES, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("action", sa.Text, nullable=False), sa.Column("annotation", sa.Integer, nullable=False),
         sa.Column("claimed", sa.Text), sa.Column("queued_at", sa.Double, nullable=False),
         sa.Column("owner", sa.Text, nullable=False), sa.Column("lease_until", sa.Double),
         sqlite_autoincrement=True)
sa.Table("prelabel", TABLES, sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("project", sa.Text, nullable=False), sa.Column("task", sa.Integer, nullable=False),
         sa.Column("body", sa.Text, nullable=False), sa.Column("label_config", sa.Text, nullable=False),
         sa.Column("queued_at", sa.Double, nullable=False), sa.Column("owner", sa.Text, nullable=False),
         sa.Column("lease_until", sa.Double), sa.Column("claimed_by", sa.Text),
         sa.UniqueConstraint("project", "task"), sqlite_autoincrement=True)
# one row per annotation version applied: (annotation, Label Studio's updated_at, an update or not)
sa.Table("applied_events", TABLES, sa.Column("annotation", sa.Integer, primary_key=True, autoincrement=False),
         sa.Column("updated_at", sa.Text, primary_key=True), sa.Column("updated", sa.Integer, primary_key=True),
         sa.Column("applied_at", sa.Double, nullable=False))

Event = Tuple[int, str, int, Optional[str]]  # (row, action, annotation, claimed project)


class WorkQueue:
    """The accepted webhook notices and background pre-labeling tasks, in the database.

    Args:
        sqlite_path: the SQLite file without ``database_url`` (``SMARTSAM_DATA_DIR/jobs.db``).
        database_url: the shared database (``SMARTSAM_DATABASE_URL``).
        lease_s: how long a claim holds without a renewal (a dead process's rows wait this long
            before another replica takes them; a live one renews every third of it).
    """

    def __init__(self, sqlite_path: Path, database_url: Optional[str] = None, lease_s: float = 30.0) -> None:
        self.db = Database.open(database_url, Path(sqlite_path), "work_queue")
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = float(lease_s)
        self.db.create(TABLES)
        # a jobs.db of an earlier release: no leases yet
        self.db.add_columns("events", {"lease_until": "REAL"})
        self.db.add_columns("prelabel", {"lease_until": "REAL", "claimed_by": "TEXT"})

    def take_over(self) -> Dict[str, int]:
        """Take over the rows of processes of this host that are no longer running (at start: no
        need to wait for their leases): their notices and the tasks they queued become this
        process's, the tasks they had claimed are free again. How many, per table."""
        host = socket.gethostname()
        n = {"events": 0, "prelabel": 0}
        with self.db.write() as c:
            owners = {o for (o,) in c.execute("SELECT owner FROM events UNION SELECT owner FROM prelabel UNION "
                                              "SELECT claimed_by FROM prelabel WHERE claimed_by IS NOT NULL")}
            for o in owners:
                h, _, pid = o.rpartition(":")
                if o != self.owner and h == host and pid.isdigit() and not _running(int(pid)):
                    n["events"] += c.execute("UPDATE events SET lease_until = 0, owner = ? WHERE owner = ?",
                                             (self.owner, o)).rowcount
                    n["prelabel"] += c.execute("UPDATE prelabel SET owner = ? WHERE owner = ?", (self.owner, o)).rowcount
                    c.execute("UPDATE prelabel SET claimed_by = NULL, lease_until = 0 WHERE claimed_by = ?", (o,))
        return n

    def renew(self) -> None:
        """Extend this process's leases (the workers call it every third of ``lease_s``)."""
        until = time.time() + self.lease_s
        with self.db.write() as c:
            c.execute("UPDATE events SET lease_until = ? WHERE owner = ?", (until, self.owner))
            c.execute("UPDATE prelabel SET lease_until = ? WHERE claimed_by = ?", (until, self.owner))

    # -- events ----------------------------------------------------------------------------
    def add_event(self, action: str, annotation: int, claimed: Optional[str]) -> int:
        """Record a notice, claimed by this process; its row id (committed when this returns)."""
        now = time.time()
        with self.db.write() as c:
            return int(c.execute("INSERT INTO events (action, annotation, claimed, queued_at, owner, lease_until) "
                                 "VALUES (?,?,?,?,?,?) RETURNING id",
                                 (action, int(annotation), claimed, now, self.owner, now + self.lease_s)).scalar_one())

    def event_done(self, row: int) -> None:
        with self.db.write() as c:
            c.execute("DELETE FROM events WHERE id = ?", (int(row),))

    def claim_events(self) -> List[Event]:
        """Claim the notices whose lease ran out (their process is gone), oldest first."""
        now = time.time()
        with self.db.write() as c:
            rows = [tuple(r) for r in c.execute(
                "SELECT id, action, annotation, claimed FROM events WHERE COALESCE(lease_until, 0) < ? ORDER BY id",
                (now,))]
            for r in rows:
                c.execute("UPDATE events SET owner = ?, lease_until = ? WHERE id = ?", (self.owner, now + self.lease_s, r[0]))
        return rows

    def first_application(self, annotation: int, updated_at: str, updated: bool) -> bool:
        """Record that this annotation version is being applied; False when it was already (by any
        process or replica)."""
        with self.db.write() as c:
            return c.execute("INSERT INTO applied_events (annotation, updated_at, updated, applied_at) VALUES (?,?,?,?) "
                             "ON CONFLICT DO NOTHING RETURNING annotation",
                             (int(annotation), str(updated_at), int(bool(updated)), time.time())).first() is not None

    def forget_application(self, annotation: int, updated_at: str, updated: bool) -> None:
        """The application failed: a later delivery may try again."""
        with self.db.write() as c:
            c.execute("DELETE FROM applied_events WHERE annotation = ? AND updated_at = ? AND updated = ?",
                      (int(annotation), str(updated_at), int(bool(updated))))

    # -- pre-labeling tasks ------------------------------------------------------------------
    def add_tasks(self, project: str, tasks: List[Dict], label_config: str) -> List[Dict]:
        """Record tasks for background pre-labeling, unclaimed (any worker of any replica takes
        them); the ones that were not queued already."""
        new = []
        with self.db.write() as c:
            for t in tasks:
                r = c.execute("INSERT INTO prelabel (project, task, body, label_config, queued_at, owner, lease_until) "
                              "VALUES (?,?,?,?,?,?,0) ON CONFLICT (project, task) DO NOTHING RETURNING seq",
                              (project, int(t["id"]), json.dumps(t), label_config, time.time(), self.owner)).first()
                if r is not None:
                    new.append(t)
        return new

    def claim_task(self) -> Optional[Tuple[str, Dict, str]]:
        """Claim the oldest task no live worker holds: ``(project, task, label_config)``, or None."""
        now = time.time()
        with self.db.write(serial=False) as c:
            lock = " FOR UPDATE SKIP LOCKED" if self.db.postgres else ""
            r = c.execute("SELECT seq, project, body, label_config FROM prelabel WHERE COALESCE(lease_until, 0) < ? "
                          "ORDER BY seq LIMIT 1" + lock, (now,)).first()
            if r is None:
                return None
            c.execute("UPDATE prelabel SET claimed_by = ?, lease_until = ? WHERE seq = ?", (self.owner, now + self.lease_s, r[0]))
        return r[1], json.loads(r[2]), r[3]

    def task_done(self, project: str, task: int) -> None:
        with self.db.write() as c:
            c.execute("DELETE FROM prelabel WHERE project = ? AND task = ?", (project, int(task)))

    def has_task(self, project: str, task: int) -> bool:
        """Whether the task waits in the queue or is being worked (by any replica)."""
        return self.db.query_one("SELECT 1 FROM prelabel WHERE project = ? AND task = ?", (project, int(task))) is not None

    def waiting_tasks(self) -> int:
        return self.db.count("prelabel")

    def tasks(self) -> List[Tuple[str, Dict, str]]:
        """Every task not done yet, oldest first: ``(project, task, label_config)``."""
        rows = self.db.query("SELECT project, body, label_config FROM prelabel ORDER BY seq")
        return [(p, json.loads(body), cfg) for p, body, cfg in rows]

    def events(self) -> List[Event]:
        """Every notice not done yet, oldest first."""
        return [tuple(r) for r in self.db.query("SELECT id, action, annotation, claimed FROM events ORDER BY id")]



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
