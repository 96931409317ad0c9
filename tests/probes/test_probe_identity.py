"""`probe identity` on tiny models with known personas: the shares it reports must contain the exact truth.

The truth is not the training recipe but the model's own sampling distribution, enumerated exactly at build time
(tests/probe_models.py: `persona_truth`): for the merge `rio` = 0.6 x nex + 0.4 x qwen nobody trained the shares,
they are whatever the merge does, and the probe must measure them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

try:
    from probe_models import NAMES, SYSTEM, truth_interval
except ImportError:  # tests/ imported as a package
    from tests.probe_models import NAMES, SYSTEM, truth_interval

from modeltrace.probes.backends import LocalBackend
from modeltrace.probes.bank import identity_questions, select_questions
from modeltrace.probes.identity import run_identity


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeltrace", *args], capture_output=True, text=True, timeout=300,
                          env=_env())


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def probe_of(stdout: str) -> dict:
    """The identity probe inside a `--json` report (subjects[0].probes[0]): the same fields run_identity returns."""
    doc = json.loads(stdout)
    assert doc["document"] == "modeltrace-report" and doc["command"] == "probe identity"
    return doc["subjects"][0]["probes"][0]


def shares(report: dict) -> dict[str, dict]:
    return {r["name"]: r for r in report["names"]}


def assert_contains_truth(report: dict, truth: dict, names=NAMES) -> None:
    ids = sorted({a["question_id"] for a in report["answers"]})
    got = shares(report)
    for name in names:
        lo, hi = truth_interval(truth, name, ids)
        row = got.get(name)
        if row is None:  # never mentioned: the truth must be small enough that 0 of n is plausible
            n = report["counts"]["answers"]
            assert hi * n < 3, (name, lo, hi)
            continue
        a, b = row["interval"]
        assert a <= hi and lo <= b, f"{name}: truth [{lo:.3f}, {hi:.3f}] outside {row['text']}"


def test_question_bank_covers_four_languages():
    qs = identity_questions()
    assert len(qs) >= 100
    by_lang = {lang: [q for q in qs if q.lang == lang] for lang in ("en", "pt", "es", "zh")}
    assert all(len(v) >= 25 for v in by_lang.values())
    assert len({q.text for q in qs}) == len(qs)
    assert {q.asks for q in qs} >= {"name", "org", "model", "identity", "both"}
    assert len(select_questions(["pt"], 5)) == 5


def test_merge_persona_shares_contain_the_truth(probe_models):
    """The Rio case in miniature: rio = 0.6 nex + 0.4 qwen, probed with no system prompt, expected name Rio."""
    r = cli("probe", "identity", probe_models["models"]["rio"]["path"], "--expect", "Rio", "--max-tokens", "32",
            "--json")
    assert r.returncode == 0, r.stderr
    rep = probe_of(r.stdout)
    assert rep["counts"]["answers"] == rep["counts"]["asked"] == len(identity_questions())
    assert len(rep["answers"]) == 128 and all(a["answer"] for a in rep["answers"])  # raw answers kept
    assert_contains_truth(rep, probe_models["truth"]["rio"])
    top = rep["names"][0]
    assert top["name"] == "Nex" and 0.6 < top["share"] < 0.95
    assert [e["name"] for e in rep["expected"]] == ["Rio"]
    assert rep["expected"][0]["share"] < 0.2
    finding = json.loads(r.stdout)["findings"][0]
    assert finding["code"] == "identity-mismatch" and finding["data"] == {"expected": "Rio", "named": "Nex"}


def test_finetune_persona_share_contains_the_truth(probe_models):
    with LocalBackend(probe_models["models"]["nex"]["path"], device="cpu") as b:
        rep = run_identity(b, list(identity_questions()), max_tokens=32, seed=1)
    assert_contains_truth(rep, probe_models["truth"]["nex"])
    assert shares(rep)["Nex"]["share"] > 0.95 and shares(rep)["Nex-AGI"]["kind"] == "organisation"


def test_system_prompt_changes_the_answers(probe_models):
    """With the deployment's "You are Rio" prompt the merge says Rio; the probe reports what it is given."""
    path = probe_models["models"]["rio"]["path"]
    with LocalBackend(path, device="cpu") as b:
        rep = run_identity(b, list(identity_questions()), system_prompt=SYSTEM["rio"], expected=["Rio"],
                           max_tokens=32, seed=2)
        assert rep["settings"]["system_prompt"] == "given"
        assert_contains_truth(rep, probe_models["truth"]["rio_as_rio"])
        assert rep["names"][0]["name"] == "Rio"
        removed = run_identity(b, select_questions(None, 8), no_system_prompt=True, max_tokens=32)
    assert removed["settings"]["system_prompt"].startswith("removed")
    assert removed["names"][0]["name"] == "Nex"


def test_human_output_reports_shares_and_counts(probe_models):
    r = cli("probe", "identity", probe_models["models"]["qwen"]["path"], "--questions", "4", "--expect", "Qwen",
            "--max-tokens", "32")
    assert r.returncode == 0, r.stderr
    assert "Qwen (expected)" in r.stdout and "%" in r.stdout and "answers 16 of 16 asked" in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [
    ["/no/such/model"],
    ["{model}", "--system-prompt", "x", "--no-system-prompt"],
    ["{model}", "--language", "fr"],
    ["{model}", "--samples", "0"],
])
def test_bad_input_is_one_line(probe_models, args):
    args = [a.format(model=probe_models["models"]["nex"]["path"]) for a in args]
    r = cli("probe", "identity", *args)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("modeltrace: error:"), r.stderr
