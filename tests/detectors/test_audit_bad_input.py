"""Awkward audits: other architectures, other vocabularies, NaN weights, duplicate candidates; and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from modeltrace.audit import run_audit
from modeltrace.errors import InputError
from modeltrace.verdict import decide


def _copy_with(corpus, name, dst, edit):
    src = corpus.path(name)
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        t = edit(t)
        save_file(t, str(f))
    return dst


def test_nan_weights_are_reported_and_do_not_break_the_verdict(corpus, tmp_path):
    def poison(t):
        k = "model.layers.1.mlp.up_proj.weight"
        a = t[k].astype(np.float32)
        a[0, :5] = np.nan
        a[1, 0] = np.inf
        t[k] = a.astype(ml_dtypes.bfloat16)
        return t

    s = _copy_with(corpus, "m_linear_rio", tmp_path / "nan", poison)
    v = decide(run_audit(str(s), [str(corpus.path("ft_a1")), str(corpus.path("ft_a2"))]))
    assert v["relation"] == "merge" and v["method"] == "linear"
    assert any("NaN/Inf" in w and "up_proj" in w for w in v["warnings"])
    assert corpus.path("m_linear_rio").joinpath("model.safetensors").exists()


def test_same_candidate_twice(corpus):
    a = str(corpus.path("ft_a1"))
    v = decide(run_audit(str(corpus.path("ft_a2")), [a, a + "/"], base=str(corpus.path("base_a"))))
    assert any("same model" in w for w in v["warnings"])
    assert v["relation"] == "finetune" and v["parents"][0]["model"] == "base_a"


def test_different_vocabulary_compares_shared_rows(corpus, tmp_path):
    def cut(t):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            t[k] = np.ascontiguousarray(t[k][:200])
        return t

    s = _copy_with(corpus, "m_linear_rio", tmp_path / "cut", cut)
    run = run_audit(str(s), [str(corpus.path("ft_a1")), str(corpus.path("ft_a2"))])
    v = decide(run)
    assert v["relation"] == "merge" and abs(v["parents"][0]["weight"] - 0.6) < 0.01
    notes = [r.note for r in run.slots if r.note]
    assert notes and "shared rows" in notes[0]


def test_other_architecture_is_a_clear_error(corpus):
    from modeltrace.demo import minilm_dir

    with pytest.raises(InputError, match=r"different architecture \(bert family; the suspect is llama\)"):
        run_audit(str(corpus.path("m_linear_rio")), [str(minilm_dir())])


def test_partly_different_shapes_compare_what_can_be_compared(corpus):
    # A dense llama against a qwen3-moe of the same hidden size: attention and embeddings compare, experts do not.
    v = decide(run_audit(str(corpus.path("moe_ft1")), [str(corpus.path("base_a"))]))
    # the experts have no counterpart in the dense model: said as such, not as a shape mismatch
    told = [w for w in v["warnings"] if w.startswith("base_a has no ")]
    assert told and "expert_up" in told[0] and "router" in told[0] and "not compared" in told[0], v["warnings"]
    assert not any("shape" in w for w in v["warnings"]), v["warnings"]
    assert v["relation"] == "independent"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "modeltrace", *args], capture_output=True, text=True, timeout=300)


def test_cli_audit_json_and_gate(corpus):
    r = _cli("audit", str(corpus.path("m_linear_rio")), "-c", str(corpus.path("ft_a1")), "-c",
             str(corpus.path("ft_a2")), "--json", "--fail-on-derived")
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)["subjects"][0]["audit"]  # --json is the report (docs/report.schema.json)
    for key in ("relation", "method", "parents", "base", "p_values", "layers"):
        assert key in d
    assert d["relation"] == "merge" and "merge_method: linear" in d["mergekit_yaml"]
    r = _cli("audit", str(corpus.path("indep_00")), "-c", str(corpus.path("indep_01")), "--fail-on-derived")
    assert r.returncode == 0, r.stderr
    assert "INDEPENDENT" in r.stdout


def test_cli_audit_verify_and_recipe_file(corpus, tmp_path):
    out = tmp_path / "recipe.yml"
    r = _cli("audit", str(corpus.path("m_slerp_t03")), "-c", str(corpus.path("ft_a2")), "--base",
             str(corpus.path("ft_a1")), "--verify", "--recipe", str(out), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["subjects"][0]["audit"]
    assert d["method"] == "slerp" and d["verify"]["replayed"] and d["verify"]["max_rel_error"] < 8e-3
    assert "merge_method: slerp" in out.read_text()


def test_cli_audit_missing_candidate_is_one_line(tmp_path, corpus):
    r = _cli("audit", str(corpus.path("m_linear_rio")), "-c", str(tmp_path / "nope"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
