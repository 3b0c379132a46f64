"""The one way the backend reaches its database: SQLAlchemy Core over SQLite (embedded, the
default: one file per store under ``SMARTSAM_DATA_DIR``) or PostgreSQL through psycopg 3
(``SMARTSAM_DATABASE_URL``: one database shared by every replica).

The stores write portable SQL (``ON CONFLICT``, ``RETURNING``, ``IS NOT DISTINCT FROM``: SQLite
3.35+ and PostgreSQL both speak it) and declare their tables as SQLAlchemy ``Table`` objects, so
the DDL is each engine's own. Writers serialise per store on both engines: SQLite by ``BEGIN
IMMEDIATE`` (WAL, synchronous FULL: a commit is on disk when it returns; readers never wait),
PostgreSQL by a transaction-scoped advisory lock named after the store, so a read-then-write
(a reference's free slot, a queue claim) is as safe across replicas as across threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

# One engine (one pool) per URL and reply bound in a process: every store of a replica shares its
# connections.
_ENGINES: Dict[tuple, sa.Engine] = {}
_ENGINES_LOCK = threading.Lock()


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or used; the message names the setting and never a password."""


# After PostgreSQL failed to answer, calls fail at once for this long instead of each waiting for
# its own connection attempt (a click reads the store three or four times: 3 s each while the
# server does not answer). The monitor's probe (Database.ping, every second) asks regardless, so
# the first answer closes the breaker again.
BREAKER_S = 2.0

# How long one exchange of a PostgreSQL connection (a statement and its whole result, a commit, the
# pool's ping) may take, as a deadline. The server cancels its own statements after 30 s
# (statement_timeout below) and our results are a few rows, so 5 s more is not a slow statement
# but a server or network that stopped answering while the connection stayed open (a frozen
# server, a middlebox that lost the reply): the kernel still acknowledges every packet, so neither
# TCP keepalives nor tcp_user_timeout end it, and without this bound the caller waits for ever (the
# webhook thread, a click, a shutdown behind it). The connection is closed and the call fails as
# unavailable.
REPLY_TIMEOUT_S = 35.0

_CALLS = threading.local()  # database round trips (reads and write transactions) made by this thread


def calls_here() -> int:
    """How many times this thread has asked a database so far (a request measures its own)."""
    return getattr(_CALLS, "n", 0)


def _counted() -> None:
    _CALLS.n = getattr(_CALLS, "n", 0) + 1
_DOWN: Dict[str, tuple] = {}  # url -> (monotonic time until which calls fail at once, reason)


def safe_url(url: str) -> str:
    """``url`` with its password masked (for logs and answers)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say nothing of its content
        return "<unparseable URL>"


def engine_url(url: str) -> sa.URL:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 (SQLAlchemy would pick psycopg2)."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def _lock_key(name: str) -> int:
    """A PostgreSQL advisory lock id for ``name`` (stable across processes and replicas)."""
    return int.from_bytes(hashlib.sha256(f"smartsam:{name}".encode()).digest()[:8], "big", signed=True)


def _answering_connection(reply_timeout: float):
    """A psycopg ``Connection`` class whose waits for the server give up after ``reply_timeout``
    seconds: it closes itself (its state is unknown once a reply is missing) and raises
    ``psycopg.OperationalError``, which SQLAlchemy treats as a lost connection. A wait given its
    own time limit keeps psycopg's behaviour (not for LISTEN: ``notifies()`` would be cut too)."""
    import psycopg
    from psycopg import errors

    class AnsweringConnection(psycopg.Connection):
        def wait(self, gen, interval: float = 0.1, timeout: Optional[float] = None):
            if timeout is not None:  # psycopg's caller set its own limit and handles it
                return super().wait(gen, interval=interval, timeout=timeout)
            try:
                return super().wait(gen, interval=interval, timeout=reply_timeout)
            except errors._WaitTimeout:  # psycopg's own "no answer in time" (an OperationalError; 3.3.6+)
                self.pgconn.finish()
                raise psycopg.OperationalError(f"the database sent no answer within {reply_timeout:g} s; "
                                               f"connection closed") from None

    return AnsweringConnection


