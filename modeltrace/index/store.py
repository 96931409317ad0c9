"""The fingerprint index: one SQLite file, no server (format documented in docs/index.md).

Writers take SQLite's write lock for the whole change (`BEGIN IMMEDIATE`) in WAL mode, so several processes may add
to one index at once and readers never see half an entry; a fingerprint is complete in memory before its
transaction starts, so a model that fails half-way leaves nothing behind. The file carries SQLite's
`application_id` ('MTIX') and `user_version` (the format version): foreign databases, files written by a newer
modeltrace, corrupt files and empty files are refused with one line. A new index is built under a temporary name and
linked into place whole, so modeltrace never leaves an empty or half-initialised file behind.

Format v2 stores SHA-256 checksums of each entry's summary vector and fingerprint (integrity.py); every read checks
them, and a damaged entry is left out and named in `Index.damaged` (what `identify` reports) instead of being used.
A v1 index is upgraded in place on opening (two new columns; the old entries stay "unverified" and are checked by
structure); `check` lists damaged entries and `repair` drops them and records checksums for sound v1 entries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeltrace.errors import InputError, ModelTraceError
from modeltrace.fingerprint.core import SKETCH_DIM, Fingerprint
from modeltrace.index.integrity import Problem, blob_checksum, problem_of, sketch_checksum, sketch_problem
from modeltrace.redact import scrub_obj

__all__ = ["FORMAT_VERSION", "AddResult", "CheckResult", "Entry", "Index", "default_index_path"]

APPLICATION_ID = 0x4D544958  # "MTIX"
FORMAT_VERSION = 2
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
    fingerprint BLOB NOT NULL,
    sketch_sha256 TEXT,
    fingerprint_sha256 TEXT
);
"""
#: format v1 -> v2: checksums (NULL for the entries a v1 index already holds: "unverified")
MIGRATE_V2 = ("ALTER TABLE models ADD COLUMN sketch_sha256 TEXT",
              "ALTER TABLE models ADD COLUMN fingerprint_sha256 TEXT")


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


@dataclass(frozen=True)
class CheckResult:
    """`Index.check`: damaged entries, entries without checksums (v1), SQLite's own structure check."""

    entries: int
    damaged: tuple[Problem, ...]
    unverified: tuple[str, ...]
    sqlite: str  # "ok" or SQLite's first complaint


