"""Content digests in the index, beside the fingerprints: which indexed models hold exactly these weights.

Data flow: `store(index, name, digest)` records a model's content digest (provenance/content.py: model digest,
values digest, tensor manifest) and the weight-file SHA-256s known for free (hf:// LFS) in two tables of their own;
`find(index, text)` answers `modeltrace lookup DIGEST` (model, values or file digest); `matches(index, digest)`
gives the indexed models with identical content and those with the same values in another dtype, which `identify`
and `scan` report at once. The tables are created on first use (`CREATE ... IF NOT EXISTS`), so an index written
before them stays readable by every version; triggers drop a model's digests when its entry is removed or its
fingerprint replaced, so a digest never outlives the content it describes.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass

from modeltrace.index.store import Index
from modeltrace.provenance.content import PREFIX, VALUES_PREFIX, ContentDigest, loads_digest, parse_digest

__all__ = ["Match", "store", "find", "matches", "digest_of"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS content_digests (
        model_id INTEGER PRIMARY KEY,
        model_digest TEXT NOT NULL,
        values_digest TEXT NOT NULL,
        tensors INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        manifest BLOB NOT NULL,
        added_at TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS content_digests_model ON content_digests (model_digest)",
    "CREATE INDEX IF NOT EXISTS content_digests_values ON content_digests (values_digest)",
    """CREATE TABLE IF NOT EXISTS file_digests (
        model_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (model_id, name))""",
    "CREATE INDEX IF NOT EXISTS file_digests_sha256 ON file_digests (sha256)",
    """CREATE TRIGGER IF NOT EXISTS content_digests_removed AFTER DELETE ON models BEGIN
        DELETE FROM content_digests WHERE model_id = old.id;
        DELETE FROM file_digests WHERE model_id = old.id;
    END""",
    """CREATE TRIGGER IF NOT EXISTS content_digests_replaced AFTER UPDATE OF fingerprint ON models BEGIN
        DELETE FROM content_digests WHERE model_id = old.id;
        DELETE FROM file_digests WHERE model_id = old.id;
    END""",
)


@dataclass(frozen=True)
class Match:
    name: str
    spec: str
    kind: str  # model | values | file
    digest: str  # as printed (mtc1:..., mtv1:..., sha256:...)
    detail: str = ""  # file name for file matches


def _has_tables(ix: Index) -> bool:
    with ix._errors():
        row = ix.db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'content_digests'")
        return bool(row.fetchone()[0])


def store(ix: Index, name: str, digest: ContentDigest) -> None:
    """Record `digest` for the indexed model `name` (replacing an earlier one)."""
    import json

    with ix._write() as db:
        for statement in SCHEMA:
            db.execute(statement)
        row = db.execute("SELECT id FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            from modeltrace.errors import InputError

            raise InputError(f"not in the index: {name}")
        mid = int(row[0])
        manifest = json.dumps(digest.to_dict(), separators=(",", ":")).encode()
        db.execute("INSERT OR REPLACE INTO content_digests VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (mid, digest.model, digest.values, len(digest.tensors), digest.bytes_hashed, manifest,
                    dt.datetime.now(dt.UTC).isoformat(timespec="seconds")))
        db.execute("DELETE FROM file_digests WHERE model_id = ?", (mid,))
        db.executemany("INSERT INTO file_digests VALUES (?, ?, ?)",
                       [(mid, f, sha.lower()) for f, sha in sorted(digest.files.items())])


def _rows(ix: Index, sql: str, args: tuple) -> list[sqlite3.Row | tuple]:
    if not _has_tables(ix):
        return []
    with ix._errors():
        return ix.db.execute(sql, args).fetchall()


def find(ix: Index, text: str) -> list[Match]:
    """Indexed models whose model digest, values digest or a weight file's SHA-256 is `text`."""
    kind, hexd = parse_digest(text)
    out: list[Match] = []
    join = ("SELECT m.name, m.spec FROM content_digests c JOIN models m ON m.id = c.model_id WHERE c.{} = ? "
            "ORDER BY m.name")
    if kind in ("model", "any"):
        out += [Match(r[0], r[1], "model", PREFIX + hexd) for r in _rows(ix, join.format("model_digest"), (hexd,))]
    if kind in ("values", "any"):
        out += [Match(r[0], r[1], "values", VALUES_PREFIX + hexd)
                for r in _rows(ix, join.format("values_digest"), (hexd,))]
    if kind in ("sha256", "any"):
        out += [Match(r[0], r[1], "file", "sha256:" + hexd, r[2]) for r in _rows(
            ix, "SELECT m.name, m.spec, f.name FROM file_digests f JOIN models m ON m.id = f.model_id "
                "WHERE f.sha256 = ? ORDER BY m.name", (hexd,))]
    return out


def matches(ix: Index, digest: ContentDigest) -> tuple[list[str], list[str]]:
    """(names with identical content, names with the same values in another dtype)."""
    same = [str(r[0]) for r in _rows(ix, "SELECT m.name FROM content_digests c JOIN models m ON m.id = c.model_id "
                                         "WHERE c.model_digest = ? ORDER BY m.name", (digest.model,))]
    values = [str(r[0]) for r in _rows(ix, "SELECT m.name FROM content_digests c JOIN models m ON m.id = c.model_id "
                                           "WHERE c.values_digest = ? AND c.model_digest != ? ORDER BY m.name",
                                       (digest.values, digest.model))]
    return same, values


def digest_of(ix: Index, name: str) -> ContentDigest | None:
    rows = _rows(ix, "SELECT c.manifest FROM content_digests c JOIN models m ON m.id = c.model_id WHERE m.name = ?",
                 (name,))
    return loads_digest(bytes(rows[0][0]), f"{ix.path}: digest of {name!r}") if rows else None
