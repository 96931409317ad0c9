"""The family tree's cache, in the index file itself (tables of its own; the index's `models` table is untouched).

- `tree_models`: per content hash, what the solver needs of a model without decoding its fingerprint (storage dtype,
  value grid, layer count, per-tensor rounding floors) and whether its summary vector has been compared with every
  model indexed before it (`scanned`);
- `tree_pairs`: per candidate pair of content hashes (a < b), the evidence of tree/evidence.py (p-value, correlation,
  copy flags, per-tensor Gram entries as float64, layers copied);
- `tree_families`: solved families (tree/family.py output) keyed by a digest of their members and the solver
  version, so a tree after one `index add` re-solves only the family the new model joins.

Rows are keyed by content hash, so renaming, removing and re-adding models never leaves wrong rows behind: rows of
models no longer in the index are ignored and pruned. The tables are created on first use (`CREATE TABLE IF NOT
EXISTS`); an index written by an older modeltrace simply has none yet.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

import numpy as np

from modeltrace.index.store import Index
from modeltrace.tree.evidence import Pair

__all__ = ["StoredPairs", "TreeCache"]

#: Bump when the evidence or solver changes meaning: cached rows of another version are ignored and rebuilt.
VERSION = "5"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tree_models (content_hash TEXT PRIMARY KEY, version TEXT NOT NULL, info TEXT NOT NULL,
    scanned INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS tree_pairs (a TEXT NOT NULL, b TEXT NOT NULL, version TEXT NOT NULL, log10_p REAL NOT NULL,
    meta TEXT NOT NULL, grams BLOB NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE IF NOT EXISTS tree_families (digest TEXT PRIMARY KEY, solution TEXT NOT NULL);
"""


class TreeCache:
    def __init__(self, index: Index) -> None:
        self.index = index
        self.db: sqlite3.Connection = index.db
        with index._write() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    # ---- models --------------------------------------------------------------------------------------------
    def model_infos(self) -> dict[str, tuple[dict, bool]]:
        with self.index._errors():
            rows = self.db.execute("SELECT content_hash, info, scanned FROM tree_models WHERE version = ?",
                                   (VERSION,)).fetchall()
        return {r[0]: (_info_in(r[1]), bool(r[2])) for r in rows}

    def put_models(self, infos: dict[str, dict]) -> None:
        with self.index._write() as db:
            db.executemany("INSERT OR REPLACE INTO tree_models (content_hash, version, info, scanned) "
                           "VALUES (?, ?, ?, 0)", [(h, VERSION, _info_out(i)) for h, i in infos.items()])

    def mark_scanned(self, hashes: Iterable[str]) -> None:
        with self.index._write() as db:
            db.executemany("UPDATE tree_models SET scanned = 1 WHERE content_hash = ?", [(h,) for h in hashes])

    # ---- pairs ---------------------------------------------------------------------------------------------
    def pairs(self, hashes: set[str]) -> StoredPairs:
        """The stored pairs among `hashes`, decoded only when a family being solved needs their evidence."""
        with self.index._errors():
            rows = self.db.execute("SELECT a, b, log10_p, meta, grams FROM tree_pairs WHERE version = ?",
                                   (VERSION,)).fetchall()
        return StoredPairs({(a, b): (lp, meta, grams) for a, b, lp, meta, grams in rows
                            if a in hashes and b in hashes})

    def put_pairs(self, pairs: list[Pair]) -> None:
        if not pairs:
            return
        with self.index._write() as db:
            db.executemany("INSERT OR REPLACE INTO tree_pairs (a, b, version, log10_p, meta, grams) "
                           "VALUES (?, ?, ?, ?, ?, ?)", [(p.a, p.b, VERSION, p.log10_p, *_encode(p)) for p in pairs])

    # ---- families ------------------------------------------------------------------------------------------
    def family(self, digest: str) -> dict | None:
        with self.index._errors():
            row = self.db.execute("SELECT solution FROM tree_families WHERE digest = ?", (digest,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put_families(self, solved: dict[str, dict]) -> None:
        if not solved:
            return
        with self.index._write() as db:
            db.executemany("INSERT OR REPLACE INTO tree_families (digest, solution) VALUES (?, ?)",
                           [(d, json.dumps(s)) for d, s in solved.items()])

    def prune(self, hashes: set[str]) -> int:
        """Forget rows of models no longer in the index (and stale versions)."""
        with self.index._write() as db:
            gone = [r[0] for r in db.execute("SELECT content_hash FROM tree_models") if r[0] not in hashes]
            db.executemany("DELETE FROM tree_models WHERE content_hash = ?", [(h,) for h in gone])
            dead = [(a, b) for a, b in db.execute("SELECT a, b FROM tree_pairs")
                    if a not in hashes or b not in hashes]
            db.executemany("DELETE FROM tree_pairs WHERE a = ? AND b = ?", dead)
            db.execute("DELETE FROM tree_pairs WHERE version != ?", (VERSION,))
            db.execute("DELETE FROM tree_models WHERE version != ?", (VERSION,))
        return len(gone) + len(dead)


class StoredPairs:
    """Pairs by (a, b): p-values at hand (families need only those), the rest of the evidence decoded on access."""

    def __init__(self, rows: dict[tuple[str, str], tuple[float, str, bytes]]) -> None:
        self.lp = {k: float(r[0]) for k, r in rows.items()}
        self.rows = rows
        self.done: dict[tuple[str, str], Pair] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.lp

    def __len__(self) -> int:
        return len(self.lp)

    def __getitem__(self, key: tuple[str, str]) -> Pair:
        p = self.done.get(key)
        if p is None:
            lp, meta, grams = self.rows[key]
            p = self.done[key] = _decode(key[0], key[1], lp, meta, grams)
        return p

    def __setitem__(self, key: tuple[str, str], p: Pair) -> None:
        self.done[key] = p
        self.lp[key] = p.log10_p


def _info_out(info: dict) -> str:
    """A model's info as stored: floors as a list in the order of its keys (the keys are not written twice, which
    halves what an incremental tree parses for every indexed model)."""
    floors = info.get("floors") or {}
    return json.dumps({**info, "floors": [floors.get(k, 0.0) for k in info.get("keys", [])]}, separators=(",", ":"))


def _info_in(text: str) -> dict:
    info = json.loads(text)
    if isinstance(info.get("floors"), list):
        info["floors"] = dict(zip(info.get("keys", []), info["floors"], strict=False))
    return info


def _encode(p: Pair) -> tuple[str, bytes]:
    meta = {"z": p.z, "equal": p.equal, "corr": p.corr, "min_corr": p.min_corr, "keys": p.keys,
            "copies_ab": {str(k): v for k, v in p.copies_ab.items()},
            "copies_ba": {str(k): v for k, v in p.copies_ba.items()}}
    grams = np.stack([p.gaa, p.gab, p.gbb]).astype("<f8").tobytes() if p.keys else b""
    return json.dumps(meta, separators=(",", ":")), grams


def _decode(a: str, b: str, lp: float, meta_text: str, grams: bytes) -> Pair:
    m = json.loads(meta_text)
    n = len(m["keys"])
    g = np.frombuffer(grams, dtype="<f8").reshape(3, n) if n else np.zeros((3, 0))
    return Pair(a, b, float(lp), float(m["z"]), float(m["corr"]), float(m["min_corr"]), list(m["keys"]),
                g[0], g[1], g[2], {int(k): int(v) for k, v in m["copies_ab"].items()},
                {int(k): int(v) for k, v in m["copies_ba"].items()}, float(m.get("equal", 0.0)))
