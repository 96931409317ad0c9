"""Rounding cells of GGUF block-quantized values, for the rounding-aware weight fit (detectors/rounding.py).

A quantized copy of a merge stores Q(sum w_i P_i), and least squares on it is biased: 4-bit grids are coarse next
to the difference of close parents, and block scales chosen to fit each block (clipping its outliers) shrink the
stored values towards zero (measured: 0.591 for a true 0.6 on the full-size Rio IQ4_XS copy). What the stored value
says exactly is which cell of its block's grid the pre-quantization value fell in: every type listed here stores,
given a sub-block's scale (and minimum), the nearest level of that sub-block's grid (llama.cpp's final pass, and
gguf-py's encoders). The grid's scale is not read back from the bytes, so the cells are derived from the decoded
values of the sub-block, and made wider rather than narrower wherever that leaves a doubt:

- uniform grids (Q8_0, Q4_0, Q6_K, the K-quants): levels are multiples of a step s plus an offset; the smallest gap
  between two levels present in the sub-block is a whole multiple of s, so half of it is a half-cell at least as
  wide as the true one;
- non-uniform grids (IQ4_NL, IQ4_XS): the cell ends halfway to the nearest *present* level on each side (the levels
  the sub-block does not use lie at least as close, so the true cell is inside);
- a sub-block's lowest and highest present levels are open outwards (values beyond them may have been clipped);
- every end moves out by 2^-10 of the sub-block's largest magnitude (an encoder rounds with a float32 scale and
  stores a float16 one), and by half a bf16 ulp of itself (the copy was quantized from a rounded checkpoint of the
  merge, not from the merge's exact values).

So each cell contains the true one: the fit never excludes the truth, it only learns less from a sub-block that uses
few levels (tests/detectors/test_quant_cells.py checks containment on every encoder the tests have). Types whose
values are not chosen element by element (the lattice codebooks of IQ1-IQ3, the ternary TQ types) get no cells and
keep least squares.

Data flow: `SlotAccumulator` hands the suspect's chunk (decoded float32, full rows) and the flat indices it samples
-> `sample_cells` gathers each sampled element's sub-block -> (lo, hi) per element. Memory: O(sampled x sub-block).
"""

from __future__ import annotations

import numpy as np

__all__ = ["NEAREST", "feasible", "has_cells", "sample_cells", "subblock_cells"]

#: GGUF types that quantize element by element to the nearest level of a sub-block grid: (values per sub-block,
#: uniform grid). Sub-block sizes are ggml's (the span one scale covers).
NEAREST: dict[str, tuple[int, bool]] = {
    "Q8_0": (32, True), "Q8_1": (32, True), "Q5_0": (32, True), "Q5_1": (32, True), "Q4_0": (32, True),
    "Q4_1": (32, True), "Q6_K": (16, True), "Q5_K": (32, True), "Q4_K": (32, True), "Q3_K": (16, True),
    "Q2_K": (16, True), "IQ4_NL": (32, False), "IQ4_XS": (32, False),
}
#: Encoders choose levels with the float32 scale (and minimum) and store them as float16 (ggml's Q8_0 and Q4_0,
#: gguf-py's), so the decoded grid is off the one used by up to 2^-11 of the sub-block's largest magnitude: each cell
#: end moves out by twice that.
_SCALE_SLACK = 2.0**-10
#: A quantized copy is made from a checkpoint of the merge, itself rounded (bf16 for the Rio GGUFs): the merge's
#: exact value may sit up to half a bf16 ulp (at most 2^-8 of its size) outside the cell its rounded value fell in.
_SOURCE_SLACK = 2.0**-8
#: Constraints per side kept for the linear programs of `feasible` (the ones with the least room; ~20 ms a slot).
LP_ROWS = 512
#: Two decoded values closer than this (relative to the sub-block's largest magnitude) are the same level: float32
#: decoding of d * sc * q rounds at ~6e-8 relative.
_SAME = 1e-6


def has_cells(dtype: str, cols: int) -> bool:
    """Whether values of this storage type, in rows of `cols`, get cells."""
    sub = NEAREST.get(dtype)
    return sub is not None and cols % sub[0] == 0


