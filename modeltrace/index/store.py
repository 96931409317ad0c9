"""The fingerprint index: one SQLite file, no server (format documented in docs/index.md).

Writers take SQLite's write lock for the whole change (`BEGIN IMMEDIATE`) in WAL mode, so several processes may add
to one index at once and readers never see half an entry; a fingerprint is complete in memory before its
transaction starts, so a model that fails half-way leaves nothing behind. The file carries SQLite's
`application_id` ('MTIX') and `user_version` (the format version): foreign databases, files written by a newer
modeltrace and corrupt files are refused with one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeltrace.errors import InputError
from modeltrace.fingerprint.core import SKETCH_DIM, Fingerprint

APPLICATION_ID = 0x4D544958  # "MTIX"
FORMAT_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE,
    family TEXT,
    model_type TEXT,
    layers INTEGER,
    parameters INTEGER,
    total_bytes INTEGER,
    bytes_read INTEGER,
    added_at TEXT NOT NULL,
    sketch BLOB NOT NULL,
    fingerprint BLOB NOT NULL
);
"""


def default_index_path() -> Path:
    """`MODELTRACE_INDEX`, else `$XDG_DATA_HOME/modeltrace/index.sqlite` (~/.local/share by default)."""
    env = os.environ.get("MODELTRACE_INDEX")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "modeltrace" / "index.sqlite"


@dataclass
class Entry:
    id: int
    name: str
    spec: str
    content_hash: str
    family: str | None
    model_type: str | None
    layers: int | None
    parameters: int | None
    total_bytes: int | None
    bytes_read: int | None
    fingerprint_bytes: int
    added_at: str


@dataclass
class AddResult:
    status: str  # added | updated | unchanged | duplicate
    name: str


