"""The durable side of the background work: what ``/webhook`` answered 201 for and what
"Retrieve predictions" handed to the background survive a crash (``kill -9``), a restart and a
Label Studio or database outage, and are shared by every process and replica on one database
(:mod:`backend.store.db`).

A row leaves the queue only when its work is done or definitively refused (Label Studio answers
404 or 403, the payload is invalid). A transient failure (a timeout, a refused connection, a 5xx
while Label Studio restarts, the database away) keeps the row, counts an attempt, records the
reason and sets the time of the next try (exponential backoff, :class:`RetryPolicy`); after
``give_up_after`` seconds of failing the row is kept as *given up* (listed with its reason on the
admin page, counted in ``/admin/health``) instead of being retried for ever.

Rows are claimed with a lease. The claiming process is named by a **process identity**,
``host:pid:start``, where ``start`` is new at every process start: a container restarted with the
same host name and the same PIDs (a fresh PID namespace numbers its processes the same way) is
another process, so it neither renews the dead one's claims nor mistakes them for its own. A
process starting takes over at once the rows of its host's processes that are gone (their PID no
longer runs, or it is this process's own PID under another start); any other dead claim lapses
after its lease and is taken by whoever asks next.

Notices (webhook events) are taken one sender at a time, round robin (:meth:`WorkQueue.claim_event`),
and each sender may hold at most ``max_per_sender`` waiting notices: whoever floods the port
with notices for annotations Label Studio does not know (each is refused with one 404 from Label
Studio) delays only its own, never Label Studio's. A second notice for the same annotation and
action that has not started yet is merged into the first (the work reads the annotation as Label
Studio holds it when it starts, so one application covers both).

Pre-labeling tasks are claimed by whichever worker asks first (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL; SQLite serialises writers), so "Retrieve predictions" sent to one replica is worked by
all. A task's prediction is kept in its row once computed (:meth:`WorkQueue.keep_prediction`): a
write that fails is retried without predicting again, and a task ends when Label Studio holds its
prediction (a write whose answer was lost is found at the next try and not repeated).

With a shared database (``SMARTSAM_DATABASE_URL``), what is accepted while it is away goes to a
local **spool** (SQLite, ``SMARTSAM_DATA_DIR/spool.db``) and is moved into the shared queue when
it is back (:meth:`WorkQueue.drain_spool`).

An annotation version is applied once: :meth:`WorkQueue.was_applied` before the work,
:meth:`WorkQueue.record_application` after it (the reference rules are idempotent, so a crash
between the reference write and the record applies the same version again without a second
reference version).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import socket
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import sqlalchemy as sa

from backend.store.db import Database, DatabaseUnavailable

log = logging.getLogger("smartsam.jobs")

TABLES = sa.MetaData()
sa.Table("events", TABLES, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("action", sa.Text, nullable=False), sa.Column("annotation", sa.BigInteger, nullable=False),
         sa.Column("claimed", sa.Text), sa.Column("queued_at", sa.Double, nullable=False),
         sa.Column("owner", sa.Text, nullable=False), sa.Column("lease_until", sa.Double),
         sa.Column("sender", sa.Text), sa.Column("started_at", sa.Double), sa.Column("attempts", sa.Integer),
         sa.Column("next_try", sa.Double), sa.Column("failing_since", sa.Double), sa.Column("last_error", sa.Text),
         sa.Column("gave_up_at", sa.Double), sa.Column("unexpected", sa.Integer),
         sa.Index("events_sender", "sender", "id"), sqlite_autoincrement=True)
sa.Table("prelabel", TABLES, sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("project", sa.Text, nullable=False), sa.Column("task", sa.BigInteger, nullable=False),
         sa.Column("body", sa.Text, nullable=False), sa.Column("label_config", sa.Text, nullable=False),
         sa.Column("queued_at", sa.Double, nullable=False), sa.Column("owner", sa.Text, nullable=False),
         sa.Column("lease_until", sa.Double), sa.Column("claimed_by", sa.Text),
         sa.Column("attempts", sa.Integer), sa.Column("next_try", sa.Double), sa.Column("failing_since", sa.Double),
         sa.Column("last_error", sa.Text), sa.Column("gave_up_at", sa.Double), sa.Column("prediction", sa.Text),
         sa.Column("unexpected", sa.Integer), sa.Column("attempted", sa.Text),
         sa.UniqueConstraint("project", "task"), sqlite_autoincrement=True)
# one row per annotation version applied: (annotation, Label Studio's updated_at, an update or not)
sa.Table("applied_events", TABLES, sa.Column("annotation", sa.BigInteger, primary_key=True, autoincrement=False),
         sa.Column("updated_at", sa.Text, primary_key=True), sa.Column("updated", sa.Integer, primary_key=True),
         sa.Column("applied_at", sa.Double, nullable=False))

# what the spool keeps while the shared database is away: notices and tasks, as they came
SPOOL = sa.MetaData()
sa.Table("spool", SPOOL, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("kind", sa.Text, nullable=False), sa.Column("body", sa.Text, nullable=False),
         sa.Column("queued_at", sa.Double, nullable=False), sa.Column("sender", sa.Text), sqlite_autoincrement=True)

# rows of an earlier release gain these (NULL: never tried, not given up)
_RETRY_COLUMNS = {"attempts": "INTEGER", "next_try": "REAL", "failing_since": "REAL", "last_error": "TEXT",
                  "gave_up_at": "REAL", "unexpected": "INTEGER"}
# ids Label Studio (or a sender) may name: 64-bit (PostgreSQL's INTEGER is 32-bit)
_ID_COLUMNS = (("events", "annotation"), ("prelabel", "task"), ("applied_events", "annotation"))

_IDENTITY: Tuple[int, str] = (0, "")


def process_identity() -> str:
    """``host:pid:start`` of this process, ``start`` new at every process start (and after a
    fork): two processes never share it, even in two PID namespaces of one host name."""
    global _IDENTITY
    pid = os.getpid()
    if _IDENTITY[0] != pid:
        _IDENTITY = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:12]}")
    return _IDENTITY[1]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When a transiently failed row is tried again, and when it is given up.

    Attributes:
        first_delay: seconds before the second try; each further try waits twice as long,
            jittered by +-20 % (so replicas that failed together do not retry together).
        max_delay: the longest wait between two tries (``SMARTSAM_RETRY_MAX_DELAY``).
        give_up_after: a row failing this long is given up (``SMARTSAM_RETRY_FOR``); kept and
            listed, never retried by itself.
        unexpected_tries: an unexpected error (a bug, not an outage) is tried this often at most.
    """

    first_delay: float = 1.0
    max_delay: float = 300.0
    give_up_after: float = 86400.0
    unexpected_tries: int = 3

    def delay(self, attempts: int) -> float:
        base = min(self.max_delay, self.first_delay * 2.0 ** max(0, attempts - 1))
        return base * random.uniform(0.8, 1.2)