def subblock_cells(blocks: np.ndarray, uniform: bool) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) for every value of decoded sub-blocks `blocks` (n, S): cells that contain the true ones (see the
    module docstring); -inf / +inf on the open sides."""
    v = np.asarray(blocks, dtype=np.float64)
    n, s = v.shape
    order = np.argsort(v, axis=1)
    srt = np.take_along_axis(v, order, axis=1)
    tol = _SAME * np.maximum(np.abs(srt).max(axis=1, keepdims=True), 1e-300)
    gaps = np.diff(srt, axis=1)
    new = gaps > tol  # a new level starts after this position
    # runs of equal values in each sorted row: where each position's run starts and ends
    pos = np.broadcast_to(np.arange(s), (n, s))
    starts = np.concatenate([np.ones((n, 1), bool), new], axis=1)
    ends = np.concatenate([new, np.ones((n, 1), bool)], axis=1)
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, pos, s - 1)[:, ::-1], axis=1)[:, ::-1]
    # the neighbouring levels: the far end of the run below and of the run above (none: open)
    below = np.take_along_axis(first, np.maximum(first - 1, 0), axis=1)
    above = np.take_along_axis(last, np.minimum(last + 1, s - 1), axis=1)
    prev_level = np.where(first > 0, np.take_along_axis(srt, below, axis=1), -np.inf)
    next_level = np.where(last < s - 1, np.take_along_axis(srt, above, axis=1), np.inf)
    if uniform:
        big = np.where(new, gaps, np.inf).min(axis=1, keepdims=True)  # smallest gap between present levels
        half = np.where(np.isfinite(big), big / 2, np.inf)
        lo_s = np.where(np.isfinite(prev_level), srt - half, -np.inf)
        hi_s = np.where(np.isfinite(next_level), srt + half, np.inf)
    else:
        lo_s = np.where(np.isfinite(prev_level), (srt + prev_level) / 2, -np.inf)
        hi_s = np.where(np.isfinite(next_level), (srt + next_level) / 2, np.inf)
    slack = _SCALE_SLACK * np.abs(srt).max(axis=1, keepdims=True)
    lo_s = lo_s - slack - np.abs(lo_s) * _SOURCE_SLACK
    hi_s = hi_s + slack + np.abs(hi_s) * _SOURCE_SLACK
    lo, hi = np.empty_like(v), np.empty_like(v)  # back to each row's own order
    np.put_along_axis(lo, order, lo_s, axis=1)
    np.put_along_axis(hi, order, hi_s, axis=1)
    return lo, hi


def sample_cells(flat: np.ndarray, idx: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the elements `idx` of a decoded chunk `flat` (full rows, row-major, rows a whole number of
    sub-blocks long, as `has_cells` checks)."""
    size, uniform = NEAREST[dtype]
    idx = np.asarray(idx, dtype=np.int64)
    start: np.ndarray = (idx // size) * size
    blocks = np.asarray(flat).reshape(-1)[start[:, None] + np.arange(size)]
    lo, hi = subblock_cells(blocks, uniform)
    at = (idx - start)[:, None]
    return np.take_along_axis(lo, at, axis=1)[:, 0], np.take_along_axis(hi, at, axis=1)[:, 0]


def feasible(w: np.ndarray, P: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Weights at the centre of the set every cell allows, and their standard errors.

    With cells that contain the truth, the merge weights are set-identified: every element e says
    lo_e <= w . P_e <= hi_e, and the true weights satisfy all of them. The likelihood is flat inside that set, so its
    curvature gives no standard error. Instead each weight's range over the set is found exactly (two linear
    programs per weight, constraints in units of their cell's width), the weight is put at the centre of its range,
    and the half-range counts as the half-width of a uniform error (sd = half / sqrt 3): conservative, as the
    centre of a range bounded by thousands of elements lies much closer to the truth than that (measured: errors of
    0.14 of the interval's half-width, rms, on 25 quantized merges). None when no weights satisfy every cell (the
    model does not hold: least squares stays). `w`: the likelihood's maximum, for the number of weights."""
    from scipy.optimize import linprog

    k = len(w)
    width = hi - lo
    up, dn = np.isfinite(hi), np.isfinite(lo)
    scale = np.where(np.isfinite(width), width, np.nanmax(np.where(np.isfinite(width), width, np.nan)))
    if not np.isfinite(scale).all() or not (scale > 0).all():
        return None
    # the constraints that can bind: those with the least room, at the likelihood's maximum, per unit of movement
    # along the parents' weakest direction (leaving others out can only widen the ranges)
    u = np.linalg.eigh(P @ P.T)[1][:, 0]
    mu, move = np.asarray(w, dtype=np.float64) @ P, np.abs(u @ P) + 1e-300
    room_up = np.where(up, (hi - mu) / move, np.inf)
    room_dn = np.where(dn, (mu - lo) / move, np.inf)
    up &= room_up <= np.partition(room_up, min(LP_ROWS, room_up.size - 1))[min(LP_ROWS, room_up.size - 1)]
    dn &= room_dn <= np.partition(room_dn, min(LP_ROWS, room_dn.size - 1))[min(LP_ROWS, room_dn.size - 1)]
    A = np.concatenate([(P[:, up] / scale[up]).T, (-P[:, dn] / scale[dn]).T])
    b = np.concatenate([hi[up] / scale[up], -lo[dn] / scale[dn]])
    ranges = np.zeros((k, 2))
    for i in range(k):
        for side, sign in ((0, 1.0), (1, -1.0)):
            c = np.zeros(k)
            c[i] = sign
            res = linprog(c, A_ub=A, b_ub=b, bounds=[(None, None)] * k, method="highs")
            if res.status != 0:
                return None
            ranges[i, side] = res.x[i]
    return ranges.mean(axis=1), (ranges[:, 1] - ranges[:, 0]) / 2 / np.sqrt(3)
