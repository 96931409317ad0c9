"""Merge weights that model the suspect's storage rounding (field notes: close parents in low precision).

When the parents of a merge differ by a few units in the last place of the suspect's storage (a fine-tune merged
with its own base, as in the Rio case), the stored value round(sum w_i P_i) is as far from the pre-rounding value as
the parents are from each other, and least squares on it is biased by 0.004-0.01 with intervals that look tight.
Per element, the stored value S says only that the pre-rounding value mu = sum w_i P_i fell in S's rounding cell
[lo, hi] (halfway to its neighbours in the storage dtype). The likelihood of the weights is therefore
    prod_e  Phi((hi_e - mu_e) / sigma) - Phi((lo_e - mu_e) / sigma)
where sigma absorbs the merge's own arithmetic (mergekit computes in float32, or in bf16 for bf16 merges) and is
fitted with the weights. Only elements where the parents differ carry information; a sample of at most
MAX_ELEMENTS of them (from accumulate's ROUNDING_SAMPLE per slot) is used. The standard errors come from the
observed information (numerical Hessian) at the maximum. Cost: ~30 likelihood evaluations of MAX_ELEMENTS elements
per fitted slot; memory O(MAX_ELEMENTS x parents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Informative elements used per slot: 8k resolve a weight to ~1e-4 when parents differ by a few ulps.
MAX_ELEMENTS = 1 << 13
#: Where the parents differ by more than this many cells of the suspect's rounding (median), every element pins the
#: weight down tightly, and a quarter of the elements does: least squares is still biased there at the 1e-5 level,
#: beyond its own standard error (measured: 54 of 72 intervals covered the truth with least squares alone there).
BIAS_RATIO = 32.0
#: Storage dtypes whose rounding is coarse enough to bias least squares (float32's is below mergekit's arithmetic).
ROUNDED = ("BF16", "F16", "F8_E4M3", "F8_E5M2")


#: Smallest half-width of a pooled weight interval over rounded storage: the fit's systematic error, which pooling
#: thousands of tensors cannot average away (measured: 3e-6..8e-6 on the full-size Rio benchmark, 2,988 bf16
#: tensors; at most 6e-5 per merge of four tensors in the coverage test, where random error dominates).
RESOLUTION = 1e-5


@dataclass(frozen=True)
class RoundingFit:
    weights: np.ndarray  # per parent, in the order given
    se: np.ndarray  # standard errors
    sigma: float  # fitted arithmetic noise, in units of the median cell width
    elements: int  # informative elements used


def _storage_type(dtype: str):  # noqa: ANN202
    import ml_dtypes

    return {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
            "F8_E5M2": ml_dtypes.float8_e5m2}[dtype]


def cells(stored: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi] of the values that round to each stored value (float32 input holding values of `dtype`)."""
    t = _storage_type(dtype)
    x = stored.astype(t)
    with np.errstate(over="ignore", invalid="ignore"):
        up = np.nextafter(x, np.array(np.inf, dtype=t)).astype(np.float64)
        dn = np.nextafter(x, np.array(-np.inf, dtype=t)).astype(np.float64)
    v = x.astype(np.float64)
    up = np.where(np.isfinite(up), up, v)
    dn = np.where(np.isfinite(dn), dn, v)
    return (v + dn) / 2, (v + up) / 2