@dataclasses.dataclass(frozen=True)
class Notice:
    """A webhook notice as queued: ``row``, the ``action``, the ``annotation`` id, the project
    the sender claimed, who sent it, and how often it was tried before."""

    row: int
    action: str
    annotation: int
    claimed: Optional[str]
    sender: str = ""
    attempts: int = 0


@dataclasses.dataclass(frozen=True)
class QueuedTask:
    """A pre-labeling task as queued, with its prediction once one was computed."""

    seq: int
    project: str
    task: Dict
    label_config: str
    attempts: int = 0
    prediction: Optional[Dict] = None


class SenderFull(Exception):
    """This sender already has ``max_per_sender`` notices waiting."""


class WorkQueue:
    """The accepted webhook notices and background pre-labeling tasks, in the database.

    Args:
        sqlite_path: the SQLite file without ``database_url`` (``SMARTSAM_DATA_DIR/jobs.db``).
        database_url: the shared database (``SMARTSAM_DATABASE_URL``).
        lease_s: how long a claim holds without a renewal (a dead process's rows wait this long
            before another replica takes them; a live one renews every third of it).
        retry: when failed rows are tried again and given up.
        max_per_sender: notices one sender may have waiting (its next ones are refused).
        spool_path: where notices and tasks wait while the shared database is away (only used
            with ``database_url``; default ``spool.db`` beside ``sqlite_path``).
    """

    def __init__(self, sqlite_path: Path, database_url: Optional[str] = None, lease_s: float = 30.0,
                 retry: RetryPolicy = RetryPolicy(), max_per_sender: int = 1000,
                 spool_path: Optional[Path] = None) -> None:
        self.db = Database.open(database_url, Path(sqlite_path), "work_queue")
        self.owner = process_identity()
        self.lease_s = float(lease_s)
        self.retry = retry
        self.max_per_sender = int(max_per_sender)
        self.db.create(TABLES)
        # a jobs.db of an earlier release: no leases, retries or senders yet
        self.db.add_columns("events", {"lease_until": "REAL", "sender": "TEXT", "started_at": "REAL", **_RETRY_COLUMNS})
        self.db.add_columns("prelabel", {"lease_until": "REAL", "claimed_by": "TEXT", "prediction": "TEXT",
                                         "attempted": "TEXT", **_RETRY_COLUMNS})
        if self.db.postgres:  # a queue of an earlier release: its id columns become 64-bit
            self.db.widen_to_bigint(_ID_COLUMNS)
        self.spool: Optional[Database] = None
        self.spool_dropped = 0  # spooled rows that could not be queued when the database came back
        if database_url:
            self.spool = Database.open(None, Path(spool_path or Path(sqlite_path).with_name("spool.db")), "spool")
            self.spool.create(SPOOL)

    # -- processes -------------------------------------------------------------------------
    def _gone(self, owner: str) -> bool:
        """Whether ``owner`` (a process identity, or ``host:pid`` of an earlier release) is a
        process of this host that no longer runs."""
        host, _, rest = owner.partition(":")
        pid, _, start = rest.partition(":")
        if host != socket.gethostname() or not pid.isdecimal():
            return False
        if int(pid) == os.getpid():
            return owner != self.owner  # this PID, another start: that process is gone
        return not _running(int(pid))

    def take_over(self) -> Dict[str, int]:
        """Take over the rows of processes of this host that are gone (at start: no need to wait
        for their leases): their notices and the tasks they queued become this process's, the
        tasks they had claimed are free again. How many, per table."""
        n = {"events": 0, "prelabel": 0}
        with self.db.write() as c:
            owners = {o for (o,) in c.execute("SELECT owner FROM events UNION SELECT owner FROM prelabel UNION "
                                              "SELECT claimed_by FROM prelabel WHERE claimed_by IS NOT NULL")}
            for o in owners:
                if o != self.owner and self._gone(o):
                    n["events"] += c.execute("UPDATE events SET lease_until = 0, owner = ?, started_at = NULL "
                                             "WHERE owner = ?", (self.owner, o)).rowcount
                    n["prelabel"] += c.execute("UPDATE prelabel SET owner = ? WHERE owner = ?", (self.owner, o)).rowcount
                    c.execute("UPDATE prelabel SET claimed_by = NULL, lease_until = 0 WHERE claimed_by = ?", (o,))
        return n

    def renew(self, held_tasks: Sequence[int] = ()) -> List[int]:
        """Extend this process's leases (every third of ``lease_s``): its notices, and the tasks
        its worker holds now (``held_tasks``, their ``seq``). A task claimed here that the worker
        no longer holds (its end could not be written while the database was away) lapses and is
        claimed again, by this process or another. Returns the held tasks whose claim was lost
        (another process took them over after their lease ran out)."""
        until = time.time() + self.lease_s
        lost = []
        with self.db.write() as c:
            c.execute("UPDATE events SET lease_until = ? WHERE owner = ?", (until, self.owner))
            for seq in held_tasks:
                if not c.execute("UPDATE prelabel SET lease_until = ? WHERE claimed_by = ? AND seq = ?",
                                 (until, self.owner, int(seq))).rowcount:
                    lost.append(int(seq))
        return lost

    # -- events ----------------------------------------------------------------------------
    def add_event(self, action: str, annotation: int, claimed: Optional[str], sender: str = "") -> str:
        """Record a notice, owned by this process (committed when this returns): "queued";
        "merged" into a notice for the same action and annotation that has not started yet;
        "spooled" when the shared database is away. SenderFull when ``sender`` has
        ``max_per_sender`` notices waiting."""
        try:
            return self._add_event(action, annotation, claimed, sender)
        except DatabaseUnavailable:
            if self.spool is None:
                raise
            self._spool("event", {"action": action, "annotation": int(annotation), "claimed": claimed, "sender": sender})
            return "spooled"

    def _add_event(self, action: str, annotation: int, claimed: Optional[str], sender: str) -> str:
        now = time.time()
        with self.db.write() as c:
            # the same notice from the same sender, not started: one application covers both (a
            # sender's notice never joins another's: it would wait in the other sender's turn)
            same = c.execute("SELECT id FROM events WHERE action = ? AND annotation = ? AND started_at IS NULL "
                             "AND gave_up_at IS NULL AND COALESCE(sender, '') = ? AND claimed IS NOT DISTINCT FROM ? "
                             "LIMIT 1", (action, int(annotation), sender, claimed)).first()
            if same is not None:
                return "merged"
            waiting = c.execute("SELECT COUNT(*) FROM events WHERE sender = ? AND gave_up_at IS NULL", (sender,)).scalar_one()
            if waiting >= self.max_per_sender:
                raise SenderFull(sender)
            c.execute("INSERT INTO events (action, annotation, claimed, queued_at, owner, lease_until, sender, attempts) "
                      "VALUES (?,?,?,?,?,?,?,0)", (action, int(annotation), claimed, now, self.owner, now + self.lease_s,
                                                   sender))
            return "queued"

    # due, and this process's own not being worked (or left started longer than a lease ago: its
    # end could not be written), or a dead process's (its lease ran out)
    _CLAIMABLE_EVENT = ("gave_up_at IS NULL AND COALESCE(next_try, 0) <= ? AND ((owner = ? AND "
                        "COALESCE(started_at, 0) < ?) OR COALESCE(lease_until, 0) < ?)")

    def claim_event(self, after_sender: Optional[str] = None) -> Optional[Notice]:
        """Claim the next notice that is due: this process's own or one whose lease ran out, the
        oldest of the sender after ``after_sender`` (round robin over senders); None when none."""
        now = time.time()
        args = (now, self.owner, now - self.lease_s, now)
        with self.db.write() as c:
            senders = [s for (s,) in c.execute(f"SELECT DISTINCT COALESCE(sender, '') FROM events "
                                               f"WHERE {self._CLAIMABLE_EVENT} ORDER BY 1", args)]
            if not senders:
                return None
            sender = next((s for s in senders if after_sender is not None and s > after_sender), senders[0])
            r = c.execute(f"SELECT id, action, annotation, claimed, COALESCE(sender, ''), COALESCE(attempts, 0) "
                          f"FROM events WHERE {self._CLAIMABLE_EVENT} AND COALESCE(sender, '') = ? ORDER BY id LIMIT 1",
                          (*args, sender)).first()
            c.execute("UPDATE events SET owner = ?, lease_until = ?, started_at = ? WHERE id = ?",
                      (self.owner, now + self.lease_s, now, r[0]))
        return Notice(int(r[0]), r[1], int(r[2]), r[3], r[4], int(r[5]))

    def event_done(self, row: int) -> None:
        with self.db.write() as c:
            c.execute("DELETE FROM events WHERE id = ? AND owner = ?", (int(row), self.owner))

    def event_failed(self, notice: Notice, error: str, unexpected: bool = False) -> bool:
        """A transient failure: tried again after the policy's delay, or given up. True when it
        will be tried again."""
        return self._failed("events", "id", notice.row, notice.attempts, error, unexpected,
                            "started_at = NULL", "owner = ?")

    def _failed(self, table: str, key: str, row: int, attempts: int, error: str, unexpected: bool, extra: str,
                mine: str, min_delay: float = 0.0) -> bool:
        now = time.time()
        attempts += 1
        with self.db.write() as c:
            r = c.execute(f"SELECT COALESCE(failing_since, ?), COALESCE(unexpected, 0) FROM {table} WHERE {key} = ? AND {mine}",
                          (now, int(row), self.owner)).first()
            if r is None:
                return True  # done meanwhile, or taken over by another process: not ours to count
            since, bugs = float(r[0]), int(r[1]) + int(unexpected)
            # an outage is tried for give_up_after; a bug (an unexpected error) unexpected_tries times
            give_up = now - since >= self.retry.give_up_after or (unexpected and bugs >= self.retry.unexpected_tries)
            delay = max(min_delay, self.retry.delay(attempts))
            c.execute(f"UPDATE {table} SET attempts = ?, unexpected = ?, failing_since = ?, last_error = ?, next_try = ?, "
                      f"gave_up_at = ?, {extra} WHERE {key} = ?",
                      (attempts, bugs, since, error[:500], now + delay, now if give_up else None, int(row)))
        return not give_up

    def was_applied(self, annotation: int, updated_at: str, updated: bool) -> bool:
        """Whether this annotation version was applied already (by any process or replica)."""
        return self.db.query_one("SELECT 1 FROM applied_events WHERE annotation = ? AND updated_at = ? AND updated = ?",
                                 (int(annotation), str(updated_at), int(bool(updated)))) is not None

    def record_application(self, annotation: int, updated_at: str, updated: bool) -> bool:
        """Record that this annotation version was applied (after the work: a crash before it
        applies the version again, which the rules make harmless); False when another process
        recorded it first."""
        with self.db.write() as c:
            return c.execute("INSERT INTO applied_events (annotation, updated_at, updated, applied_at) VALUES (?,?,?,?) "
                             "ON CONFLICT DO NOTHING RETURNING annotation",
                             (int(annotation), str(updated_at), int(bool(updated)), time.time())).first() is not None

    # -- pre-labeling tasks ------------------------------------------------------------------
    def add_tasks(self, project: str, tasks: List[Dict], label_config: str) -> List[Dict]:
        """Record tasks for background pre-labeling, unclaimed (any worker of any replica takes
        them); the ones that were not queued already. With a shared database that is away, they
        go to the spool (and count as new)."""
        try:
            return self._add_tasks(project, tasks, label_config)
        except DatabaseUnavailable:
            if self.spool is None:
                raise
            for t in tasks:
                self._spool("task", {"project": project, "task": t, "label_config": label_config})
            return list(tasks)

    def _add_tasks(self, project: str, tasks: List[Dict], label_config: str) -> List[Dict]:
        new = []
        with self.db.write() as c:
            for t in tasks:
                # a task given up before is queued afresh (the button pressed again)
                r = c.execute("INSERT INTO prelabel (project, task, body, label_config, queued_at, owner, lease_until, "
                              "attempts) VALUES (?,?,?,?,?,?,0,0) ON CONFLICT (project, task) DO UPDATE SET "
                              "gave_up_at = NULL, attempts = 0, unexpected = 0, failing_since = NULL, next_try = 0, "
                              "claimed_by = NULL, lease_until = 0, body = excluded.body, "
                              "label_config = excluded.label_config WHERE prelabel.gave_up_at IS NOT NULL RETURNING seq",
                              (project, int(t["id"]), json.dumps(t), label_config, time.time(), self.owner)).first()
                if r is not None:
                    new.append(t)
        return new

    def claim_task(self) -> Optional[QueuedTask]:
        """Claim the oldest due task no live worker holds, or None."""
        now = time.time()
        with self.db.write(serial=False) as c:
            lock = " FOR UPDATE SKIP LOCKED" if self.db.postgres else ""
            r = c.execute("SELECT seq, project, body, label_config, COALESCE(attempts, 0), prediction FROM prelabel "
                          "WHERE COALESCE(lease_until, 0) < ? AND COALESCE(next_try, 0) <= ? AND gave_up_at IS NULL "
                          "ORDER BY seq LIMIT 1" + lock, (now, now)).first()
            if r is None:
                return None
            c.execute("UPDATE prelabel SET claimed_by = ?, lease_until = ? WHERE seq = ?", (self.owner, now + self.lease_s, r[0]))
        return QueuedTask(int(r[0]), r[1], json.loads(r[2]), r[3], int(r[4]), json.loads(r[5]) if r[5] else None)

    def keep_prediction(self, seq: int, prediction: Dict) -> None:
        """Keep a task's computed prediction in its row until Label Studio holds it."""
        with self.db.write() as c:
            c.execute("UPDATE prelabel SET prediction = ? WHERE seq = ? AND claimed_by = ?",
                      (json.dumps(prediction), int(seq), self.owner))

    def writing(self, seqs: Sequence[int], version: str) -> List[int]:
        """About to write these tasks' predictions of model ``version``: record the version in
        each row (a write whose answer is lost is looked for under it later, whatever the
        version is by then) and return the tasks this process still holds (another may have
        taken over a claim that lapsed meanwhile: it writes them, not this one)."""
        held = []
        with self.db.write() as c:
            for seq in seqs:
                r = c.execute("SELECT attempted FROM prelabel WHERE seq = ? AND claimed_by = ?", (int(seq), self.owner)).first()
                if r is None:
                    continue
                tried = set(json.loads(r[0] or "[]")) | {version}
                c.execute("UPDATE prelabel SET attempted = ? WHERE seq = ?", (json.dumps(sorted(tried)), int(seq)))
                held.append(int(seq))
        return held

    def attempted(self, seq: int) -> List[str]:
        """The model versions a write of this task was tried with (its answer maybe lost)."""
        r = self.db.query_one("SELECT attempted FROM prelabel WHERE seq = ?", (int(seq),))
        return json.loads(r[0] or "[]") if r else []

    def task_failed(self, item: QueuedTask, error: str, unexpected: bool = False, min_delay: float = 0.0) -> bool:
        """A transient failure: the task is tried again after the policy's delay, at least
        ``min_delay`` (by any worker), or given up. True when it will be tried again (or it is
        no longer this process's to count)."""
        return self._failed("prelabel", "seq", item.seq, item.attempts, error, unexpected,
                            "claimed_by = NULL, lease_until = 0", "claimed_by = ?", min_delay)

    def task_done(self, project: str, task: int) -> None:
        with self.db.write() as c:
            c.execute("DELETE FROM prelabel WHERE project = ? AND task = ?", (project, int(task)))

    def has_task(self, project: str, task: int) -> bool:
        """Whether the task waits in the queue or is being worked (by any replica)."""
        return self.db.query_one("SELECT 1 FROM prelabel WHERE project = ? AND task = ? AND gave_up_at IS NULL",
                                 (project, int(task))) is not None

    # -- the spool -------------------------------------------------------------------------
    def _spool(self, kind: str, body: Dict) -> None:
        with self.spool.write() as c:
            sender = body.get("sender") if kind == "event" else None
            if sender is not None and c.execute("SELECT COUNT(*) FROM spool WHERE sender = ?", (sender,)).scalar_one() \
                    >= self.max_per_sender:  # the same cap per sender as the shared queue's
                raise SenderFull(sender)
            c.execute("INSERT INTO spool (kind, body, queued_at, sender) VALUES (?,?,?,?)",
                      (kind, json.dumps(body), time.time(), sender))

    def spooled(self) -> int:
        return self.spool.count("spool") if self.spool is not None else 0

    def drain_spool(self) -> Dict[str, int]:
        """Move what the spool holds into the shared queue, oldest first (a row is deleted from
        the spool after it is in the queue: a crash between the two queues it twice, which the
        merge of notices and the tasks' uniqueness absorb). DatabaseUnavailable when it is still
        away. How many of each kind moved."""
        moved = {"event": 0, "task": 0, "dropped": 0}
        if self.spool is None:
            return moved
        for rid, kind, body in self.spool.query("SELECT id, kind, body FROM spool ORDER BY id"):
            try:
                b = json.loads(body)
                if kind == "event":
                    self._add_event(b["action"], b["annotation"], b["claimed"], b["sender"])
                else:
                    self._add_tasks(b["project"], [b["task"]], b["label_config"])
                moved[kind] += 1
            except DatabaseUnavailable:
                raise  # still away: the rest waits, in order
            except Exception as e:  # this row can never move (a full sender, a malformed row): set aside
                log.error("work queue: a spooled %s could not be queued and is dropped (%s): %s", kind, e, body[:300])
                moved["dropped"] += 1
                self.spool_dropped += 1
            with self.spool.write() as c:
                c.execute("DELETE FROM spool WHERE id = ?", (rid,))
        return moved

    # -- what waits ------------------------------------------------------------------------
    def counts(self) -> Dict[str, int]:
        """Rows per state, every replica's: notices and tasks waiting (tried again later
        included), how many of them have failed before, and given up."""
        out = {}
        for table in ("events", "prelabel"):
            r = self.db.query_one(f"SELECT COUNT(*) FILTER (WHERE gave_up_at IS NULL), "
                                  f"COUNT(*) FILTER (WHERE gave_up_at IS NULL AND COALESCE(attempts, 0) > 0), "
                                  f"COUNT(*) FILTER (WHERE gave_up_at IS NOT NULL) FROM {table}")
            out[table] = {"waiting": int(r[0]), "retrying": int(r[1]), "given_up": int(r[2])}
        return out

    def waiting_tasks(self) -> int:
        return int(self.db.query_one("SELECT COUNT(*) FROM prelabel WHERE gave_up_at IS NULL")[0])

    def waiting_events(self) -> int:
        return int(self.db.query_one("SELECT COUNT(*) FROM events WHERE gave_up_at IS NULL")[0])

    def troubled(self, limit: int = 50) -> Dict[str, List[Dict]]:
        """The notices and tasks that failed at least once (waiting for their next try, or given
        up), with their reasons: what the admin page lists."""
        ev = [dict(row=r[0], action=r[1], annotation=r[2], sender=r[3], attempts=r[4], last_error=r[5],
                   next_try=r[6], given_up=r[7] is not None)
              for r in self.db.query("SELECT id, action, annotation, sender, attempts, last_error, next_try, gave_up_at "
                                     "FROM events WHERE COALESCE(attempts, 0) > 0 OR gave_up_at IS NOT NULL "
                                     "ORDER BY id LIMIT ?", (int(limit),))]
        tasks = [dict(project=r[0], task=r[1], attempts=r[2], last_error=r[3], next_try=r[4], given_up=r[5] is not None,
                      predicted=r[6] is not None)
                 for r in self.db.query("SELECT project, task, attempts, last_error, next_try, gave_up_at, prediction "
                                        "FROM prelabel WHERE COALESCE(attempts, 0) > 0 OR gave_up_at IS NOT NULL "
                                        "ORDER BY seq LIMIT ?", (int(limit),))]
        return {"events": ev, "tasks": tasks}

    def retry_given_up(self) -> Dict[str, int]:
        """Put every given-up notice and task back in the queue (the admin's "retry")."""
        with self.db.write() as c:
            return {t: c.execute(f"UPDATE {t} SET gave_up_at = NULL, failing_since = NULL, attempts = 0, next_try = 0"
                                 f"{', started_at = NULL' if t == 'events' else ', claimed_by = NULL, lease_until = 0'} "
                                 f"WHERE gave_up_at IS NOT NULL").rowcount
                    for t in ("events", "prelabel")}

    def tasks(self) -> List[Tuple[str, Dict, str]]:
        """Every task not done yet, oldest first: ``(project, task, label_config)``."""
        rows = self.db.query("SELECT project, body, label_config FROM prelabel WHERE gave_up_at IS NULL ORDER BY seq")
        return [(p, json.loads(body), cfg) for p, body, cfg in rows]

    def events(self) -> List[Notice]:
        """Every notice not done yet, oldest first."""
        return [Notice(int(r[0]), r[1], int(r[2]), r[3], r[4] or "", int(r[5] or 0)) for r in self.db.query(
            "SELECT id, action, annotation, claimed, sender, attempts FROM events WHERE gave_up_at IS NULL ORDER BY id")]


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
