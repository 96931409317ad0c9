"""Structural disguises: layers reordered, dropped or duplicated; heads and units pruned (a smaller child of a
larger parent); vocabularies reordered, extended or truncated (by token string, or by matching embedding rows)."""

from __future__ import annotations

import numpy as np
import pytest

from modeltrace.audit import run_audit
from modeltrace.verdict import decide
from tests import disguise as D

TOKENS = [f"t{i}" for i in range(256)]


def _verdict(tmp_path, m, cands, label="s"):
    return decide(run_audit(str(D.save(m, tmp_path / label)), [str(c) for c in cands]))


def _undone(v):
    return " ".join(n for a in v.get("alignment", {}).values() for n in a["undone"])


@pytest.mark.parametrize("order, note", [
    ([1, 0, 3, 2], "layers re-mapped (suspect←candidate): 0←1, 1←0, 2←3, 3←2"),
    ([0, 1, 3], "(dropped): 2"),
    ([0, 1, 1, 2, 3], "(duplicated): 1"),
])
def test_layer_surgery_on_a_finetune(corpus, tmp_path, order, note):
    v = _verdict(tmp_path, D.relayer(D.load(corpus.path("ft_a1")), order), [corpus.path("base_a")])
    assert v["relation"] == "related" and v["parents"][0]["model"] == "base_a", v["summary"]
    assert v["p_values"]["base_a"]["log10_p"] < -10
    assert note in _undone(v)


def test_reordered_and_permuted_merge_keeps_its_recipe(corpus, tmp_path):
    rng = np.random.default_rng(0)
    m = D.relayer(D.load(corpus.path("m_linear_rio")), [2, 3, 0, 1])
    m = D.permute_residual(D.permute_mlp(m, rng), rng)
    v = _verdict(tmp_path, m, [corpus.path("ft_a1"), corpus.path("ft_a2")])
    w = {p["model"]: p["weight"] for p in v["parents"]}
    assert v["method"] == "linear" and abs(w["ft_a1"] - 0.6) < 0.02 and abs(w["ft_a2"] - 0.4) < 0.02
    assert "0←2, 1←3, 2←0, 3←1" in _undone(v)


def test_reordered_exact_copy_is_a_stack(corpus, tmp_path):
    v = _verdict(tmp_path, D.relayer(D.load(corpus.path("ft_a1")), [1, 0, 3, 2]), [corpus.path("ft_a1")])
    assert v["relation"] == "stack"
    assert [e["source_layer"] for e in v["layer_map"]] == [1, 0, 3, 2]


def test_pruned_mlp_child_of_a_larger_parent(corpus, tmp_path):
    rng = np.random.default_rng(1)
    m = D.permute_mlp(D.prune_mlp(D.load(corpus.path("m_linear_rio")), rng, 0.8), rng)
    v = _verdict(tmp_path, m, [corpus.path("ft_a1"), corpus.path("ft_a2")])
    w = {p["model"]: p["weight"] for p in v["parents"]}
    assert v["method"] == "linear" and abs(w["ft_a1"] - 0.6) < 0.02 and abs(w["ft_a2"] - 0.4) < 0.02
    assert "MLP units pruned (suspect keeps 141 of 176) in 4 layers" in _undone(v)
    assert "MLP units permuted in 4 of 4 layers" in _undone(v)


def test_pruned_heads(corpus, tmp_path):
    v = _verdict(tmp_path, D.prune_heads(D.load(corpus.path("ft_a1")), 1), [corpus.path("base_a")])
    assert v["relation"] == "related" and v["parents"][0]["model"] == "base_a"
    assert "attention heads pruned (suspect keeps 2 of 4) in 4 layers" in _undone(v)
    assert not any("another shape" in w or "not compared" in w for w in v["warnings"]), v["warnings"]


@pytest.fixture()
def tokenized(corpus, tmp_path):
    return {n: D.save(D.with_tokens(D.load(corpus.path(n)), TOKENS), tmp_path / n) for n in ("ft_a1", "ft_a2")}


@pytest.mark.parametrize("keep, extra", [(256, 0), (256, 40), (200, 0), (230, 20)])
def test_vocabulary_reordered_extended_truncated(corpus, tmp_path, tokenized, keep, extra):
    rng = np.random.default_rng(keep + extra)
    order = rng.permutation(256)[:keep]
    m = D.revocab(D.load(corpus.path("m_linear_rio")), order, extra, rng, tokens=TOKENS)
    run = run_audit(str(D.save(m, tmp_path / "s")), [str(tokenized["ft_a1"]), str(tokenized["ft_a2"])])
    v = decide(run)
    assert v["method"] == "linear", v["summary"]
    emb = next(r for r in run.slots if r.slot.role == "embed")
    assert emb.rows_compared == keep and emb.fit.method == "linear"
    assert abs(emb.fit.weights[1] - 0.6) < 0.01
    assert f"vocabulary re-mapped by token string ({keep} of {keep + extra}" in _undone(v)


def test_vocabulary_reordered_without_tokenizers(corpus, tmp_path):
    order = np.random.default_rng(3).permutation(256)
    run = run_audit(str(D.save(D.revocab(D.load(corpus.path("ft_a1")), order), tmp_path / "s")),
                    [str(corpus.path("base_a"))])
    v = decide(run)
    assert v["relation"] == "related"
    assert "vocabulary rows re-ordered (matched by embedding)" in _undone(v)
    emb = next(r for r in run.slots if r.slot.role == "embed")
    assert emb.fit.method == "finetune" and emb.corr[1] > 0.9
