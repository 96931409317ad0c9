"""The SQLite fingerprint index: adds are atomic and idempotent, concurrent writers are safe, and corrupt, foreign or
newer files, half-way failures and remote timeouts give one-line errors and leave the index as it was."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from modeltrace.errors import InputError, ModelTraceError
from modeltrace.fingerprint import make_fingerprint
from modeltrace.index import Index
from modeltrace.index.store import APPLICATION_ID
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures (isolated env, local Hub server)


@pytest.fixture(scope="module")
def fps(corpus):
    return {n: make_fingerprint(str(corpus.path(n))) for n in ("base_a", "ft_a1", "ft_a2", "indep_00", "moe_ft1")}


def _state(path: Path) -> list[tuple]:
    db = sqlite3.connect(str(path))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return db.execute("SELECT name, content_hash, length(fingerprint) FROM models ORDER BY name").fetchall()
    finally:
        db.close()


def test_add_list_remove_and_idempotence(tmp_path, fps, corpus):
    ix = Index(tmp_path / "ix.sqlite", create=True)
    assert [ix.add(fps[n]).status for n in ("base_a", "ft_a1")] == ["added", "added"]
    assert ix.add(fps["ft_a1"]).status == "unchanged"  # same content: a no-op
    dup = ix.add(fps["ft_a1"], "again")
    assert (dup.status, dup.name) == ("duplicate", "ft_a1")  # same content under another name: not stored twice
    assert ix.count() == 2
    before = _state(ix.path)
    # the same location with new content replaces its entry in place
    changed = make_fingerprint(str(corpus.path("ft_a2")))
    changed.model["spec"] = fps["ft_a1"].spec
    assert ix.add(changed, "ft_a1").status == "updated"
    assert ix.count() == 2 and _state(ix.path) != before
    # a name already used by another location is refused
    with pytest.raises(InputError, match="already used"):
        ix.add(fps["indep_00"], "base_a")
    assert [e.name for e in ix.entries()] == ["base_a", "ft_a1"]
    with pytest.raises(InputError, match="nothing removed"):
        ix.remove(["base_a", "nope"])
    assert ix.count() == 2
    assert ix.remove(["base_a"]) == 1 and [e.name for e in ix.entries()] == ["ft_a1"]
    ix.close()
    db = sqlite3.connect(str(tmp_path / "ix.sqlite"))
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert dict(db.execute("SELECT key, value FROM meta"))["format"] == "modeltrace-index"


def _sqlite_foreign(p: Path) -> None:
    db = sqlite3.connect(str(p))
    db.execute("CREATE TABLE users (id INTEGER)")
    db.commit()
    db.close()


def _newer(p: Path, fps) -> None:
    Index(p, create=True).add(fps["base_a"])
    db = sqlite3.connect(str(p))
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()


def _filled(p: Path, fps) -> bytes:
    """An index of every fixture model, checkpointed into the main file; its bytes."""
    with Index(p, create=True) as ix:
        ix.add_many(list(fps.values()))
        ix.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return p.read_bytes()


def _truncated(p: Path, fps) -> None:
    data = _filled(p, fps)
    p.write_bytes(data[: len(data) // 3])


def _garbage_pages(p: Path, fps) -> None:
    data = bytearray(_filled(p, fps))
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema page
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("make, message", [
    (lambda p, f: p.write_bytes(b"hello, this is not a database at all" * 10), "not an SQLite database"),
    (lambda p, f: _sqlite_foreign(p), "not a modeltrace index"),
    (lambda p, f: _newer(p, f), "newer modeltrace"),
    (lambda p, f: _truncated(p, f), "corrupt"),
    (lambda p, f: _garbage_pages(p, f), "corrupt"),
    (lambda p, f: p.mkdir(), "directory"),
    (lambda p, f: None, "no index here"),
    (lambda p, f: p.write_bytes(b""), "empty file"),
])
def test_bad_index_files_give_one_line(tmp_path, fps, make, message):
    p = tmp_path / "ix.sqlite"
    make(p, fps)
    with pytest.raises(InputError) as exc:
        with Index(p) as ix:  # some damage shows only when the data is read
            ix.entries()
            ix.sketches()
            ix.load([1, 2, 3])
    assert message in str(exc.value) and "\n" not in str(exc.value)
    if message not in ("directory", "no index here", "empty file"):
        with pytest.raises(InputError):
            Index(p, create=True).add(fps["ft_a2"])  # never "repaired" by overwriting


def test_corrupt_entry_is_named_and_left_out(tmp_path, fps):
    from modeltrace.identify import identify

    ix = Index(tmp_path / "ix.sqlite", create=True)
    for f in fps.values():
        ix.add(f)
    ix.db.execute("UPDATE models SET fingerprint = x'4d54465001000000ffff' WHERE name = 'ft_a2'")
    res = identify(fps["ft_a1"], ix)
    assert res["damaged"] == [{"model": "ft_a2", "problem": "fingerprint does not match its checksum"}]
    assert "ft_a2" not in [h["model"] for h in res["hits"]]


def _writer(path: str, specs: list[str], out: mp.Queue) -> None:
    try:
        ix = Index(path, create=True)
        statuses = [ix.add(make_fingerprint(s)).status for s in specs]
        out.put(("ok", statuses))
    except ModelTraceError as exc:
        out.put(("error", str(exc)))


def test_concurrent_writers(tmp_path, corpus):
    """Four processes create and fill one new index at once, two of them adding the same models."""
    path = str(tmp_path / "shared.sqlite")
    names = ["base_a", "base_b", "ft_a1", "ft_a2", "ft_b1", "indep_00", "indep_01", "indep_02"]
    jobs = [names[0:3], names[3:6], names[6:8] + names[0:1], names[0:3]]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, [str(corpus.path(n)) for n in j], q)) for j in jobs]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(kind == "ok" for kind, _ in results), results
    statuses = [s for _, ss in results for s in ss]
    assert statuses.count("added") == len(names) and statuses.count("unchanged") == 4
    assert [r[0] for r in _state(Path(path))] == sorted(names)


def test_failure_half_way_leaves_nothing(tmp_path, corpus, fps):
    """A model whose second shard is truncated fails while fingerprinting; a failure inside the transaction and
    a process killed mid-write both roll back."""
    ix = Index(tmp_path / "ix.sqlite", create=True)
    ix.add(fps["base_a"])
    before = _state(ix.path)
    # 1. a sharded model whose last shard is cut short
    src = corpus.path("ft_a1")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src / "config.json", bad / "config.json")
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import load_file, save_file

    t = load_file(str(src / "model.safetensors"))
    names = sorted(t)
    half = len(names) // 2
    save_file({k: t[k] for k in names[:half]}, str(bad / "model-00001-of-00002.safetensors"))
    save_file({k: t[k] for k in names[half:]}, str(bad / "model-00002-of-00002.safetensors"))
    import json

    wmap = {k: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
            for i, k in enumerate(names)}
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    shard = bad / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 5000])
    with pytest.raises(InputError) as exc:
        ix.add(make_fingerprint(str(bad)))
    assert "truncated" in str(exc.value) or "corrupt" in str(exc.value) or "bytes" in str(exc.value)
    assert _state(ix.path) == before
    # 2. an error after the insert, inside the transaction
    with pytest.raises(RuntimeError):
        with ix._write() as db:
            db.execute("INSERT INTO models (name, spec, content_hash, added_at, sketch, fingerprint) "
                       "VALUES ('x', 'x', 'x', 'now', x'00', x'00')")
            raise RuntimeError("disk on fire")
    assert _state(ix.path) == before
    ix.close()
    # 3. a writer killed between its insert and its commit
    code = ("import os, sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN IMMEDIATE'); db.execute(\"INSERT INTO models (name, spec, content_hash, added_at, "
            "sketch, fingerprint) VALUES ('y', 'y', 'y', 'now', x'00', x'00')\"); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code, str(ix.path)]).returncode == 9
    assert _state(ix.path) == before
    with Index(ix.path) as again:
        assert again.add(fps["ft_a1"]).status == "added"


def test_remote_failures_leave_the_index_as_it_was(tmp_path, fps, corpus, hub_server, monkeypatch):  # noqa: F811
    ix = Index(tmp_path / "ix.sqlite", create=True)
    ix.add(fps["base_a"])
    before = _state(ix.path)
    srv = hub_server({"org/ft": corpus.path("ft_a1")})
    srv.fail_next(2, 503)  # retried: succeeds
    fp = make_fingerprint("hf://org/ft")
    assert fp.content_hash == fps["ft_a1"].content_hash
    monkeypatch.setenv("MODELTRACE_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("MODELTRACE_HTTP_RETRIES", "2")
    monkeypatch.setenv("MODELTRACE_CACHE", str(tmp_path / "cache2"))
    srv.delay_next(50, 1.0)  # stalls past every retry: a one-line error, nothing stored
    with pytest.raises(ModelTraceError) as exc:
        ix.add(make_fingerprint("hf://org/ft"))
    assert "\n" not in str(exc.value)
    assert _state(ix.path) == before
    srv.fail_next(50, 500)
    with pytest.raises(ModelTraceError):
        ix.add(make_fingerprint("hf://org/ft@main"))
    assert _state(ix.path) == before
