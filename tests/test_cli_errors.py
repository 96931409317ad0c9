"""Bad input through the CLI: one line on stderr, exit code 2, never a traceback."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeltrace", *args], capture_output=True, text=True, timeout=120)


def _truncated(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    return str(p)


def _pickle(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(b"\x80\x04K\x01.")
    return str(p)


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)


@pytest.mark.parametrize("maker", [_truncated, _pickle, _empty_dir, lambda t: str(t / "missing")])
def test_inspect_bad_input_is_one_line(tmp_path, maker):
    r = run("inspect", maker(tmp_path))
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("modeltrace: error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_audit_without_candidates_is_usage_error(tmp_path):
    r = run("audit", str(tmp_path))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_help_teaches():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("inspect", "audit", "demo"):
        assert cmd in r.stdout
