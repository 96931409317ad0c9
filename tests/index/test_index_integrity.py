"""Stored fingerprints are checked: a checksum per entry verified on every read, damaged entries named and never
used, `index check` / `index repair`, v1 indexes upgraded in place, numerical failures in identify caught per model,
and an empty index file refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeltrace.fingerprint import make_fingerprint
from modeltrace.identify import identify
from modeltrace.index import Index
from modeltrace.index.integrity import blob_checksum
from modeltrace.index.store import APPLICATION_ID

NAMES = ("base_a", "ft_a1", "ft_a2", "base_b", "indep_00")


@pytest.fixture(scope="module")
def fps(corpus):
    return {n: make_fingerprint(str(corpus.path(n))) for n in (*NAMES, "m_linear_rio")}


def _filled(path: Path, fps) -> Path:
    with Index(path, create=True) as ix:
        ix.add_many([fps[n] for n in NAMES])
    return path


def _damage(path: Path, name: str, seed: int = 0, reseal: bool = False) -> None:
    """1 KiB of random bytes in the middle of one entry's fingerprint (SQLite structure intact); `reseal` also
    rewrites its checksum, as damage a checksum cannot see would look."""
    db = sqlite3.connect(str(path))
    blob = bytearray(db.execute("SELECT fingerprint FROM models WHERE name = ?", (name,)).fetchone()[0])
    mid = len(blob) // 2
    blob[mid:mid + 1024] = np.random.default_rng(seed).bytes(1024)
    db.execute("UPDATE models SET fingerprint = ? WHERE name = ?", (bytes(blob), name))
    if reseal:
        db.execute("UPDATE models SET fingerprint_sha256 = ? WHERE name = ?", (blob_checksum(bytes(blob)), name))
    db.commit()
    db.close()


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeltrace", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_damaged_fingerprint_is_named_and_never_used(tmp_path, fps):
    """The issue's case: random bytes inside one parent's fingerprint of a 0.6/0.4 merge."""
    path = _filled(tmp_path / "ix.sqlite", fps)
    _damage(path, "ft_a2")
    with Index(path) as ix:
        res = identify(fps["m_linear_rio"], ix)
    assert res["damaged"] == [{"model": "ft_a2", "problem": "fingerprint does not match its checksum"}]
    assert all(h["model"] != "ft_a2" for h in res["hits"]) and res["index"]["compared"] == len(NAMES) - 1
    assert "ft_a2" not in res["summary"]


def test_damaged_summary_vector_is_left_out_of_the_ranking(tmp_path, fps):
    path = _filled(tmp_path / "ix.sqlite", fps)
    db = sqlite3.connect(str(path))
    db.execute("UPDATE models SET sketch = zeroblob(2048) WHERE name = 'ft_a1'")
    db.commit()
    db.close()
    with Index(path) as ix:
        res = identify(fps["m_linear_rio"], ix)
    assert res["damaged"] == [{"model": "ft_a1", "problem": "summary vector does not match its checksum"}]
    assert res["index"]["models"] == len(NAMES) - 1


def test_index_check_and_repair_cli(tmp_path, fps, corpus):
    path = _filled(tmp_path / "ix.sqlite", fps)
    r = run("index", "check", "--index", path)
    assert r.returncode == 0 and f"{len(NAMES)} entries, all sound" in r.stdout, r.stdout + r.stderr
    _damage(path, "ft_a2")
    r = run("index", "check", "--index", path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "damaged ft_a2: fingerprint does not match its checksum" in r.stdout
    assert f"1 of {len(NAMES)} entries damaged" in r.stdout
    r = run("identify", corpus.path("m_linear_rio"), "--index", path)
    assert r.returncode == 0, r.stderr
    assert "warning: index entry 'ft_a2' is damaged (fingerprint does not match its checksum) and was not used" \
        in r.stderr and "Traceback" not in r.stderr
    r = run("index", "repair", "--index", path)
    assert r.returncode == 0 and "dropped ft_a2: fingerprint does not match its checksum" in r.stdout
    assert f"{len(NAMES) - 1} entries left" in r.stdout
    r = run("index", "check", "--index", path, "--json")
    assert r.returncode == 0 and '"damaged": []' in r.stdout


def _v1_index(path: Path, fps) -> None:
    """An index as modeltrace wrote it before checksums (format v1)."""
    db = sqlite3.connect(str(path))
    db.executescript(f"""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE models (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec TEXT NOT NULL,
            content_hash TEXT NOT NULL UNIQUE, family TEXT, model_type TEXT, layers INTEGER, parameters INTEGER,
            total_bytes INTEGER, bytes_read INTEGER, added_at TEXT NOT NULL, sketch BLOB NOT NULL,
            fingerprint BLOB NOT NULL);
        INSERT INTO meta VALUES ('format', 'modeltrace-index'), ('version', '1');
        PRAGMA application_id = {APPLICATION_ID};
        PRAGMA user_version = 1;
    """)
    for n in NAMES:
        fp = fps[n]
        db.execute("INSERT INTO models (name, spec, content_hash, added_at, sketch, fingerprint) VALUES "
                   "(?, ?, ?, 'then', ?, ?)", (n, fp.spec, fp.content_hash, fp.sketch().astype("<f2").tobytes(),
                                               fp.to_bytes()))
    db.commit()
    db.close()


def test_v1_index_is_upgraded_and_checked_by_structure(tmp_path, fps):
    path = tmp_path / "old.sqlite"
    _v1_index(path, fps)
    _damage(path, "ft_a2")  # no checksum to fail: the structure check must catch it
    with Index(path) as ix:
        res = ix.check()
        assert [(p.name, p.problem) for p in res.damaged] == [
            ("ft_a2", "fingerprint holds non-finite numbers")]
        assert sorted(res.unverified) == sorted(n for n in NAMES if n != "ft_a2")
        got = identify(fps["m_linear_rio"], ix)
        assert [d["model"] for d in got["damaged"]] == ["ft_a2"]
        dropped, sealed = ix.repair()
        assert [p.name for p in dropped] == ["ft_a2"] and sorted(sealed) == sorted(res.unverified)
        after = ix.check()
        assert not after.damaged and not after.unverified and after.entries == len(NAMES) - 1
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_numerical_failures_are_caught_per_candidate(tmp_path, fps, monkeypatch):
    import importlib

    ident = importlib.import_module("modeltrace.identify")  # the module, not the API function of that name

    path = _filled(tmp_path / "ix.sqlite", fps)
    real = ident.compare

    def flaky(a, b):
        if b.label == "base_b":
            raise np.linalg.LinAlgError("SVD did not converge")
        return real(a, b)

    monkeypatch.setattr(ident, "compare", flaky)
    with Index(path) as ix:
        res = identify(fps["m_linear_rio"], ix)
    assert res["failed"] == [{"model": "base_b", "problem": "numerical failure (LinAlgError: SVD did not converge)"}]
    assert res["relation"] == "merge"

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(ident, "_lineage", broken)
    with Index(path) as ix:
        res = identify(fps["m_linear_rio"], ix)
    assert res["relation"] == "related" and "SVD did not converge" in res["summary"]
    assert {p["model"] for p in res["parents"]} >= {"ft_a1", "ft_a2"}


def test_damage_a_checksum_cannot_see_is_never_exit_70(tmp_path, fps, corpus):
    """Random bytes with a matching checksum (as if written damaged): whatever identify makes of them, it answers
    with exit 0 and no numpy warning or traceback."""
    path = _filled(tmp_path / "ix.sqlite", fps)
    for seed, name in enumerate(("ft_a1", "ft_a2")):
        _damage(path, name, seed=seed, reseal=True)
    r = run("identify", corpus.path("m_linear_rio"), "--index", path)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr and "internal error" not in r.stderr


def test_empty_index_file_is_refused_not_reinitialised(tmp_path, corpus):
    path = tmp_path / "empty.sqlite"
    path.write_bytes(b"")
    r = run("index", "add", corpus.path("base_a"), "--index", path)
    assert r.returncode == 2 and path.stat().st_size == 0
    assert r.stderr.strip() == (f"modeltrace: error: {path}: empty file, not a modeltrace index (modeltrace never "
                                "leaves one; delete it or choose another path)")
    # a new index appears whole: no temporary files are left beside it
    new = tmp_path / "new.sqlite"
    assert run("index", "add", corpus.path("base_a"), "--index", new).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("new.sqlite-")) == [
        "empty.sqlite", "new.sqlite"]
