"""`probe compare` on tiny models of known provenance: it must name the parent of a fine-tune, both parents of a
merge, and nothing for a model that is unrelated (own init, own training draws)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from modeltrace.probes.backends import open_backend
from modeltrace.probes.compare import greedy_similarity, overlap, run_compare
from modeltrace.stats import intersection_union, paired_greater


def compare(models: dict, suspect: str, candidates: list[str], refs=("ref1", "ref2"), *extra: str) -> dict:
    p = models["models"]
    args = ["probe", "compare", p[suspect]["path"]]
    for c in candidates:
        args += ["-c", p[c]["path"]]
    for r in refs:
        args += ["-r", p[r]["path"]]
    r = subprocess.run([sys.executable, "-m", "modeltrace", *args, "--prompts", "32", "--json", *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["command"] == "probe compare"
    rep = doc["subjects"][0]["compare"]
    rep["findings"] = doc["findings"]
    rep["by_name"] = {next(k for k, v in p.items() if v["path"] == m["model"]): m for m in rep["models"]}
    return rep


def test_names_the_parent_of_a_finetune(probe_models):
    rep = compare(probe_models, "nex", ["base", "other"])
    by = rep["by_name"]
    assert rep["metric"] == "distribution"
    assert rep["behaves_like"] == [probe_models["models"]["base"]["path"]]
    assert by["base"]["p_adjusted"] < 1e-6 and by["base"]["related"]
    assert by["other"]["p_adjusted"] > 0.05 and not by["other"]["related"]
    assert rep["settings"]["random_prompts"] == 16 and rep["settings"]["entropy_prompts"] == 16
    assert len(rep["outputs"]) == 5 and all(len(v) == 32 for v in rep["outputs"].values())
    assert [f["code"] for f in rep["findings"]] == ["behaves-like"]


def in_process(models: dict, suspect: str, candidates: list[str], n_prompts: int = 32) -> dict:
    """The library call behind the command (no interpreter start-up per run)."""
    p = {k: v["path"] for k, v in models["models"].items()}
    rep = run_compare(p[suspect], [p[c] for c in candidates], [p["ref1"], p["ref2"]],
                      lambda spec: open_backend(spec, device="cpu"), n_prompts=n_prompts)
    rep["by_name"] = {next(k for k, v in p.items() if v == m["model"]): m for m in rep["models"]}
    return rep


def test_finds_nothing_for_an_unrelated_model(probe_models):
    rep = in_process(probe_models, "other", ["base", "nex"])
    assert rep["behaves_like"] == []
    assert all(m["p_adjusted"] > 0.05 for m in rep["models"] if m["role"] == "candidate")
    assert "No candidate" in rep["summary"]


def test_names_both_parents_of_a_merge(probe_models):
    rep = in_process(probe_models, "rio", ["nex", "qwen", "other"], n_prompts=24)
    by = rep["by_name"]
    assert by["nex"]["related"] and by["qwen"]["related"] and not by["other"]["related"]


def test_needs_a_baseline(probe_models):
    p = probe_models["models"]
    r = subprocess.run([sys.executable, "-m", "modeltrace", "probe", "compare", p["nex"]["path"], "-c",
                        p["base"]["path"]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("modeltrace: error:") and "--reference" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_similarity_measures():
    assert greedy_similarity("I am Nex.", "I am Nex.") == 1.0
    assert greedy_similarity("", "") == 1.0 and np.isnan(greedy_similarity(None, "x"))
    assert 0 < greedy_similarity("the cat sat", "the dog sat") < 1
    p = np.array([[0.5, 0.5, 0.0]])
    assert overlap(p, p) == 1.0 and overlap(p, np.array([[0.0, 0.0, 1.0]])) == 0.0
    assert paired_greater([0.9] * 10, [0.1] * 10) == 0.0 and paired_greater([0.5] * 5, [0.5] * 5) == 1.0
    rng = np.random.default_rng(0)
    null = [paired_greater(rng.normal(size=40), rng.normal(size=40)) for _ in range(400)]
    assert 0.02 < np.mean(np.array(null) < 0.05) < 0.09  # calibrated under the null
    assert intersection_union([0.001, 0.2]) == 0.2
