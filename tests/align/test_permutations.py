"""Permuted units, heads, experts and residual streams: the audit undoes them and recovers relation and recipe."""

from __future__ import annotations

import numpy as np
import pytest

from modeltrace.audit import run_audit
from modeltrace.verdict import decide
from tests import disguise as D


def _perm(kinds: str, seed: int = 0):
    def f(m: D.Model) -> D.Model:
        rng = np.random.default_rng(seed)
        for k in kinds.split("+"):
            m = {"mlp": lambda x: D.permute_mlp(x, rng), "heads": lambda x: D.permute_heads(x, rng),
                 "experts": lambda x: D.permute_experts(x, rng),
                 "residual": lambda x: D.permute_residual(x, rng)}[k](m)
        return m
    return f


def _audit(corpus, tmp_path, name, kinds, cands, base=None, seed=0):
    m = _perm(kinds, seed)(D.load(corpus.path(name)))
    p = D.save(m, tmp_path / f"{name}-{kinds}")
    run = run_audit(str(p), [str(corpus.path(c)) for c in cands], base=str(corpus.path(base)) if base else None)
    return run, decide(run)


def _weights(v):
    return {p["model"]: p["weight"] for p in v["parents"]}


@pytest.mark.parametrize("kinds, note", [
    ("mlp", "MLP units permuted in 4 of 4 layers"),
    ("heads", "attention heads permuted"),
    ("residual", "residual stream permuted"),
    ("mlp+heads+residual", "MLP units permuted in 4 of 4 layers"),
])
def test_permuted_linear_merge_recovers_recipe(corpus, tmp_path, kinds, note):
    run, v = _audit(corpus, tmp_path, "m_linear_rio", kinds, ["ft_a1", "ft_a2"], seed=len(kinds))
    assert v["relation"] == "merge" and v["method"] == "linear", v["summary"]
    w = _weights(v)
    assert abs(w["ft_a1"] - 0.6) < 0.02 and abs(w["ft_a2"] - 0.4) < 0.02
    assert all(p["log10_p"] < -10 for p in v["p_values"].values())
    assert note in v["summary"] and "Disguise undone" in v["summary"]
    if "residual" not in kinds:
        assert "residual" not in " ".join(v["alignment"]["ft_a1"]["undone"])


def test_merge_of_unrelated_parents_permuted(corpus, tmp_path):
    _, v = _audit(corpus, tmp_path, "m_linear_indep", "mlp+heads+residual", ["base_a", "base_b"])
    w = _weights(v)
    assert v["method"] == "linear" and abs(w["base_a"] - 0.6) < 0.02 and abs(w["base_b"] - 0.4) < 0.02


def test_task_arithmetic_with_base_permuted(corpus, tmp_path):
    _, v = _audit(corpus, tmp_path, "m_task_arith", "mlp+heads+residual", ["ft_a1", "ft_a2"], base="base_a")
    w = _weights(v)
    assert v["method"] == "task_arithmetic", v["summary"]
    assert abs(w["ft_a1"] - 0.7) < 0.02 and abs(w["ft_a2"] - 0.5) < 0.02


def test_permuted_finetune_names_its_parent(corpus, tmp_path):
    _, v = _audit(corpus, tmp_path, "ft_a1", "mlp+heads+residual", ["base_a"])
    assert v["relation"] == "related" and v["parents"][0]["model"] == "base_a"
    assert v["p_values"]["base_a"]["log10_p"] < -10


def test_pure_permutation_is_a_copy_after_alignment(corpus, tmp_path):
    """Permuting is lossless: once undone, every value matches exactly."""
    _, v = _audit(corpus, tmp_path, "ft_a1", "mlp+heads+residual", ["ft_a1"])
    assert v["relation"] == "copy", v["summary"]


@pytest.mark.parametrize("name, cands", [("moe_linear", ["moe_ft1", "moe_ft2"]),
                                         ("mix_linear", ["mix_ft1", "mix_ft2"])])
def test_permuted_moe_merge(corpus, tmp_path, name, cands):
    """Experts (with router rows), each expert's units, heads and the residual stream, fused expert layout."""
    _, v = _audit(corpus, tmp_path, name, "mlp+heads+experts+residual", cands, seed=3)
    assert v["relation"] == "merge" and v["method"] == "linear", v["summary"]
    w = _weights(v)
    assert abs(w[cands[0]] - 0.6) < 0.02 and abs(w[cands[1]] - 0.4) < 0.02
    assert "experts permuted in 2 of 2 layers" in v["summary"]
    assert all(p["log10_p"] < -10 for p in v["p_values"].values())


def test_permuted_moe_finetune_per_expert_layout(corpus, tmp_path):
    _, v = _audit(corpus, tmp_path, "mix_ft1", "experts+mlp", ["mix_base"], seed=5)
    assert v["relation"] == "related" and v["parents"][0]["model"] == "mix_base"


@pytest.mark.parametrize("name, parent", [("moe_ft1", "moe_base"), ("mix_ft1", "mix_base")])
def test_experts_permuted_with_expert_zero_in_place(corpus, tmp_path, name, parent):
    """The layer map samples expert 0 only; sampled router rows catch the rest moving."""
    m = D.permute_experts(D.load(corpus.path(name)), np.random.default_rng(0), order=[0, 2, 3, 1])
    run = run_audit(str(D.save(m, tmp_path / "s")), [str(corpus.path(parent))])
    v = decide(run)
    assert v["relation"] == "related" and "experts permuted in 2 of 2 layers" in v["summary"]
    assert all(r.fit.method == "finetune" for r in run.slots if r.slot.role.startswith("expert_"))


def test_undisguised_audit_does_not_align(corpus):
    """Alignment costs nothing when the stored order already correlates."""
    run = run_audit(str(corpus.path("m_linear_rio")), [str(corpus.path("ft_a1")), str(corpus.path("ft_a2"))])
    assert run.alignments == [None, None]
    assert "alignment" not in decide(run)


def test_disguises_preserve_the_function(corpus):
    """The test disguises are real evasions: same logits (transformers forward, float32)."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    base = D.load(corpus.path("moe_linear"))
    rng = np.random.default_rng(0)
    disguised = D.permute_residual(D.permute_experts(D.permute_heads(D.permute_mlp(base, rng), rng), rng), rng)

    def logits(m):
        cfg = tf.Qwen3MoeConfig(**{k: v for k, v in m.config.items() if k not in ("architectures",)})
        model = tf.Qwen3MoeForCausalLM(cfg).float().eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in m.tensors.items()}, strict=False)
        x = torch.arange(32).reshape(2, 16)
        with torch.no_grad():
            return model(input_ids=x).logits.numpy()

    assert not np.allclose(disguised.tensors["model.embed_tokens.weight"], base.tensors["model.embed_tokens.weight"])
    assert np.abs(logits(base) - logits(disguised)).max() < 1e-4
