"""The endpoint backend against a real OpenAI-compatible server: `transformers serve` (transformers[serving], from
PyPI) serving the tiny merge on 127.0.0.1, started and stopped by this module.

What goes over HTTP must measure the same model as the local backend: the identity shares contain the exact truth,
and `probe compare` recognises the served model as the local checkpoint it was loaded from (greedy outputs only:
`transformers serve` returns no log-probabilities, which the backend detects and reports).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from modeltrace.stats import wilson_modified

try:
    from probe_models import NAMES, truth_interval
except ImportError:  # tests/ imported as a package
    from tests.probe_models import NAMES, truth_interval

KEY = "sk-live-probe-9d8e7f6a5b"


def _transformers_cli() -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("transformers")
    assert found, "the `transformers` command is missing (pip install 'transformers[serving]')"
    return [found]


@pytest.fixture(scope="module")
def served(probe_models, tmp_path_factory):
    """`transformers serve` pinned to the merge `rio`, on a free local port; yields its /v1 URL and model id."""
    pytest.importorskip("transformers")
    import importlib.util

    assert importlib.util.find_spec("fastapi") and importlib.util.find_spec("uvicorn"), \
        "transformers serve needs its extras: pip install 'transformers[serving]' (part of modeltrace[test])"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = probe_models["models"]["rio"]["path"]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([*_transformers_cli(), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--log-level", "warning", model],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited {proc.returncode}: {log.read_text()[-1500:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start in 120 s: {log.read_text()[-1500:]}")
            time.sleep(0.25)
        yield {"url": f"{url}/v1", "model": model}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MT_PROBE_LIVE_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "modeltrace", "probe", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_identity_over_a_real_server_contains_the_truth(served, probe_models, tmp_path):
    report = tmp_path / "identity.json"  # --output: the same report as --json, in a file
    # The model is not named: the backend lists the server's models (exactly one) and uses it.
    # One request at a time: the server seeds torch per request, so the answers are reproducible.
    r = cli("identity", served["url"], "--questions", "8", "--max-tokens", "32", "--expect", "Rio",
            "--api-key-env", "MT_PROBE_LIVE_KEY", "--concurrency", "1", "--output", str(report))
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())["subjects"][0]["probes"][0]
    assert rep["model"]["backend"] == "endpoint" and rep["model"]["model"] == served["model"]
    assert rep["counts"]["answers"] == rep["counts"]["asked"] == 32 and rep["counts"]["errors"] == 0
    ids = sorted({a["question_id"] for a in rep["answers"]})
    got = {row["name"]: row for row in rep["names"]}
    # Five names checked at once on 32 answers: 99% intervals (Bonferroni) keep the joint check at 95%.
    for name in NAMES:
        lo, hi = truth_interval(probe_models["truth"]["rio"], name, ids)
        k = got[name]["mentions"] if name in got else 0
        _, a, b = wilson_modified(k, 32, level=0.99)
        assert a <= hi and lo <= b, f"{name}: truth [{lo:.3f}, {hi:.3f}], {k}/32 answers"
    assert got["Nex"]["share"] > 0.5
    for text in (r.stdout, r.stderr, report.read_text()):
        assert KEY not in text


def test_compare_recognises_the_served_checkpoint(served, probe_models):
    """Suspect behind the API, candidates on disk: the served weights are found among local checkpoints."""
    p = probe_models["models"]
    r = cli("compare", f"{served['url']}#{served['model']}", "-c", p["rio"]["path"], "-c", p["other"]["path"],
            "-r", p["ref1"]["path"], "-r", p["ref2"]["path"], "--prompts", "16", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["subjects"][0]["compare"]
    assert rep["metric"] == "greedy" and rep["suspect"]["logprobs"] is False
    by = {m["model"]: m for m in rep["models"]}
    assert by[p["rio"]["path"]]["exact_match"] == 1.0  # the same weights, greedy: the same answers
    assert rep["behaves_like"] == [p["rio"]["path"]]
    assert by[p["other"]["path"]]["p_adjusted"] > 0.05
