"""Fingerprints: coordinates fixed by role and shape, merges linear in the sample, bounded size and reads (local,
397B-class synthetic, remote over HTTP Range), a calibrated independence test, and a strict binary format."""

from __future__ import annotations

import itertools
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from scipy import stats as sps

from benchmarks.synth import HeaderOnlySource, moe_tensors
from modeltrace.architectures import Slot
from modeltrace.errors import InputError
from modeltrace.fingerprint import Fingerprint, make_fingerprint
from modeltrace.fingerprint.compare import compare
from modeltrace.fingerprint.sampling import column_order, plan, row_block
from modeltrace.sources import open_source

BF16_U = 2.0**-8


@pytest.fixture(scope="module")
def fps(corpus) -> dict[str, Fingerprint]:
    return {n: make_fingerprint(str(corpus.path(n))) for n in corpus.names()}


def test_deterministic_and_round_trips(corpus, fps):
    again = make_fingerprint(str(corpus.path("m_linear_rio")))
    fp = fps["m_linear_rio"]
    assert again.content_hash == fp.content_hash
    back = Fingerprint.from_bytes(fp.to_bytes())
    assert back.content_hash == fp.content_hash and back.model == fp.model
    assert list(back.slots) == list(fp.slots)
    for k, s in fp.slots.items():
        assert np.array_equal(back.slots[k].values, s.values)  # float16 with a power-of-two scale: bf16 exactly
        assert (back.slots[k].row0, back.slots[k].rows, back.slots[k].cols) == (s.row0, s.rows, s.cols)
    assert np.array_equal(back.sketch(), fp.sketch())


def test_samples_are_the_planned_coordinates(corpus, fps):
    """Same shape, same coordinates in every model: a contiguous row block and a fixed column permutation."""
    src = open_source(corpus.path("ft_a2"))
    name = "model.layers.1.mlp.down_proj.weight"
    full = src.read_rows(name)
    s = fps["ft_a2"].slots[Slot("mlp_down", 1)]
    r0, nr = row_block(*full.shape)
    assert (s.row0, s.values.shape[0]) == (r0, nr)
    cols = column_order(*full.shape)[: s.values.shape[1]]
    np.testing.assert_array_equal(s.values, full[r0:r0 + nr][:, cols])
    for other in ("base_a", "indep_03", "m_ties_d05"):
        o = fps[other].slots[Slot("mlp_down", 1)]
        assert (o.row0, o.values.shape) == (s.row0, s.values.shape)


def test_a_merge_of_models_is_the_merge_of_their_fingerprints(fps):
    rio, a1, a2 = fps["m_linear_rio"], fps["ft_a1"], fps["ft_a2"]
    for k, s in rio.slots.items():
        want = 0.6 * a1.slots[k].values.astype(np.float64) + 0.4 * a2.slots[k].values
        err = np.abs(s.values - want)
        assert np.all(err <= BF16_U * np.abs(want) * 1.01 + 1e-7), k.key  # one bf16 rounding (as test_corpus)


def test_moe_fused_and_per_expert_layouts_sample_alike(fps):
    # mergekit writes moe_linear with fused experts, save_pretrained wrote moe_ft1 per expert
    lin, ft1, ft2 = fps["moe_linear"], fps["moe_ft1"], fps["moe_ft2"]
    experts = [k for k in lin.slots if k.role.startswith("expert_")]
    assert experts and all(k in ft1.slots for k in experts)
    for k in experts:
        want = 0.6 * ft1.slots[k].values.astype(np.float64) + 0.4 * ft2.slots[k].values
        assert np.allclose(lin.slots[k].values, want, rtol=BF16_U * 1.01, atol=1e-7)


def test_397b_class_moe_fingerprint_is_small_and_reads_little():
    tensors, cfg = moe_tensors()
    total = sum(t.nbytes for t in tensors.values())
    fp = make_fingerprint(HeaderOnlySource(tensors, cfg), "moe-397b")
    assert sum(t.numel for t in tensors.values()) > 390e9
    assert fp.nbytes <= 16 * 2**20
    assert fp.bytes_read <= 0.005 * total
    r = fp.robust
    assert r is not None and len(r.ids) >= 32 and r.products
    # one ranged read per sampled tensor, plus the robust section's: a row per kept token of each vocabulary
    # matrix, and one read per norm gain vector
    assert fp.requests == len(fp.slots) + len(r.ids) * len(r.rows) + len(r.gains)
    experts = {k.expert for k in fp.slots if k.role == "expert_gate" and k.layer == 7}
    assert len(experts) == 8  # a fixed subset of the 512 routed experts per layer
    # ... the same subset in every model with that many experts
    fp2 = make_fingerprint(HeaderOnlySource(tensors, cfg, seed=1), "other")
    assert set(fp2.slots) == set(fp.slots)