class Index:
    """An open index file. `create=True` makes a new one when the path does not exist yet."""

    def __init__(self, path: Path | str, create: bool = False) -> None:
        self.path = Path(path).expanduser()
        #: damaged entries met by reads so far (name -> problem); they were left out of the results
        self.damaged: dict[str, str] = {}
        self.checksums = True  # False: a v1 index that could not be upgraded (read-only): every entry unverified
        where = str(self.path)
        if self.path.is_dir():
            raise InputError(f"{where}: is a directory, not an index file")
        if self.path.exists():
            try:
                with self.path.open("rb") as f:
                    head = f.read(16)
            except OSError as exc:
                raise InputError(f"{where}: cannot read the index ({exc.strerror})") from None
            if not head:
                raise InputError(f"{where}: empty file, not a modeltrace index (modeltrace never leaves one; "
                                 "delete it or choose another path)")
            if head != SQLITE_MAGIC:
                raise InputError(f"{where}: not a modeltrace index (not an SQLite database)")
        elif not create:
            raise InputError(f"{where}: no index here; create one with `modeltrace index add MODEL`")
        else:
            self._create()
        with self._errors():
            self.db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                      check_same_thread=False)
        try:
            with self._errors():
                self._check()
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

    def _create(self) -> None:
        """A new, initialised index built under a temporary name and hard-linked into place: the path never holds
        an empty or half-made index, and of several processes creating it at once exactly one wins."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot create the index folder ({exc.strerror})") from None
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
        try:
            with self._errors():
                db = sqlite3.connect(str(tmp), isolation_level=None)
                try:
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                        ("format", "modeltrace-index"), ("version", str(FORMAT_VERSION)),
                        ("sketch_dim", str(SKETCH_DIM)), ("created_at", _now()), ("created_by", _version())])
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
                    db.execute("PRAGMA journal_mode = WAL")
                finally:
                    db.close()
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    pass  # another process created it first: use theirs
                except OSError:  # no hard links here (some network file systems): rename, unless one appeared
                    if not self.path.exists():
                        os.replace(tmp, self.path)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def _check(self) -> None:
        app = self.db.execute("PRAGMA application_id").fetchone()[0]
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if app != APPLICATION_ID:
            raise InputError(f"{self.path}: an SQLite database but not a modeltrace index")
        if version > FORMAT_VERSION:
            raise InputError(f"{self.path}: written by a newer modeltrace (index format v{version}; this version "
                             f"reads v{FORMAT_VERSION}); upgrade modeltrace")
        names = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version < 1 or not {"meta", "models"} <= names:
            raise InputError(f"{self.path}: index is corrupt (format v{version}, tables {sorted(names)})")
        if version == 1:
            self._upgrade()

    def _upgrade(self) -> None:
        """v1 -> v2 in place (two columns; instant). A read-only v1 index is read as it is, every entry unverified."""
        try:
            with self._write() as db:
                if db.execute("PRAGMA user_version").fetchone()[0] == 1:  # not upgraded by another process meanwhile
                    for statement in MIGRATE_V2:
                        db.execute(statement)
                    db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(FORMAT_VERSION),))
                    db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        except InputError as exc:
            if "readonly" not in str(exc) and "read-only" not in str(exc):
                raise
            self.checksums = False

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
        if not self.checksums:
            raise InputError(f"{self.path}: a read-only index of format v1; cannot add to it")
        name = name or fp.label
        if not name or len(name) > 256 or any(ord(c) < 32 for c in name):
            raise InputError(f"invalid model name {name!r}")
        same = db.execute("SELECT name FROM models WHERE content_hash = ?", (fp.content_hash,)).fetchone()
        if same is not None:
            return AddResult("unchanged" if same[0] == name else "duplicate", same[0])
        if scrub_obj(fp.model) != fp.model:  # a credential in a location (URL userinfo, a token): never stored
            fp = dataclasses.replace(fp, model=scrub_obj(fp.model))
        m = fp.model
        sketch, blob = fp.sketch().astype("<f2").tobytes(), fp.to_bytes()
        values = (fp.spec, fp.content_hash, m.get("family"), m.get("model_type"), m.get("layers"),
                  m.get("parameters"), m.get("total_bytes"), fp.bytes_read, _now(), sketch, blob,
                  sketch_checksum(fp.content_hash, sketch), blob_checksum(blob))
        row = db.execute("SELECT id, spec FROM models WHERE name = ?", (name,)).fetchone()
        if row is not None:
            if row[1] != fp.spec:
                raise InputError(f"name {name!r} is already used by {row[1]}; choose another with --name")
            db.execute("UPDATE models SET spec = ?, content_hash = ?, family = ?, model_type = ?, layers = ?, "
                       "parameters = ?, total_bytes = ?, bytes_read = ?, added_at = ?, sketch = ?, "
                       "fingerprint = ?, sketch_sha256 = ?, fingerprint_sha256 = ? WHERE id = ?", (*values, row[0]))
            return AddResult("updated", name)
        db.execute("INSERT INTO models (name, spec, content_hash, family, model_type, layers, parameters, "
                   "total_bytes, bytes_read, added_at, sketch, fingerprint, sketch_sha256, fingerprint_sha256) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (name, *values))
        return AddResult("added", name)

    def remove(self, names: list[str]) -> int:
        """Remove models by name, all or none."""
        with self._write() as db:
            missing = [n for n in names if db.execute("SELECT 1 FROM models WHERE name = ?", (n,)).fetchone() is None]
            if missing:
                raise InputError(f"not in the index: {', '.join(missing)} (nothing removed)")
            db.executemany("DELETE FROM models WHERE name = ?", [(n,) for n in names])
        return len(names)

    # ---- integrity -----------------------------------------------------------------------------------------
    def _sums(self) -> str:
        return "sketch_sha256, fingerprint_sha256" if self.checksums else "NULL, NULL"

    def check(self) -> CheckResult:
        """Every entry read back and checked (checksums, or structure for v1 entries), plus SQLite's quick check."""
        with self._errors():
            quick = [str(r[0]) for r in self.db.execute("PRAGMA quick_check(5)")]
            damaged, unverified, n = [], [], 0
            for name, chash, sketch, blob, s_sum, b_sum in self.db.execute(
                    f"SELECT name, content_hash, sketch, fingerprint, {self._sums()} FROM models ORDER BY name"):
                n += 1
                bad = problem_of(chash, sketch, blob, s_sum, b_sum)
                if bad:
                    damaged.append(Problem(str(name), bad))
                elif s_sum is None or b_sum is None:
                    unverified.append(str(name))
        return CheckResult(n, tuple(damaged), tuple(unverified), "ok" if quick == ["ok"] else "; ".join(quick))

    def repair(self) -> tuple[list[Problem], list[str]]:
        """Drop damaged entries and record checksums for sound entries that had none, in one transaction.
        Returns (dropped, newly checksummed)."""
        if not self.checksums:
            raise InputError(f"{self.path}: a read-only index; cannot repair it")
        dropped, sealed = [], []
        with self._write() as db:
            for rid, name, chash, sketch, blob, s_sum, b_sum in db.execute(
                    "SELECT id, name, content_hash, sketch, fingerprint, sketch_sha256, fingerprint_sha256 "
                    "FROM models ORDER BY name").fetchall():
                bad = problem_of(chash, sketch, blob, s_sum, b_sum)
                if bad:
                    db.execute("DELETE FROM models WHERE id = ?", (rid,))
                    dropped.append(Problem(str(name), bad))
                elif s_sum is None or b_sum is None:
                    db.execute("UPDATE models SET sketch_sha256 = ?, fingerprint_sha256 = ? WHERE id = ?",
                               (sketch_checksum(str(chash), sketch), blob_checksum(blob), rid))
                    sealed.append(str(name))
        return dropped, sealed

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
        """(ids, names, unit summary vectors as float32 rows, fingerprint sizes) of every sound entry, for the first
        ranking pass; entries whose summary vector is damaged are left out and noted in `damaged`."""
        col = "sketch_sha256" if self.checksums else "NULL"
        with self._errors():
            rows = self.db.execute(f"SELECT id, name, sketch, length(fingerprint), content_hash, {col} FROM models "
                                   "ORDER BY id").fetchall()
        good = []
        for r in rows:
            bad = sketch_problem(r[4], r[2], r[5])
            if bad:
                self.damaged[str(r[1])] = bad
            else:
                good.append(r)
        ids = np.fromiter((r[0] for r in good), dtype=np.int64, count=len(good))
        sizes = np.fromiter((r[3] or 0 for r in good), dtype=np.int64, count=len(good))
        mat = np.frombuffer(b"".join(r[2] for r in good), dtype="<f2").reshape(len(good), SKETCH_DIM)
        with np.errstate(all="ignore"):
            mat = np.nan_to_num(mat.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return ids, [str(r[1]) for r in good], mat, sizes

    def load(self, ids: list[int]) -> list[tuple[str, Fingerprint]]:
        """(name, fingerprint) for entry ids, in the order given; damaged entries are left out and noted in
        `damaged`."""
        if not ids:
            return []
        with self._errors():
            q = ",".join("?" * len(ids))
            rows = {r[0]: r for r in self.db.execute(
                f"SELECT id, name, fingerprint, content_hash, sketch, {self._sums()} FROM models WHERE id IN ({q})",
                [int(i) for i in ids])}
        out = []
        for i in ids:
            r = rows.get(int(i))
            if r is None:
                continue  # removed since the ranking pass
            name, blob = str(r[1]), r[2]
            bad = problem_of(r[3], r[4], blob, r[5], r[6])
            if bad is None:
                try:
                    out.append((name, Fingerprint.from_bytes(bytes(blob), where=f"{self.path}: index entry {name!r}")))
                    continue
                except ModelTraceError:
                    bad = "fingerprint is unreadable"
            self.damaged[name] = bad
        return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"modeltrace {version('modeltrace')}"
    except Exception:
        return "modeltrace"