def _engine(url: str, reply_timeout: float = REPLY_TIMEOUT_S) -> sa.Engine:
    with _ENGINES_LOCK:
        e = _ENGINES.get((url, reply_timeout))
        if e is not None:
            return e
        u = engine_url(url)
        if u.get_backend_name() == "sqlite":
            e = sa.create_engine(u, pool_size=8, max_overflow=56, pool_timeout=60,
                                 connect_args={"timeout": 30, "check_same_thread": False})

            @event.listens_for(e, "connect")
            def _sqlite_connect(dbapi_conn, _record):
                # SQLAlchemy's recipe: pysqlite must not issue its own BEGIN; we issue ours below
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

            @event.listens_for(e, "begin")
            def _sqlite_begin(conn):
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")
        elif u.get_backend_name() == "postgresql":
            # pre-ping: a connection the server dropped (a restart, a failover) is replaced, not used.
            # Nothing waits for ever on a server that does not answer: a connection attempt gives up
            # after 3 s (libpq's minimum is 2), an open connection whose packets go unacknowledged
            # (a network partition) is closed after 8 s, an idle one is probed by TCP keepalives; the
            # server cancels a statement after 30 s (an advisory lock held by a frozen replica) and
            # ends a transaction left idle for 60 s (that replica's); a writer waits 10 s at most for
            # another's lock, so requests never pile up behind one.
            e = sa.create_engine(u, pool_size=8, max_overflow=24, pool_timeout=10, pool_pre_ping=True,
                                 connect_args={"connect_timeout": 3, "keepalives": 1, "keepalives_idle": 5,
                                               "keepalives_interval": 2, "keepalives_count": 2,
                                               "tcp_user_timeout": 8000,
                                               "options": "-c statement_timeout=30000 -c lock_timeout=10000 "
                                                          "-c idle_in_transaction_session_timeout=60000"})
            connection_class = _answering_connection(reply_timeout)

            @event.listens_for(e, "do_connect")
            def _pg_connect(dialect, _record, cargs, cparams):
                # SQLAlchemy's hook for making the DBAPI connection: ours bounds every reply
                return connection_class.connect(*cargs, **cparams)
        else:
            raise DatabaseUnavailable(f"SMARTSAM_DATABASE_URL: {safe_url(url)} is neither sqlite:// nor postgresql://")
        _ENGINES[(url, reply_timeout)] = e
        return e


class Conn:
    """One connection inside a transaction; ``execute`` takes ``?`` placeholders (as sqlite3 does)
    and runs them as a SQLAlchemy ``text()`` with named parameters, on either engine."""

    def __init__(self, c: sa.Connection) -> None:
        self.c = c

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sa.CursorResult:
        return self.c.execute(sa.text(named(sql)), {f"p{i}": v for i, v in enumerate(args)})


_NAMED_CACHE: Dict[str, str] = {}
_DDL_LOCK = _lock_key("ddl")  # replicas starting together create each table once


def named(sql: str) -> str:
    """``?`` placeholders -> ``:p0, :p1, ...`` (our SQL holds no ``?`` in a literal)."""
    out = _NAMED_CACHE.get(sql)
    if out is None:
        parts = sql.split("?")
        out = parts[0] + "".join(f":p{i}{p}" for i, p in enumerate(parts[1:]))
        _NAMED_CACHE[sql] = out
    return out


