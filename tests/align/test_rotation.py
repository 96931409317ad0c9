"""Norm gains folded into the neighbouring matrices, then the residual stream rotated by an orthogonal matrix: the
attack that breaks HuRef's invariants. The audit folds the candidate the same way and fits the rotation."""

from __future__ import annotations

import numpy as np
import pytest

from modeltrace.audit import run_audit
from modeltrace.verdict import decide
from tests import disguise as D


def _verdict(tmp_path, m, cands):
    return decide(run_audit(str(D.save(m, tmp_path / "s")), [str(c) for c in cands]))


def _undone(v):
    return " ".join(n for a in v.get("alignment", {}).values() for n in a["undone"])


def _merge_ok(v, a, b):
    w = {p["model"]: p["weight"] for p in v["parents"]}
    assert v["relation"] == "merge" and v["method"] == "linear", v["summary"]
    assert abs(w[a] - 0.6) < 0.02 and abs(w[b] - 0.4) < 0.02
    assert all(p["log10_p"] < -10 for p in v["p_values"].values())


def test_folded_gains(corpus, tmp_path):
    v = _verdict(tmp_path, D.fold_norms(D.load(corpus.path("m_linear_rio"))),
                 [corpus.path("ft_a1"), corpus.path("ft_a2")])
    _merge_ok(v, "ft_a1", "ft_a2")
    assert "norm gains folded" in _undone(v)


@pytest.mark.parametrize("name, cands", [("m_linear_rio", ("ft_a1", "ft_a2")),
                                         ("moe_linear", ("moe_ft1", "moe_ft2"))])
def test_folded_then_rotated(corpus, tmp_path, name, cands):
    m = D.rotate_residual(D.fold_norms(D.load(corpus.path(name))), np.random.default_rng(0))
    v = _verdict(tmp_path, m, [corpus.path(c) for c in cands])
    _merge_ok(v, *cands)
    assert "residual stream rotated" in _undone(v) and "permuted" not in _undone(v)


def test_rotated_permuted_quantized_finetune(corpus, tmp_path):
    rng = np.random.default_rng(1)
    m = D.permute_mlp(D.rotate_residual(D.fold_norms(D.load(corpus.path("ft_b1"))), rng), rng)
    g = D.write_gguf(m, tmp_path / "x.gguf", "Q8_0")
    v = decide(run_audit(str(g), [str(corpus.path("base_b"))]))
    assert v["relation"] == "related" and v["parents"][0]["model"] == "base_b"
    assert v["p_values"]["base_b"]["log10_p"] < -10


def test_rotation_is_not_found_between_unrelated_models(corpus, tmp_path):
    m = D.rotate_residual(D.fold_norms(D.load(corpus.path("indep_04"))), np.random.default_rng(2))
    v = _verdict(tmp_path, m, [corpus.path("base_a")])
    assert v["relation"] == "independent" and "rotated" not in _undone(v)


def test_fold_and_rotation_preserve_the_function(corpus):
    torch = pytest.importorskip("torch")
    import transformers as tf

    base = D.load(corpus.path("ft_a1"))
    disguised = D.rotate_residual(D.fold_norms(base), np.random.default_rng(0))

    def logits(m):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{k: v for k, v in m.config.items() if k != "architectures"}))
        model.float().eval().load_state_dict({k: torch.from_numpy(v) for k, v in m.tensors.items()}, strict=False)
        with torch.no_grad():
            return model(input_ids=torch.arange(32).reshape(2, 16)).logits.numpy()

    assert np.abs(logits(base) - logits(disguised)).max() < 1e-3
