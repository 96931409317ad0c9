"""Disguises that change the numbers a little: dtype casts, GGUF quantization round trips, additive noise, and
combinations with permutations. The recipe survives where the disguise preserves it."""

from __future__ import annotations

import numpy as np
import pytest

from modeltrace.audit import run_audit
from modeltrace.verdict import decide
from tests import disguise as D


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return D.wide_family(tmp_path_factory.mktemp("wide"))


def _verdict(suspect, cands):
    return decide(run_audit(str(suspect), [str(c) for c in cands]))


def _check_merge(v, a, b, wa=0.6, wb=0.4):
    assert v["relation"] == "merge" and v["method"] == "linear", v["summary"]
    w = {p["model"]: p["weight"] for p in v["parents"]}
    assert abs(w[a] - wa) < 0.02 and abs(w[b] - wb) < 0.02, w
    assert all(p["log10_p"] < -10 for p in v["p_values"].values())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q4_K", "IQ4_XS", "Q4_0"])
def test_gguf_quantized_merge(wide, tmp_path, qtype):
    g = D.write_gguf(D.load(wide["wide_merge"]), tmp_path / f"merge-{qtype}.gguf", qtype)
    v = _verdict(g, [wide["wide_ft1"], wide["wide_ft2"]])
    _check_merge(v, "wide_ft1", "wide_ft2")
    # the grid cells of the quantized values, not least squares, give the weights: the intervals hold the truth
    # (least squares on 4-bit grids reads 0.593 with an interval that excludes 0.6)
    iv = {p["model"]: p["interval"] for p in v["parents"]}
    assert iv["wide_ft1"][0] <= 0.6 <= iv["wide_ft1"][1] and iv["wide_ft2"][0] <= 0.4 <= iv["wide_ft2"][1], iv
    assert iv["wide_ft1"][1] - iv["wide_ft1"][0] < 0.03, iv  # and say something


@pytest.mark.parametrize("dtype", ["F16", "F8_E4M3"])
def test_dtype_cast_merge(wide, corpus, tmp_path, dtype):
    v = _verdict(D.save(D.load(wide["wide_merge"]), tmp_path / "w", dtype), [wide["wide_ft1"], wide["wide_ft2"]])
    _check_merge(v, "wide_ft1", "wide_ft2")
    v = _verdict(D.save(D.load(corpus.path("m_linear_rio")), tmp_path / "r", dtype),
                 [corpus.path("ft_a1"), corpus.path("ft_a2")])
    _check_merge(v, "ft_a1", "ft_a2")


@pytest.mark.parametrize("rel", [0.01, 0.05, 0.2])
def test_additive_noise(corpus, tmp_path, rel):
    m = D.add_noise(D.load(corpus.path("m_linear_rio")), np.random.default_rng(int(rel * 1000)), rel)
    v = _verdict(D.save(m, tmp_path / "n"), [corpus.path("ft_a1"), corpus.path("ft_a2")])
    # a merge involves no training: with noise on top it is related to both parents, the recipe as a hint
    assert v["relation"] == "related" and "residual above storage rounding" in v["summary"], v["summary"]
    hint = {p["model"]: p["weight"] for p in v["recipe_hint"]}
    assert abs(hint["ft_a1"] - 0.6) < 0.03 and abs(hint["ft_a2"] - 0.4) < 0.03, hint


def test_merge_then_permuted_then_quantized(wide, corpus, tmp_path):
    rng = np.random.default_rng(11)
    m = D.load(wide["wide_merge"])
    m = D.permute_residual(D.permute_heads(D.permute_mlp(m, rng), rng), rng)
    v = _verdict(D.write_gguf(m, tmp_path / "pq.gguf", "Q4_K"), [wide["wide_ft1"], wide["wide_ft2"]])
    _check_merge(v, "wide_ft1", "wide_ft2")
    assert "MLP units permuted in 2 of 2 layers" in v["summary"] and "residual stream permuted" in v["summary"]
    r = D.load(corpus.path("m_linear_rio"))
    r = D.permute_residual(D.permute_mlp(r, rng), rng)
    v = _verdict(D.write_gguf(r, tmp_path / "rq.gguf", "Q8_0"), [corpus.path("ft_a1"), corpus.path("ft_a2")])
    _check_merge(v, "ft_a1", "ft_a2")


def test_quantized_finetune_names_parent(corpus, tmp_path):
    v = _verdict(D.write_gguf(D.load(corpus.path("ft_b1")), tmp_path / "f.gguf", "Q8_0"), [corpus.path("base_b")])
    assert v["relation"] == "related" and v["parents"][0]["model"] == "base_b"


def test_quantized_candidates_are_flagged(wide, tmp_path):
    """4-bit parents: the relation holds, but their noise attenuates the weights; the verdict says so."""
    q = [D.write_gguf(D.load(wide[n]), tmp_path / f"{n}.gguf", "Q4_K") for n in ("wide_ft1", "wide_ft2")]
    v = _verdict(wide["wide_merge"], q)
    assert v["relation"] == "merge"
    assert any("stored quantized" in w for w in v["warnings"])


def test_independent_model_quantized_stays_independent(wide, tmp_path):
    v = _verdict(D.write_gguf(D.load(wide["wide_other"]), tmp_path / "o.gguf", "Q4_K"), [wide["wide_base"]])
    assert v["relation"] == "independent"


def test_quantized_merge_from_fingerprints_gives_no_biased_interval(wide, tmp_path):
    """Fingerprint samples keep a subset of columns, so a GGUF suspect's grid cells are unknown there: identify's
    recipe for a 4-bit copy is least squares, and says so instead of giving an interval that misses the truth."""
    from modeltrace.fingerprint import make_fingerprint
    from modeltrace.fingerprint_audit import audit_fingerprints

    g = D.write_gguf(D.load(wide["wide_merge"]), tmp_path / "merge.gguf", "IQ4_XS")
    fps = [make_fingerprint(str(p)) for p in (g, wide["wide_ft1"], wide["wide_ft2"])]
    v = audit_fingerprints(fps[0], "merge", fps[1:], ["wide_ft1", "wide_ft2"], None)
    assert v["relation"] == "merge" and v["encoding"] == {"suspect": "IQ4_XS"}, v["summary"]
    assert all(p["interval"] is None for p in v["parents"]) and "no interval" in v["summary"]
    assert {p["model"]: abs(p["weight"] - w) < 0.03 for p, w in zip(v["parents"], (0.6, 0.4), strict=True)} \
        == {"wide_ft1": True, "wide_ft2": True}
