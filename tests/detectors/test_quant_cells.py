"""Cells of GGUF block-quantized values (detectors/quant_cells.py): every value's cell contains the value it was
quantized from, for every encoder the tests have (gguf-py's, and the plain K-quant and IQ4_XS encoders of
tests/disguise.py), and the cells are narrow enough to pin a merge weight down."""

from __future__ import annotations

import gguf
import gguf.quants as gq
import numpy as np
import pytest

from modeltrace.detectors import quant_cells
from tests import disguise as D

Q = gguf.GGMLQuantizationType
ENCODERS = {
    "Q8_0": lambda x: gq.quantize(x, Q.Q8_0), "Q4_0": lambda x: gq.quantize(x, Q.Q4_0),
    "Q4_1": lambda x: gq.quantize(x, Q.Q4_1), "Q5_0": lambda x: gq.quantize(x, Q.Q5_0),
    "Q5_1": lambda x: gq.quantize(x, Q.Q5_1), "Q6_K": D._q6_k, "Q4_K": D._q4_k, "IQ4_XS": D._iq4_xs,
}


def _round_trip(x: np.ndarray, qtype: str) -> np.ndarray:
    return gq.dequantize(ENCODERS[qtype](x), Q[qtype]).reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("qtype", sorted(ENCODERS))
def test_every_cell_holds_the_value_quantized(qtype):
    rng = np.random.default_rng(len(qtype))
    x = (rng.standard_normal((24, 512)) * 0.02).astype(np.float32)
    x[3, :40] *= 8  # outliers: blocks whose scale clips or stretches
    x[5, 64:96] = 0.0  # a block of zeros: one level, nothing known
    y = _round_trip(x, qtype)
    idx = np.arange(x.size)
    lo, hi = quant_cells.sample_cells(y.reshape(-1), idx, qtype)
    flat = x.reshape(-1).astype(np.float64)
    slack = 1e-6 * np.abs(flat).max()  # float32 decoding of d * sc * q
    assert np.all(lo <= flat + slack) and np.all(flat - slack <= hi), qtype
    assert np.all(lo <= y.reshape(-1)) and np.all(y.reshape(-1) <= hi)
    closed = np.isfinite(lo) & np.isfinite(hi)
    assert closed.mean() > 0.5, closed.mean()  # most values get both sides
    # the cells are the grid's: a narrower cell (a third of each side) would exclude the truth for many values
    lc, hc, fc = lo[closed], hi[closed], flat[closed]
    mid, half = (lc + hc) / 2, (hc - lc) / 2
    narrow = (fc < mid - half / 3) | (fc > mid + half / 3)
    assert narrow.sum() > 0.2 * closed.sum()


def test_types_without_elementwise_rounding_get_no_cells():
    assert not quant_cells.has_cells("IQ2_XXS", 256) and not quant_cells.has_cells("TQ1_0", 256)
    assert not quant_cells.has_cells("Q4_0", 48)  # rows that are not whole sub-blocks
    assert quant_cells.has_cells("IQ4_XS", 256) and quant_cells.has_cells("Q6_K", 4096)


def test_the_allowed_set_is_centred_and_holds_the_truth():
    """Two close parents, a merge quantized to a coarse grid: the cells allow a band of weights around the truth,
    `feasible` moves to its centre and reports a spread that covers the truth."""
    rng = np.random.default_rng(3)
    b = rng.standard_normal(20000)
    a = b + 0.05 * rng.standard_normal(20000)
    x = 0.6 * a + 0.4 * b
    step = 0.25
    q = np.round(x / step) * step
    lo, hi = q - step / 2, q + step / 2
    P = np.stack([a, b])
    got = quant_cells.feasible(np.array([0.58, 0.42]), P, lo, hi)  # start off the truth, as least squares is
    assert got is not None
    w, se = got
    assert abs(w[0] - 0.6) < 2 * se[0] * 3**0.5 and abs(w[1] - 0.4) < 2 * se[1] * 3**0.5, (w, se)
    assert se[0] < 0.01 and abs(w.sum() - 1) < 1e-3
    # cells that contradict each other (the merge is not what the cells say) give None, not a number
    assert quant_cells.feasible(np.array([0.6, 0.4]), P, lo + 10 * step, hi + 10 * step) is None