class Index:
    """An open index file. `create=True` makes a new one when the path does not exist yet."""

    def __init__(self, path: Path | str, create: bool = False) -> None:
        self.path = Path(path).expanduser()
        where = str(self.path)
        if self.path.is_dir():
            raise InputError(f"{where}: is a directory, not an index file")
        exists = self.path.exists() and self.path.stat().st_size > 0
        if not exists and not create:
            if self.path.exists():
                raise InputError(f"{where}: empty file, not a modeltrace index")
            raise InputError(f"{where}: no index here; create one with `modeltrace index add MODEL`")
        if exists:
            try:
                with self.path.open("rb") as f:
                    head = f.read(16)
            except OSError as exc:
                raise InputError(f"{where}: cannot read the index ({exc.strerror})") from None
            if head != SQLITE_MAGIC:
                raise InputError(f"{where}: not a modeltrace index (not an SQLite database)")
        elif create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InputError(f"{where}: cannot create the index folder ({exc.strerror})") from None
        with self._errors():
            self.db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                      check_same_thread=False)
        try:
            with self._errors():
                self._check(create)
        except BaseException:
            self.db.close()
            raise

    # ---- lifecycle -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "locked" in msg or "busy" in msg:
                raise InputError(f"{self.path}: index is locked by another writer for over {BUSY_TIMEOUT_S:.0f} s") \
                    from None
            raise InputError(f"{self.path}: index is corrupt or unreadable ({msg})") from None
        except OSError as exc:
            raise InputError(f"{self.path}: cannot use the index ({exc.strerror or exc})") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic change: the write lock is taken first, so concurrent writers queue instead of failing."""
        with self._errors():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _check(self, create: bool) -> None:
        app = self.db.execute("PRAGMA application_id").fetchone()[0]
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if app == 0 and version == 0:
            tables = self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise InputError(f"{self.path}: an SQLite database but not a modeltrace index")
            if not create:
                raise InputError(f"{self.path}: empty file, not a modeltrace index")
            self._initialise()
            return
        if app != APPLICATION_ID:
            raise InputError(f"{self.path}: an SQLite database but not a modeltrace index")
        if version > FORMAT_VERSION:
            raise InputError(f"{self.path}: written by a newer modeltrace (index format v{version}; this version "
                             f"reads v{FORMAT_VERSION}); upgrade modeltrace")
        names = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version < 1 or not {"meta", "models"} <= names:
            raise InputError(f"{self.path}: index is corrupt (format v{version}, tables {sorted(names)})")

    def _initialise(self) -> None:
        with self._write() as db:
            if db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
                return  # another process created it while we waited for the lock
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                ("format", "modeltrace-index"), ("version", str(FORMAT_VERSION)),
                ("sketch_dim", str(SKETCH_DIM)), ("created_at", _now()), ("created_by", _version())])
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        self.db.execute("PRAGMA journal_mode = WAL")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- changes -------------------------------------------------------------------------------------------
    def add(self, fp: Fingerprint, name: str | None = None) -> AddResult:
        """Store a fingerprint. Re-adding unchanged content is a no-op; the same name and location with new content
        replaces the old entry; a name taken by another location is refused."""
        with self._write() as db:
            return self._add(db, fp, name)

    def add_many(self, fps: list[Fingerprint]) -> list[AddResult]:
        """Store several fingerprints in one transaction (all or none): bulk imports."""
        with self._write() as db:
            return [self._add(db, fp, None) for fp in fps]

    def _add(self, db: sqlite3.Connection, fp: Fingerprint, name: str | None) -> AddResult:
        name = name or fp.label
        if not name or len(name) > 256 or any(ord(c) < 32 for c in name):
            raise InputError(f"invalid model name {name!r}")
        same = db.execute("SELECT name FROM models WHERE content_hash = ?", (fp.content_hash,)).fetchone()
        if same is not None:
            return AddResult("unchanged" if same[0] == name else "duplicate", same[0])
        m = fp.model
        values = (fp.spec, fp.content_hash, m.get("family"), m.get("model_type"), m.get("layers"),
                  m.get("parameters"), m.get("total_bytes"), fp.bytes_read, _now(),
                  fp.sketch().astype("<f2").tobytes(), fp.to_bytes())
        row = db.execute("SELECT id, spec FROM models WHERE name = ?", (name,)).fetchone()
        if row is not None:
            if row[1] != fp.spec:
                raise InputError(f"name {name!r} is already used by {row[1]}; choose another with --name")
            db.execute("UPDATE models SET spec = ?, content_hash = ?, family = ?, model_type = ?, layers = ?, "
                       "parameters = ?, total_bytes = ?, bytes_read = ?, added_at = ?, sketch = ?, "
                       "fingerprint = ? WHERE id = ?", (*values, row[0]))
            return AddResult("updated", name)
        db.execute("INSERT INTO models (name, spec, content_hash, family, model_type, layers, parameters, "
                   "total_bytes, bytes_read, added_at, sketch, fingerprint) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (name, *values))
        return AddResult("added", name)

    def remove(self, names: list[str]) -> int:
        """Remove models by name, all or none."""
        with self._write() as db:
            missing = [n for n in names if db.execute("SELECT 1 FROM models WHERE name = ?", (n,)).fetchone() is None]
            if missing:
                raise InputError(f"not in the index: {', '.join(missing)} (nothing removed)")
            db.executemany("DELETE FROM models WHERE name = ?", [(n,) for n in names])
        return len(names)

    # ---- queries -------------------------------------------------------------------------------------------
    def count(self) -> int:
        with self._errors():
            return int(self.db.execute("SELECT count(*) FROM models").fetchone()[0])

    def entries(self) -> list[Entry]:
        with self._errors():
            rows = self.db.execute("SELECT id, name, spec, content_hash, family, model_type, layers, parameters, "
                                   "total_bytes, bytes_read, length(fingerprint), added_at FROM models ORDER BY name")
            return [Entry(*r) for r in rows]

    def by_hash(self, content_hash: str) -> str | None:
        with self._errors():
            row = self.db.execute("SELECT name FROM models WHERE content_hash = ?", (content_hash,)).fetchone()
        return None if row is None else str(row[0])

    def sketches(self) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        """(ids, names, unit summary vectors as float32 rows, fingerprint sizes) of every entry, for the first
        ranking pass."""
        with self._errors():
            rows = self.db.execute("SELECT id, name, sketch, length(fingerprint) FROM models ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        sizes = np.fromiter((r[3] or 0 for r in rows), dtype=np.int64, count=len(rows))
        width = 2 * SKETCH_DIM
        bad = next((r[1] for r in rows if not isinstance(r[2], bytes) or len(r[2]) != width), None)
        if bad is not None:
            raise InputError(f"{self.path}: index entry {bad!r} is corrupt (summary vector)")
        mat = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f2").reshape(len(rows), SKETCH_DIM)
        return ids, [str(r[1]) for r in rows], mat.astype(np.float32), sizes

    def load(self, ids: list[int]) -> list[tuple[str, Fingerprint]]:
        """(name, fingerprint) for entry ids, in the order given."""
        if not ids:
            return []
        with self._errors():
            q = ",".join("?" * len(ids))
            rows = {r[0]: r for r in self.db.execute(
                f"SELECT id, name, fingerprint FROM models WHERE id IN ({q})", [int(i) for i in ids])}
        out = []
        for i in ids:
            r = rows.get(int(i))
            if r is None:
                continue  # removed since the ranking pass
            out.append((str(r[1]), Fingerprint.from_bytes(bytes(r[2]), where=f"{self.path}: index entry {r[1]!r}")))
        return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"modeltrace {version('modeltrace')}"
    except Exception:
        return "modeltrace"