def test_shrunk_fingerprints_still_compare(monkeypatch):
    """A model too large for the budget keeps a prefix of the columns; comparisons use the shared prefix."""
    from modeltrace.fingerprint import core

    tensors, cfg = moe_tensors(layers=4, experts=16, hidden=512, moe_inter=256, vocab=4096, shards=2)
    full = make_fingerprint(HeaderOnlySource(tensors, cfg), "full")
    samples = full.nbytes - full.robust.nbytes
    monkeypatch.setattr(core, "plan", lambda parts, dtypes: plan(parts, dtypes, budget=samples // 3))
    shrunk = make_fingerprint(HeaderOnlySource(tensors, cfg), "shrunk")
    # the samples shrink; the disguise-robust section has its own fixed budget (robust.py)
    assert shrunk.nbytes - shrunk.robust.nbytes < samples // 2
    assert max(s.values.shape[1] for s in shrunk.slots.values() if s.cols > 1) < 256
    ev = compare(full, shrunk)
    assert ev.corr > 0.999 and ev.log10_p < -100
    for k, s in shrunk.slots.items():
        assert np.array_equal(s.values, full.slots[k].values[:, : s.values.shape[1]])


def test_independence_p_values_are_calibrated(corpus, fps):
    roots = [n for n in corpus.names() if corpus[n]["kind"] in ("base", "independent")
             and corpus[n]["family"] == "dense"]
    pairs = list(itertools.combinations(roots, 2))
    assert len(pairs) >= 50
    ev = [compare(fps[a], fps[b]) for a, b in pairs]
    same = sps.norm.sf([e.z_same_layer for e in ev])
    best = sps.norm.sf([e.z_best_layer for e in ev])
    assert sps.kstest(same, "uniform").pvalue > 1e-3  # the same-layer statistic is exactly calibrated
    assert sps.kstest(best, "uniform").pvalue > 1e-3  # and so is the best-layer one (Šidák per layer)
    ps = np.array([10 ** e.log10_p for e in ev])
    assert ps.min() > 1e-6 and np.mean(ps < 0.05) < 0.15  # their Bonferroni combination is valid
    related = compare(fps["ft_a1"], fps["base_a"])
    assert related.log10_p < -300 and related.corr > 0.95


def test_summary_vectors_separate_relatives_from_strangers(corpus, fps):
    s = fps["m_linear_rio"].sketch()
    assert float(s @ fps["ft_a1"].sketch()) > 0.9
    strangers = [float(s @ fps[n].sketch()) for n in corpus.names("independent")]
    assert max(abs(x) for x in strangers) < 0.15


def test_stack_layers_are_found_where_they_moved(fps):
    ev = compare(fps["s_stack_deep"], fps["base_b"])
    assert ev.layer_map == {3: 1, 4: 2, 5: 3}
    assert ev.z_best_layer > ev.z_same_layer


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + struct.pack("<I", 99) + b[8:], "newer"),
    (lambda b: b[:-10], "corrupt"),
    (lambda b: b + b"\0" * 3, "corrupt"),
    (lambda b: b[:12] + b"[" + b[13:], "corrupt"),
])
def test_damaged_fingerprints_are_refused_in_one_line(fps, mutate, message):
    blob = fps["ft_a1"].to_bytes()
    with pytest.raises(InputError) as exc:
        Fingerprint.from_bytes(mutate(blob), where="entry x")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_fp32_and_nonfinite_values_survive(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    w[:, 5] = np.nan
    save_file({"model.layers.0.self_attn.q_proj.weight": w,
               "model.layers.0.mlp.up_proj.weight": rng.standard_normal((128, 64)).astype(ml_dtypes.bfloat16)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    fp = make_fingerprint(str(tmp_path))
    back = Fingerprint.from_bytes(fp.to_bytes())
    q = back.slots[Slot("attn_q", 0)].values
    np.testing.assert_array_equal(q, fp.slots[Slot("attn_q", 0)].values)  # float32 kept as float32
    assert np.isnan(q).sum() == q.shape[0]  # one column of NaN, in every sampled row
