"""Fault injection for the CLI: kill -9 of a parent with workers, report paths that cannot be written, usage errors,
a candidate of another hidden size. Each case asserts the exact outcome. (Damaged index entries:
tests/index/test_index_integrity.py; tampered reports: tests/report/test_verify_findings.py; secret-echoing
endpoints: tests/probes/test_secrets.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeltrace", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


# ---- workers end with their parent -----------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = text.rsplit(")", 1)[1].split()
    return int(rest[1]), rest[0]


def _descendants(root: int) -> set[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None:
                parents[int(d.name)] = st[0]
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("command", ["index add", "scan"])
def test_kill_9_leaves_no_orphan_workers(corpus, tmp_path, command):
    models = [str(corpus.path(n)) for n in ("base_a", "base_b", "ft_a1", "ft_a2", "ft_b1", "indep_00", "indep_01",
                                            "indep_02", "indep_03", "indep_04", "mix_base", "moe_base")]
    index = tmp_path / "ix.sqlite"
    if command == "index add":
        args = ["index", "add", *models, "--workers", "2", "--index", str(index)]
    else:
        (tmp_path / "list.txt").write_text("\n".join(models) + "\n")
        args = ["scan", str(tmp_path / "list.txt"), "--add", "--workers", "2", "--index", str(index)]
    proc = subprocess.Popen([sys.executable, "-m", "modeltrace", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _descendants(proc.pid)
            workers = [p for p in seen if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()] \
                if seen else []
            if len(workers) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(seen) >= 2, "the workers never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in seen):
            time.sleep(0.1)
        left = sorted(p for p in seen if _alive(p))
        assert left == [], f"orphans still running: {left}"
    finally:
        for p in seen:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


# ---- report paths are checked before the work starts -----------------------------------------------------------
def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        return folder / "r.json"
    return Path("/proc/modeltrace-report.json")  # root may write anywhere but in /proc


@pytest.mark.parametrize("where, message", [
    (lambda t: t / "missing" / "r.json", "{p}: folder {p.parent} does not exist"),
    (lambda t: _unwritable(t), "{p}: cannot write there ("),
    (lambda t: t, "{p}: cannot tell the report format from the file name"),
])
def test_output_path_fails_before_the_work(tmp_path, where, message):
    """The suspect does not exist either: the output error coming first shows nothing was read."""
    p = where(tmp_path)
    for args in (("audit", tmp_path / "no-model", "-c", tmp_path / "no-cand", "-o", p),
                 ("inspect", tmp_path / "no-model", "-o", p)):
        r = run(*args)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.startswith("modeltrace: error: " + message.format(p=p)), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_recipe_path_fails_before_the_work(tmp_path):
    r = run("audit", tmp_path / "no-model", "-c", tmp_path / "no-cand", "--recipe", tmp_path / "nope" / "r.yaml")
    assert r.returncode == 2
    assert r.stderr == f"modeltrace: error: {tmp_path / 'nope' / 'r.yaml'}: folder {tmp_path / 'nope'} does not " \
                       "exist\n"


# ---- usage errors: one line and a pointer to --help -------------------------------------------------------------
@pytest.mark.parametrize("args, line", [
    (["audit", "x", "--bogus"], "modeltrace: error: No such option: --bogus (Possible options: --base) (see "
                                "`modeltrace audit --help`)"),
    (["audit"], "modeltrace: error: Missing argument '[ADDRESS] SUSPECT'. (see `modeltrace audit --help`)"),
    (["index", "add"], "modeltrace: error: Missing argument 'models'. (see `modeltrace index add --help`)"),
    (["identify", "x", "--top", "0"], "modeltrace: error: Invalid value for '--top': Input should be greater than "
                                      "or equal to 1 (see `modeltrace identify --help`)"),
    (["frobnicate"], "modeltrace: error: No such command 'frobnicate'. (see `modeltrace --help`)"),
])
def test_usage_errors_are_one_line(args, line):
    r = run(*args)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n")


def test_bare_group_still_shows_its_help():
    r = run("index")
    assert r.returncode == 0 and "check" in r.stdout and "repair" in r.stdout and r.stderr == ""


# ---- a candidate of another hidden size -------------------------------------------------------------------------
def _narrow(corpus, dest: Path) -> Path:
    """base_a cut to hidden size 48: tensors of other shapes, which the alignment cannot map."""
    import ml_dtypes  # noqa: F401 - bfloat16 for safetensors.numpy
    from safetensors.numpy import load_file, save_file

    src = corpus.path("base_a")
    t = load_file(str(src / "model.safetensors"))
    cut = {k: np.ascontiguousarray(v[tuple(slice(0, 48) if d == 64 else slice(0, 24) if d == 32 else slice(None)
                                             for d in v.shape)]) for k, v in t.items()}
    dest.mkdir()
    save_file(cut, str(dest / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48, "head_dim": 12}))
    return dest


def test_candidate_of_another_hidden_size_gets_a_plain_warning(corpus, tmp_path):
    narrow = _narrow(corpus, tmp_path / "narrow")
    r = run("audit", corpus.path("ft_a1"), "-c", narrow, "-c", corpus.path("base_b"))
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "warning: narrow: could not be aligned to the suspect (hidden size 48, the suspect's 64); compared in " \
           "stored order" in err
    assert "broadcast" not in err and "operands" not in err and "Traceback" not in err
