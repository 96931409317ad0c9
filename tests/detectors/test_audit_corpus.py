"""The audit on merges made by mergekit with known recipes, fine-tunes trained on CPU, and independent models."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from tests.audit_eval import audit_case, derived_names, independence_p, independent_pairs, score

DERIVED = [
    "ft_a1", "ft_a2", "ft_b1", "m_linear_rio", "m_linear_indep", "m_linear_unnorm", "m_linear_grad",
    "m_linear_cross", "m_slerp_t03", "m_slerp_grad", "m_slerp_indep", "m_task_arith", "m_ties_d05", "m_ties_d03",
    "m_dare_linear", "m_dare_ties", "m_breadcrumbs", "m_della", "m_model_stock", "s_stack_2x2", "s_stack_deep",
    "moe_ft1", "moe_ft2", "moe_linear", "moe_ties", "mix_ft1", "mix_ft2", "mix_linear",
]


def test_corpus_covers_every_case(corpus):
    assert set(DERIVED) <= set(derived_names(corpus))


@pytest.mark.parametrize("name", DERIVED)
def test_recovers_relation_method_and_recipe(corpus, name):
    case = score(corpus, name)
    assert case.ok, f"{name}: {case.errors}; summary: {case.verdict.get('summary')}"


def test_rio_recipe_summary_and_p_values(corpus):
    v, cands, _ = audit_case(corpus, "m_linear_rio")
    assert v["relation"] == "merge" and v["method"] == "linear"
    w = {p["model"]: p for p in v["parents"]}
    assert abs(w["ft_a1"]["weight"] - 0.6) < 0.01 and abs(w["ft_a2"]["weight"] - 0.4) < 0.01
    lo, hi = w["ft_a1"]["interval"]
    assert lo <= 0.6 <= hi or abs(lo - 0.6) < 1e-3
    assert all(v["p_values"][c]["log10_p"] < -100 for c in cands)
    assert "0.60·ft_a1 + 0.40·ft_a2" in v["summary"]
    assert len([e for e in v["layers"] if e["layer"] >= 0]) == 4


def test_independent_pairs_are_negative_and_p_values_uniform(corpus):
    pairs = independent_pairs(corpus)
    assert len(pairs) >= 50
    ps, relations = zip(*(independence_p(corpus, a, b) for a, b in pairs), strict=True)
    ps = np.array(ps)
    assert min(ps) > 1e-6, f"false positive: p = {min(ps):.3g}"
    assert set(relations) == {"independent"}
    # Calibration: p-values of independent pairs are roughly uniform.
    assert sps.kstest(ps, "uniform").pvalue > 1e-3
    assert 0.03 < np.mean(ps < 0.1) < 0.3


def test_sample_gives_same_verdict_at_a_fraction_of_the_bytes(corpus):
    full, _, _ = audit_case(corpus, "m_linear_rio")
    part, _, _ = audit_case(corpus, "m_linear_rio", sample=0.01)
    assert part["relation"] == full["relation"] and part["method"] == full["method"]
    for a, b in zip(full["parents"], part["parents"], strict=True):
        assert a["model"] == b["model"] and abs(a["weight"] - b["weight"]) < 0.01
    assert part["bytes_read"] < 0.2 * full["bytes_read"]


def test_verify_replays_linear_and_slerp_to_storage_precision(corpus):
    from modeltrace.recipe import replay, to_mergekit

    for name in ("m_linear_rio", "m_slerp_t03", "m_task_arith"):
        v, _, _ = audit_case(corpus, name)
        cfg = to_mergekit(v, v["sources"])
        rep = replay(v, v["sources"], cfg)
        assert rep["replayed"], rep
        assert rep["max_rel_error"] < 8e-3, (name, rep)  # bf16 storage: ~2^-9 relative


def test_mergekit_yaml_names_method_and_parents(corpus):
    import yaml

    v, _, _ = audit_case(corpus, "m_linear_rio")
    from modeltrace.recipe import to_mergekit, to_yaml

    cfg = yaml.safe_load(to_yaml(to_mergekit(v, v["sources"])))
    assert cfg["merge_method"] == "linear"
    weights = {m["model"].rsplit("/", 1)[-1]: m["parameters"]["weight"] for m in cfg["models"]}
    assert weights == {"ft_a1": 0.6, "ft_a2": 0.4}


def test_partial_derivation(corpus, tmp_path):
    """Layers 0-1 and embeddings from ft_a1, layers 2-3 from an unrelated model: partly derived."""
    import json
    import shutil

    import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy for safetensors.numpy
    from safetensors.numpy import load_file, save_file

    from modeltrace.audit import run_audit
    from modeltrace.verdict import decide

    a = load_file(str(corpus.path("ft_a1") / "model.safetensors"))
    b = load_file(str(corpus.path("indep_03") / "model.safetensors"))
    mixed = {k: (b[k] if any(f"layers.{i}." in k for i in (2, 3)) else a[k]) for k in a}
    out = tmp_path / "partial"
    out.mkdir()
    save_file(mixed, str(out / "model.safetensors"))
    shutil.copy(corpus.path("ft_a1") / "config.json", out / "config.json")
    v = decide(run_audit(str(out), [str(corpus.path("ft_a1"))]))
    assert v["relation"] == "partial", v["summary"]
    assert v["derived_layers"][:3] == [-1, 0, 1] or v["derived_layers"][:2] == [0, 1]
    assert 2 not in v["derived_layers"] and 3 not in v["derived_layers"]
    assert json.dumps(v)
