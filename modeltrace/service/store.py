"""The service's database: one schema on SQLite (default, nothing to install) or PostgreSQL (`--db postgresql://...`).

Data flow: the API and the Hub poller write `repos` (the watch-list) and `jobs` (queue.py); workers read jobs and
write `results` and `alerts` in the same transaction that closes their job; the pages and the JSON API read them.

Schema changes are numbered migrations recorded in `schema_version` (one row per applied migration, with its time and
description); opening a database applies the missing ones in order, each in its own transaction, and refuses a
database written by a newer modeltrace. SQLite writers start with `BEGIN IMMEDIATE` (WAL mode), so a transaction that
reads and then writes never fails half-way on a lock another process took; readers never wait for writers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from modeltrace.errors import InputError

__all__ = ["SCHEMA_VERSION", "Store", "alerts", "default_db_url", "jobs", "repos", "results", "safe_url",
           "schema_version"]

metadata = MetaData()

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", Float, nullable=False),
)

#: the watch-list (polled for new revisions) and every repository seen
repos = Table(
    "repos", metadata,
    Column("repo_id", String(200), primary_key=True),
    Column("watched", Boolean, nullable=False, default=False),
    Column("added_at", Float, nullable=False),
    Column("last_polled_at", Float),
    Column("last_sha", String(64)),
    Column("poll_error", String(500)),
)

#: the durable queue: one job per (repository, revision), see queue.py
jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(300), nullable=False, unique=True),  # idempotency key: repo@revision
    Column("repo_id", String(200), nullable=False),
    Column("revision", String(64), nullable=False),  # a commit sha (branches are resolved before queueing)
    Column("source", String(20), nullable=False),  # webhook | api | poll
    Column("state", String(12), nullable=False),  # queued | running | done | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("not_before", Float, nullable=False),
    Column("lease_owner", String(100)),
    Column("lease_until", Float),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("error", Text),
    Index("ix_jobs_state", "state", "not_before"),
    Index("ix_jobs_repo", "repo_id"),
)

#: one result per finished job: what identify, the audit and the card audit found, and the report
results = Table(
    "results", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, unique=True),
    Column("repo_id", String(200), nullable=False),
    Column("commit_sha", String(64), nullable=False),
    Column("index_name", String(300), nullable=False),  # the name it was added to the fingerprint index under
    Column("content_hash", String(128)),
    Column("created_at", Float, nullable=False),
    Column("relation", String(20), nullable=False),
    Column("method", String(40)),
    Column("summary", Text, nullable=False),
    Column("contradicted", Boolean, nullable=False),  # the card is contradicted by the weights (alert sent)
    Column("worst", String(10)),  # worst finding severity
    Column("identify_json", Text, nullable=False),
    Column("report_json", Text, nullable=False),
    Index("ix_results_repo", "repo_id", "id"),
)

#: outgoing alerts (an outbox: written with the result, delivered with retries by alerts.py)
alerts = Table(
    "alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("result_id", Integer, ForeignKey("results.id"), nullable=False, unique=True),
    Column("payload_json", Text, nullable=False),
    Column("state", String(10), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_try", Float, nullable=False),
    Column("last_error", String(500)),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[repos, jobs, results, alerts])


#: (version, description, apply) in order; a new schema change is one more entry here
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "repos, jobs, results, alerts", _v1),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
BUSY_TIMEOUT_S = 60.0


def default_db_url() -> str:
    """`MODELTRACE_DB`, else an SQLite file next to the default index (~/.local/share/modeltrace/service.sqlite)."""
    env = os.environ.get("MODELTRACE_DB")
    if env:
        return env
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(data) / 'modeltrace' / 'service.sqlite'}"


def normalise_url(url: str) -> str:
    """A SQLAlchemy URL from what a user types: a path (SQLite), sqlite:///..., postgresql://... (psycopg 3)."""
    text = url.strip()
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if text.startswith(prefix):
            return "postgresql+psycopg://" + text[len(prefix):]
    return text


def safe_url(url: str) -> str:
    """The URL without its password, for logs and pages."""
    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid database URL>"


