"""The fused kernel computes the same statistics as the numpy accumulator, and the audit's verdicts do not depend on
which path ran."""

from __future__ import annotations

import numpy as np
import pytest

from modeltrace.audit import run_audit
from modeltrace.detectors import kernels
from modeltrace.detectors.accumulate import SlotAccumulator
from modeltrace.errors import InputError
from modeltrace.sources.base import ReadStats
from modeltrace.sources.bytestore import LocalStore
from modeltrace.verdict import decide
from tests.audit_eval import audit_case


def _models(m: int, rows: int, cols: int, dtype: str, seed: int = 0) -> list[np.ndarray]:
    """m float32 matrices exactly representable in `dtype`; candidates share ~30% of the suspect's values."""
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(m)]
    for x in out[1:]:
        same = rng.random((rows, cols)) < 0.3
        x[same] = out[0][same]
    if dtype == "BF16":
        out = [((x.view(np.uint32) >> 16) << 16).view(np.float32) for x in out]
    return out


def _raw(x: np.ndarray, dtype: str) -> np.ndarray:
    bits = x.view(np.uint32)
    return ((bits >> 16).astype("<u2") if dtype == "BF16" else bits.astype("<u4")).view(np.uint8).ravel()


def _both(models: list[np.ndarray], dtype: str, base: int | None, total_rows: int, step: int):
    num = SlotAccumulator(len(models), models[0].shape[1], base, dtype, total_rows=total_rows)
    ker = SlotAccumulator(len(models), models[0].shape[1], base, dtype, total_rows=total_rows)
    for a in range(0, models[0].shape[0], step):
        chunk = [x[a:a + step].copy() for x in models]
        num.update([c.copy() for c in chunk])
        ker.update_raw(tuple(_raw(c, dtype) for c in chunk), dtype, chunk[0].shape[0])
    return num.finish(), ker.finish()


def test_kernel_is_available():
    assert kernels.available(), "numba is a dependency: the audit's fast path must be compiled"


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
@pytest.mark.parametrize("m", [2, 3, 4, 5])
@pytest.mark.parametrize("total_rows", [150, 40_000])  # every row in detail, or 1/8 of each chunk's rows
def test_kernel_statistics_equal_numpy(dtype, m, total_rows):
    models = _models(m, 150, 1500, dtype, seed=m)  # 1500 columns: rows span partial kernel blocks
    base = m - 1 if m >= 3 else None
    a, b = _both(models, dtype, base, total_rows, step=64)
    assert a.rows == b.rows and a.dof == b.dof and a.detail_numel == b.detail_numel
    np.testing.assert_array_equal(a.equal, b.equal)
    assert (a.equal[1:] > 0.25 * a.numel).all()
    x = np.stack([v.ravel() for v in models]).astype(np.float64)
    exact = x @ x.T
    top = np.abs(exact).max()
    assert np.abs(b.G - exact).max() < 1e-7 * top  # float32 blocks of 1024 added in float64
    assert np.abs(a.G - exact).max() < 1e-5 * top  # the numpy path's float32 BLAS dots are coarser
    np.testing.assert_allclose(b.Gd, a.Gd, rtol=5e-6)
    scale = np.sqrt(np.outer(np.diag(a.Gc), np.diag(a.Gc)))
    np.testing.assert_allclose(b.Gc / scale, a.Gc / scale, atol=5e-6)
    assert b.noise_floor == pytest.approx(a.noise_floor, rel=1e-9)
    if base is not None:
        assert b.zero_delta == a.zero_delta and b.active_all == a.active_all
        np.testing.assert_allclose(b.G_agree, a.G_agree, rtol=1e-9)
        np.testing.assert_array_equal(b.hist_kept, a.hist_kept)


def test_kernel_chunk_with_nan_falls_back_to_the_counting_path():
    models = _models(3, 40, 300, "BF16")
    models[1][3, 7] = np.nan
    models[2][5, 9] = np.inf
    a, b = _both(models, "BF16", None, 40, step=40)
    np.testing.assert_array_equal(b.nonfinite, a.nonfinite)
    assert list(b.nonfinite) == [0, 1, 1]
    np.testing.assert_allclose(b.G, a.G, rtol=5e-6)
    assert np.isfinite(b.G).all()


def test_mapped_window_refuses_a_short_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(bytes(range(256)) * 40)
    store = LocalStore(tmp_path, ReadStats())
    with store.mapped("x.bin", 5000, 100) as mv:
        assert bytes(mv) == (bytes(range(256)) * 40)[5000:5100]
    assert store.stats.bytes_read == 100
    with pytest.raises(InputError, match="truncated"), store.mapped("x.bin", 10_000, 500):
        pass
    store.close()
    assert f.read_bytes() == bytes(range(256)) * 40


@pytest.mark.parametrize("name", ["m_linear_rio", "m_ties_d05", "ft_a1", "moe_linear"])
def test_audit_verdict_does_not_depend_on_the_path(corpus, name, monkeypatch):
    calls = []
    real = kernels.chunk_stats

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "chunk_stats", counting)
    fast, _, _ = audit_case(corpus, name)
    assert calls, "the corpus is local bf16/f32 safetensors: the kernel path should have run"
    monkeypatch.setenv("MODELTRACE_KERNEL", "numpy")
    n = len(calls)
    slow, _, _ = audit_case(corpus, name)
    assert len(calls) == n
    assert (fast["relation"], fast["method"]) == (slow["relation"], slow["method"])
    for p, q in zip(fast["parents"], slow["parents"], strict=True):
        assert p["model"] == q["model"] and abs(p["weight"] - q["weight"]) < 1e-3
    for c, pv in slow["p_values"].items():
        assert fast["p_values"][c]["log10_p"] == pytest.approx(pv["log10_p"], rel=0.05, abs=0.5)


def test_independent_pair_stays_negative_on_the_kernel_path(corpus):
    v = decide(run_audit(str(corpus.path("base_a")), [str(corpus.path("base_b"))]))
    assert v["relation"] == "independent"