class Database:
    """A store's view of one database.

    Args:
        url: ``sqlite:////abs/path.db`` or ``postgresql://user:password@host:port/db``.
        name: the store's name (its writers' lock on PostgreSQL, its row in ``smartsam_schema``).
        reply_timeout: PostgreSQL: seconds a connection waits for any answer of the server before
            it is closed and the call fails (see ``REPLY_TIMEOUT_S``).
    """

    def __init__(self, url: str, name: str, reply_timeout: float = REPLY_TIMEOUT_S) -> None:
        self.url = url
        self.name = name
        self.engine = _engine(url, float(reply_timeout))
        self.dialect = self.engine.dialect.name  # "sqlite" or "postgresql"
        self._lock_key = _lock_key(name)

    @classmethod
    def open(cls, database_url: Optional[str], sqlite_path: Path, name: str) -> "Database":
        """The shared database when ``database_url`` is set, else the store's own SQLite file."""
        if database_url:
            return cls(database_url, name)
        Path(sqlite_path).parent.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{Path(sqlite_path).resolve()}", name)

    @property
    def postgres(self) -> bool:
        return self.dialect == "postgresql"

    def where(self) -> str:
        return safe_url(self.url)

    @contextlib.contextmanager
    def write(self, serial: bool = True) -> Iterator[Conn]:
        """A write transaction: committed when the block ends, rolled back if it raises; writers
        of this store serialise (see the module docstring) unless ``serial`` is False (PostgreSQL:
        the block locks its own rows, e.g. ``FOR UPDATE SKIP LOCKED``)."""
        with self._transaction(self._lock_key if serial else None) as c:
            yield Conn(c)

    @contextlib.contextmanager
    def _transaction(self, lock: Optional[int]) -> Iterator[sa.Connection]:
        """A write transaction (SQLite: ``BEGIN IMMEDIATE``), holding the advisory lock ``lock``
        on PostgreSQL when given."""
        self._breaker()
        _counted()
        try:
            with self.engine.connect() as c:
                c = c.execution_options(write=True)
                with c.begin():
                    if self.postgres and lock is not None:
                        c.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock})
                    yield c
        except (sa.exc.OperationalError, sa.exc.TimeoutError) as e:
            raise self.unavailable(e) from None
        _DOWN.pop(self.url, None)

    def query(self, sql: str, args: Sequence[Any] = (), probe: bool = False) -> List[sa.Row]:
        """Rows of one read (its own short transaction); ``probe``: ask even while the breaker
        is open (the monitor)."""
        if not probe:
            self._breaker()
        _counted()
        try:
            with self.engine.connect() as c:
                rows = list(Conn(c).execute(sql, args))
        except (sa.exc.OperationalError, sa.exc.TimeoutError) as e:
            raise self.unavailable(e) from None
        _DOWN.pop(self.url, None)
        return rows

    def ping(self) -> None:
        """Ask the database now, breaker or not (DatabaseUnavailable when it does not answer)."""
        self.query("SELECT 1", probe=True)

    def _breaker(self) -> None:
        down = _DOWN.get(self.url)
        if down is not None and time.monotonic() < down[0]:
            raise DatabaseUnavailable(down[1])

    def query_one(self, sql: str, args: Sequence[Any] = ()) -> Optional[sa.Row]:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def create(self, metadata: sa.MetaData) -> None:
        """Create the tables of ``metadata`` that do not exist yet (each engine's own DDL)."""
        with self._transaction(_DDL_LOCK) as c:
            metadata.create_all(c, checkfirst=True)

    def add_columns(self, table: str, columns: Dict[str, str]) -> None:
        """Add the ``columns`` (name -> SQL type) that ``table`` lacks: a file of an earlier
        release gains them, its rows kept."""
        have = {c["name"] for c in sa.inspect(self.engine).get_columns(table)}
        missing = {name: kind for name, kind in columns.items() if name not in have}
        if missing:
            with self.write() as c:
                for name, kind in missing.items():
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def widen_to_bigint(self, columns) -> None:
        """PostgreSQL: the ``(table, column)`` pairs that are 32-bit INTEGER become BIGINT (tables of
        an earlier release; SQLite's INTEGER is 64-bit already)."""
        inspector = sa.inspect(self.engine)
        todo = [(t, col) for t, col in columns for c in inspector.get_columns(t)
                if c["name"] == col and isinstance(c["type"], sa.Integer) and not isinstance(c["type"], sa.BigInteger)]
        if todo:
            with self.write() as c:
                for t, col in todo:
                    c.execute(f"ALTER TABLE {t} ALTER COLUMN {col} TYPE BIGINT")

    def count(self, table: str) -> int:
        return int(self.query_one(f"SELECT COUNT(*) FROM {table}")[0])

    def unavailable(self, e: BaseException) -> DatabaseUnavailable:
        # the driver's first line: it names the host and the reason, never the password
        text = str(getattr(e, "orig", e)).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        err = DatabaseUnavailable(f"the database {self.where()} is unreachable or failing ({reason})")
        if self.postgres and not isinstance(e, sa.exc.TimeoutError):  # a busy pool is not a database away
            _DOWN[self.url] = (time.monotonic() + BREAKER_S, str(err))
        return err

    def schema_version(self) -> Optional[int]:
        """This store's schema version (None: never created here)."""
        self.create(SCHEMA)
        r = self.query_one("SELECT version FROM smartsam_schema WHERE store = ?", (self.name,))
        return None if r is None else int(r[0])

    def set_schema_version(self, c: Conn, version: int) -> None:
        c.execute("INSERT INTO smartsam_schema (store, version) VALUES (?, ?) "
                  "ON CONFLICT (store) DO UPDATE SET version = excluded.version", (self.name, int(version)))

    def integrity(self) -> List[str]:
        """The engine's own integrity check (SQLite's ``PRAGMA integrity_check``; PostgreSQL checks
        its pages itself, and a reachable server with our tables is what can be checked here)."""
        if self.postgres:
            self.query("SELECT 1")
            return []
        r = self.query_one("PRAGMA integrity_check")
        return [] if r[0] == "ok" else [f"database: {r[0]}"]


SCHEMA = sa.MetaData()
sa.Table("smartsam_schema", SCHEMA, sa.Column("store", sa.Text, primary_key=True),
         sa.Column("version", sa.Integer, nullable=False))


def has_rows(db: Database, metadata: sa.MetaData) -> Dict[str, int]:
    """Rows per table of ``metadata`` that exist in ``db`` and are not empty."""
    found = {}
    inspector = sa.inspect(db.engine)
    for table in metadata.sorted_tables:
        if inspector.has_table(table.name):
            n = db.count(table.name)
            if n:
                found[table.name] = n
    return found


def copy_rows(metadata: sa.MetaData, src: Database, dst: Database, chunk: int = 500) -> Dict[str, int]:
    """Copy every row of ``metadata``'s tables from ``src`` to ``dst`` (ids kept), in one
    transaction on ``dst``; rows copied per table."""
    counts = {}
    with src.engine.connect() as s, dst.engine.connect() as d:
        d = d.execution_options(write=True)
        with d.begin():
            for table in metadata.sorted_tables:
                n = 0
                for part in s.execute(table.select()).mappings().partitions(chunk):
                    d.execute(table.insert(), [dict(r) for r in part])
                    n += len(part)
                counts[table.name] = n
                if dst.postgres:  # the copied ids were given explicitly: move each sequence past them
                    for col in table.primary_key.columns:
                        if col.autoincrement is True:
                            d.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{col.name}'), "
                                              f"COALESCE((SELECT MAX({col.name}) FROM {table.name}), 0) + 1, false)"))
    return counts
