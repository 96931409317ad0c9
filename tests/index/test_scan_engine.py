"""`scan` and the engine: one task per model in local processes or on Ray (a real local instance, num_cpus=2), with
the same results as a single process, per-model one-line errors, and the CLI's error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modeltrace import engine
from modeltrace.fingerprint import Fingerprint
from modeltrace.index import Index
from modeltrace.scan import expand, fingerprint_job, scan

MODELS = ["m_linear_rio", "ft_b1", "indep_07", "moe_linear", "s_stack_2x2"]
INDEXED = ["base_a", "base_b", "ft_a1", "ft_a2", "ft_b1", "indep_00", "moe_ft1", "moe_ft2", "moe_base"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "modeltrace", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _stable(row: dict) -> dict:
    """A scan row without what legitimately differs between runs (timings)."""
    return json.loads(json.dumps({k: v for k, v in row.items() if k != "elapsed_s"}, default=str))


@pytest.fixture(scope="module")
def index_path(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "ix.sqlite"
    r = cli("index", "add", *(str(corpus.path(n)) for n in INDEXED), "--index", str(path), "--workers", "2")
    assert r.returncode == 0, r.stderr
    return path


def test_ray_results_equal_single_process_results(corpus, index_path, ray_local, tmp_path):
    specs = [str(corpus.path(n)) for n in MODELS] + [str(tmp_path / "missing")]
    jobs = [(s, False) for s in specs]
    inline = list(engine.run(fingerprint_job, jobs, workers=1))
    procs = list(engine.run(fingerprint_job, jobs, workers=2))
    remote = list(engine.run(fingerprint_job, jobs, ray=True))
    for a, b, c in zip(inline, procs, remote, strict=True):
        assert a.index == b.index == c.index and a.error == b.error == c.error
        if a.ok:
            assert a.value[0] == b.value[0] == c.value[0]  # the very same bytes
            fa, fc = (Fingerprint.from_bytes(o.value[0]) for o in (a, c))
            assert fa.content_hash == fc.content_hash
            assert all((fa.slots[k].values == fc.slots[k].values).all() for k in fa.slots)
    assert "no such file" in inline[-1].error
    with Index(index_path) as ix:
        local = [_stable(r) for r in scan(specs, ix, workers=2)]
        on_ray = [_stable(r) for r in scan(specs, ix, ray=True)]
    assert local == on_ray
    by = {r["name"]: r for r in local if r["ok"]}
    assert by["m_linear_rio"]["summary"].startswith("0.60 × ft_a1 + 0.40 × ft_a2, linear")
    assert by["indep_07"]["relation"] == "independent"
    assert by["s_stack_2x2"]["relation"] == "stack"
    assert not local[-1]["ok"]


def test_engine_keeps_errors_per_item():
    out = list(engine.run(_boom, [1, 0, 2], workers=1))
    assert [o.ok for o in out] == [True, False, True]
    assert out[1].error.startswith("internal error: ZeroDivisionError")


def _boom(x: int) -> float:
    return 1 / x


def test_expand_lists_and_folders(corpus, tmp_path):
    lst = tmp_path / "models.txt"
    lst.write_text(f"# uploads\n{corpus.path('ft_a1')}\n\nhf://org/x  # remote\n../{tmp_path.name}/rel\n")
    assert expand(str(lst)) == [str(corpus.path("ft_a1")), "hf://org/x", str(tmp_path / "rel")]
    folder = expand(str(corpus.root / "models"))
    assert len(folder) == len(corpus.names()) and str(corpus.path("base_a")) in folder
    assert expand(str(corpus.path("base_a"))) == [str(corpus.path("base_a"))]
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no models found"):
        expand(str(tmp_path / "empty"))


def test_cli_identify_list_remove_and_scan(corpus, index_path, tmp_path):
    r = cli("identify", str(corpus.path("m_task_arith")), "--index", str(index_path), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["method"] == "task_arithmetic" and doc["base"] == "base_a"
    assert doc["audit_command"].endswith(f"--base {corpus.path('base_a')}")
    r = cli("identify", str(corpus.path("indep_09")), "--index", str(index_path), "--fail-on-related")
    assert r.returncode == 0 and "NO ANCESTOR" in r.stdout
    r = cli("identify", str(corpus.path("m_linear_rio")), "--index", str(index_path), "--fail-on-related")
    assert r.returncode == 1 and "modeltrace audit" in r.stdout
    r = cli("index", "list", "--json", env={"MODELTRACE_INDEX": str(index_path)})
    assert sorted(e["name"] for e in json.loads(r.stdout)) == sorted(INDEXED)
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(index_path.read_bytes())
    assert cli("index", "remove", "indep_00", "--index", str(copy)).returncode == 0
    lst = tmp_path / "l.txt"
    lst.write_text(f"{corpus.path('m_linear_rio')}\n{corpus.path('indep_08')}\n")
    r = cli("scan", str(lst), "--index", str(copy), "--workers", "2", "--json", "--add")
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and [x["added"] for x in rows] == ["added", "added"]
    r = cli("index", "add", str(corpus.path("m_linear_rio")), "--index", str(copy))
    assert r.returncode == 0 and "unchanged" in r.stdout


@pytest.mark.parametrize("args", [
    ("identify", "MISSING_MODEL"),
    ("identify", "SUSPECT", "--index", "NOT_AN_INDEX"),
    ("index", "list", "--index", "NOWHERE"),
    ("index", "add", "A", "B", "--name", "x"),
    ("scan", "--index", "INDEX"),
    ("scan", "EMPTY_DIR", "--index", "INDEX"),
])
def test_cli_bad_input_is_one_line(corpus, index_path, tmp_path, args):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    (tmp_path / "empty").mkdir()
    subst = {"MISSING_MODEL": str(tmp_path / "nope"), "SUSPECT": str(corpus.path("ft_a1")),
             "NOT_AN_INDEX": str(junk), "NOWHERE": str(tmp_path / "none.sqlite"), "A": str(corpus.path("ft_a1")),
             "B": str(corpus.path("ft_a2")), "INDEX": str(index_path), "EMPTY_DIR": str(tmp_path / "empty")}
    r = cli(*(subst.get(a, a) for a in args), env={"MODELTRACE_INDEX": str(index_path)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("modeltrace: error:") and "Traceback" not in r.stderr, r.stderr