def _log_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log(Phi(a) - Phi(b)) for a > b, accurate in both tails."""
    flip = b > 0
    hi = np.where(flip, -b, a)
    lo = np.where(flip, -a, b)
    from scipy.special import log_ndtr  # scipy on first use: an audit's first read does not wait for it

    la, lb = log_ndtr(hi), log_ndtr(lo)
    return la + np.log1p(-np.exp(np.minimum(lb - la, -1e-15)))


def _nll(theta: np.ndarray, P: np.ndarray, lo: np.ndarray, hi: np.ndarray, scale: float) -> float:
    w, ls = theta[:-1], theta[-1]
    sigma = scale * math.exp(ls)
    mu = w @ P
    return float(-_log_mass((hi - mu) / sigma, (lo - mu) / sigma).sum())


def _grad(theta: np.ndarray, P: np.ndarray, lo: np.ndarray, hi: np.ndarray, scale: float) -> np.ndarray:
    w, ls = theta[:-1], theta[-1]
    sigma = scale * math.exp(ls)
    mu = w @ P
    a, b = (hi - mu) / sigma, (lo - mu) / sigma
    lm = _log_mass(a, b)
    c = 0.5 * math.log(2 * math.pi)
    # density over mass, exponents capped: far outside its cell an element's pull grows like |a| (Mills ratio);
    # an open side (a GGUF value at its block's edge level) has no density: inf * 0 there is 0
    with np.errstate(invalid="ignore", over="ignore"):
        pa = np.exp(np.minimum(-0.5 * a * a - c - lm, 300.0))
        pb = np.exp(np.minimum(-0.5 * b * b - c - lm, 300.0))
        dmu = np.nan_to_num((pa - pb) / sigma)  # d(-log L)/d mu
        dls = np.nan_to_num(np.where(pa > 0, a * pa, 0.0) - np.where(pb > 0, b * pb, 0.0))  # d(-log L)/d log sigma
    return np.concatenate([P @ dmu, [dls.sum()]])


def fit(sample: np.ndarray, parents: list[int], dtype: str, start: np.ndarray,
        cells_of_sample: np.ndarray | None = None) -> RoundingFit | None:
    """Weights of the suspect (sample row 0) on `parents` (rows of `sample`), modelling `dtype` rounding, or the
    given cells of the suspect's values (2, m: a block-quantized grid, detectors/quant_cells.py; open sides
    infinite); None when neither applies or too few elements tell the parents apart."""
    if (dtype not in ROUNDED and cells_of_sample is None) or sample is None or len(parents) < 2:
        return None
    P = sample[parents].astype(np.float64)
    S = sample[0]
    ok = np.isfinite(P).all(axis=0) & np.isfinite(S) & (np.ptp(P, axis=0) > 0)
    if cells_of_sample is not None:
        ok &= np.isfinite(cells_of_sample).any(axis=0)  # a cell open on both sides says nothing
    idx = np.nonzero(ok)[0]
    if idx.size < 64:
        return None
    if cells_of_sample is None:
        lo, hi = cells(S[idx], dtype)
    else:
        lo, hi = cells_of_sample[0, idx].astype(np.float64), cells_of_sample[1, idx].astype(np.float64)
    width = hi - lo
    finite = np.isfinite(width)
    if not finite.any():
        return None
    wide = float(np.median(np.ptp(P[:, idx[finite]], axis=0) / np.maximum(width[finite], 1e-300))) > BIAS_RATIO
    cap = MAX_ELEMENTS // 4 if wide else MAX_ELEMENTS
    if idx.size > cap:
        pick = np.linspace(0, idx.size - 1, cap).astype(int)
        idx, lo, hi = idx[pick], lo[pick], hi[pick]
    P, S = P[:, idx], S[idx]
    width = hi - lo
    scale = float(np.median(width[np.isfinite(width)])) if np.isfinite(width).any() else 0.0
    if not scale > 0:
        return None
    theta0 = np.concatenate([np.asarray(start, dtype=float), [math.log(0.3)]])
    from scipy import optimize  # on first use, as log_ndtr above

    with _one_thread():  # a few parameters: BLAS threads only spin (4 ms per L-BFGS step under load, measured)
        res = optimize.minimize(_nll, theta0, args=(P, lo, hi, scale), jac=_grad, method="L-BFGS-B",
                                bounds=[(None, None)] * len(parents) + [(math.log(1e-4), math.log(10.0))],
                                options={"maxiter": 80})
        theta = res.x
        se = _standard_errors(theta, P, lo, hi, scale)
    weights = theta[:-1].copy()
    if cells_of_sample is not None:  # a flat-topped likelihood: the set the cells allow gives the error instead
        from modeltrace.detectors.quant_cells import feasible

        got = feasible(weights, P, lo, hi)
        if got is None:
            return None
        weights, se = got
    return RoundingFit(weights, se, float(math.exp(theta[-1])), int(idx.size))


def _one_thread():  # noqa: ANN202
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _standard_errors(theta: np.ndarray, P: np.ndarray, lo: np.ndarray, hi: np.ndarray, scale: float
                     ) -> np.ndarray:
    """Observed-information standard errors of the weights (central differences of the analytic gradient)."""
    k = theta.size
    Hm = np.zeros((k, k))
    for j in range(k):
        h = 1e-6 * max(1.0, abs(theta[j]))
        e = np.zeros(k)
        e[j] = h
        Hm[:, j] = (_grad(theta + e, P, lo, hi, scale) - _grad(theta - e, P, lo, hi, scale)) / (2 * h)
    Hm = (Hm + Hm.T) / 2
    try:
        cov = np.linalg.inv(Hm)
    except np.linalg.LinAlgError:
        return np.full(k - 1, np.inf)
    d = np.diag(cov)[:-1]
    return np.sqrt(np.where(d > 0, d, np.inf))


__all__ = ["RoundingFit", "cells", "fit", "ROUNDED", "MAX_ELEMENTS", "BIAS_RATIO", "RESOLUTION"]