class Store:
    """An open service database. `write()` and `read()` give a connection inside one transaction."""

    def __init__(self, url: str) -> None:
        self.url = normalise_url(url)
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise InputError(f"--db {safe_url(url)}: not a database URL (sqlite:///FILE or postgresql://...)") \
                from None
        self.dialect = parsed.get_backend_name()
        self._write_lock: contextlib.AbstractContextManager = (threading.Lock() if self.dialect == "sqlite"
                                                               else contextlib.nullcontext())
        if self.dialect not in ("sqlite", "postgresql"):
            raise InputError(f"--db: {self.dialect} is not supported (SQLite or PostgreSQL)")
        try:
            if self.dialect == "sqlite":
                self._open_sqlite(parsed)
            else:
                self.engine = create_engine(self.url, pool_size=8, max_overflow=16, pool_pre_ping=True)
                self.reader = self.engine
            self._migrate()
        except SQLAlchemyError as exc:
            raise InputError(f"--db {safe_url(url)}: cannot open the database ({_first_line(exc)})") from None

    def _open_sqlite(self, parsed) -> None:
        db = parsed.database
        if not db or db == ":memory:":
            raise InputError("--db: an in-memory SQLite database cannot be shared with workers; give a file")
        path = Path(db)
        if path.is_dir():
            raise InputError(f"--db {path}: is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        # pooled connections, reused by this process's threads (worker processes are spawned and open their own);
        # the writer's busy timeout is tiny: BEGIN IMMEDIATE is retried every millisecond instead (see _begin_write)
        self.engine = create_engine(self.url, connect_args={"timeout": 0.005, "check_same_thread": False},
                                    pool_size=4, max_overflow=4)
        self.reader = create_engine(self.url, connect_args={"timeout": 60, "check_same_thread": False},
                                    pool_size=8, max_overflow=16)
        for eng in (self.engine, self.reader):
            event.listen(eng, "connect", _sqlite_connect)
        event.listen(self.engine, "begin", _begin_write)
        event.listen(self.reader, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))

    def _migrate(self) -> None:
        with self.engine.begin() as conn:
            if not inspect(conn).has_table("schema_version"):
                names = set(inspect(conn).get_table_names())
                if names & {"jobs", "results"}:
                    raise InputError(f"--db {safe_url(self.url)}: holds tables but no modeltrace schema_version")
                metadata.create_all(conn, tables=[schema_version])
        with self.engine.begin() as conn:
            have = conn.execute(select(schema_version.c.version)).scalars().all()
        current = max(have, default=0)
        if current > SCHEMA_VERSION:
            raise InputError(f"--db {safe_url(self.url)}: schema v{current} was written by a newer modeltrace "
                             f"(this one knows v{SCHEMA_VERSION}); upgrade modeltrace")
        for version, description, apply in MIGRATIONS:
            if version <= current:
                continue
            with self.engine.begin() as conn:
                if conn.execute(select(schema_version.c.version).where(schema_version.c.version == version)).first():
                    continue  # another process applied it while we waited for the lock
                apply(conn)
                conn.execute(insert(schema_version).values(version=version, description=description,
                                                           applied_at=time.time()))

    def version(self) -> int:
        with self.read() as conn:
            return int(max(conn.execute(select(schema_version.c.version)).scalars().all(), default=0))

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        # SQLite has one writer at a time: threads of this process queue on a lock (first come, first served)
        # instead of polling the file lock with SQLite's sleeping busy handler, which makes tail latencies of 100s
        # of ms under a burst; other processes still wait on the file lock.
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.reader.connect() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()
        if self.reader is not self.engine:
            self.reader.dispose()


def _sqlite_connect(dbapi, _record) -> None:
    dbapi.isolation_level = None  # the driver's own transaction handling off: we emit BEGIN
    cur = dbapi.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _begin_write(conn: Connection) -> None:
    """Take SQLite's write lock, waiting for another process's writer in 1 ms steps (SQLite's own busy handler
    sleeps up to 100 ms at a time, which is what a webhook waiting behind a worker's write would pay)."""
    raw = conn.connection.driver_connection
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            raw.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else type(exc).__name__
