"""The one place where numbers become confidence: nulls, p-values, intervals and multiple testing.

Independence test (weights): under "the suspect is independent of candidate X", the double-centred elementwise
correlation of two matrices is ~N(0, 1/dof) (permutation symmetry of hidden units makes its mean zero; centring
removes the shared row/column offsets that make raw cosines of unrelated models look large). Each matrix gives a
Fisher z; matrices combine by Stouffer's method. Structured tensors (norm gains, biases, routers, tiny vectors) are
excluded: their values share structure across unrelated models (the "182 sigma" LayerNorm false positive).
The null is checked on independent pairs in the test suite (uniform p-values, none below 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import numpy as np


def _sps() -> ModuleType:
    """scipy.stats, imported on first use (about 0.4 s): a command pays for it when it computes its first p-value,
    not before it reads its first byte, and commands that compute none never pay it."""
    from scipy import stats

    return stats


#: p-values are reported down to this floor; below it, as "< 1e-300".
P_FLOOR = 1e-300


def fisher_z(r: float, dof: int) -> float:
    """z-score of a correlation r over `dof` effective samples (one-sided: positive r is evidence)."""
    if dof <= 3:
        return 0.0
    r = min(max(r, -0.999999999999), 0.999999999999)
    return float(math.atanh(r) * math.sqrt(dof - 3))


def stouffer(zs: Sequence[float]) -> float:
    zs = [z for z in zs if np.isfinite(z)]
    return float(sum(zs) / math.sqrt(len(zs))) if zs else 0.0


def log10_sf(z: float) -> float:
    """log10 of the one-sided normal tail probability, exact far into the tail."""
    return float(_sps().norm.logsf(z) / math.log(10))


def z_from_log10p(log10p: float) -> float:
    """One-sided z-score of a p-value given as log10 (exact far into the tail, where p underflows)."""
    from scipy.special import ndtri_exp

    return float(-ndtri_exp(min(log10p, 0.0) * math.log(10)))


def poisson_log10_sf(k: int, lam: float) -> float:
    """log10 P(X >= k) for X ~ Poisson(lam): the null of matched-unit agreements (fixed points of a random
    permutation are Poisson(1) as n grows; a partial matching of n_both units into n_c gives lam = n_both / n_c)."""
    if k <= 0:
        return 0.0
    lam = max(lam, 1e-12)
    ln = float(_sps().poisson.logsf(k - 1, lam))
    if not np.isfinite(ln) or ln < -700:  # far tail: P(X >= k) = P(X = k) (1 + lam/(k+1) + ...) <= P(X = k)/(1 - r)
        r = lam / (k + 1)
        ln = k * math.log(lam) - lam - math.lgamma(k + 1) - (math.log1p(-r) if r < 1 else 0.0)
    return ln / math.log(10)


def poisson_log10_randomized(k: int, lam: float, u: float) -> float:
    """log10 of the randomized p-value P(X > k) + u P(X = k), X ~ Poisson(lam), u in (0, 1).

    A discrete count gives super-uniform p-values (many exactly 1); randomizing within the observed count makes the
    p-value exactly uniform under the null, so that combined tests stay calibrated, not merely valid. Callers
    derive u deterministically from the data (a hash), so an audit is reproducible."""
    lam = max(lam, 1e-12)
    ln_eq = k * math.log(lam) - lam - math.lgamma(k + 1)
    ln_gt = poisson_log10_sf(k + 1, lam) * math.log(10)
    ln_u = ln_eq + math.log(min(max(u, 1e-300), 1.0))
    hi, lo = max(ln_gt, ln_u), min(ln_gt, ln_u)
    ln = hi + math.log1p(math.exp(lo - hi)) if np.isfinite(lo) else hi
    return min(ln, 0.0) / math.log(10)


def fisher_log10(log10ps: Sequence[float]) -> float:
    """Fisher's method over independent p-values given as log10: -2 sum ln p ~ chi2(2m) under the null.

    Discrete p-values (agreement counts) make it conservative, never anti-conservative."""
    lp = [min(x, 0.0) for x in log10ps if np.isfinite(x)]
    if not lp:
        return 0.0
    stat = -2.0 * math.log(10) * sum(lp)
    df = 2 * len(lp)
    ln = float(_sps().chi2.logsf(stat, df))
    if not np.isfinite(ln) or ln < -700:  # upper incomplete gamma, far tail: x^(a-1) e^-x / Gamma(a) (x = stat/2)
        a, x = df / 2, stat / 2
        ln = (a - 1) * math.log(x) - x - math.lgamma(a) + math.log1p((a - 1) / x)
    return ln / math.log(10)


def p_from_z(z: float) -> float:
    return max(float(_sps().norm.sf(z)), 0.0)


def format_p(log10p: float) -> str:
    if log10p < -300:
        return "p < 1e-300"
    if log10p < -3:
        return f"p = 1e{log10p:.0f}"
    return f"p = {10 ** log10p:.3g}"


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval of per-tensor estimates (their spread is the honest uncertainty of a recipe weight)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return (float("nan"),) * 3
    m = float(v.mean())
    if v.size == 1:
        return m, m, m
    half = float(_sps().t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - half, m + half


def pooled_interval(values: Sequence[float], ses: Sequence[float], level: float = 0.95,
                    floor: float = 2.0**-23) -> tuple[float, float, float]:
    """Precision-weighted mean of per-tensor estimates with standard errors, and its interval.

    Random effects (DerSimonian-Laird), so that weights that truly differ between tensors (per-layer gradients,
    or per-tensor rounding the fits did not model) widen the interval instead of being averaged away; the
    Hartung-Knapp t-interval is used when it is wider (better coverage with few tensors). Estimates with an
    infinite standard error (the tensor cannot tell the weights apart) are left out; with none left, the plain
    t-interval of the values. `floor`: the smallest half-width, the resolution weights are applied at (float32).
    """
    x = np.asarray(values, dtype=float)
    se = np.asarray(ses, dtype=float)
    keep = np.isfinite(x) & np.isfinite(se)
    x, se = x[keep], np.maximum(se[keep], 1e-300)
    if x.size == 0:
        return mean_interval(values, level)
    w = 1 / se**2
    m_fe = float((w * x).sum() / w.sum())
    if x.size == 1:
        half = float(_sps().norm.ppf(0.5 + level / 2) * se[0])
        half = max(half, floor * max(1.0, abs(m_fe)))
        return m_fe, m_fe - half, m_fe + half
    q = float((w * (x - m_fe) ** 2).sum())
    c = float(w.sum() - (w**2).sum() / w.sum())
    tau2 = max(0.0, (q - (x.size - 1)) / c) if c > 0 else 0.0
    ws = 1 / (se**2 + tau2)
    m = float((ws * x).sum() / ws.sum())
    z_half = float(_sps().norm.ppf(0.5 + level / 2) / math.sqrt(ws.sum()))
    hk = float((ws * (x - m) ** 2).sum() / ((x.size - 1) * ws.sum()))
    t_half = float(_sps().t.ppf(0.5 + level / 2, x.size - 1) * math.sqrt(hk))
    half = max(z_half, t_half, floor * max(1.0, abs(m)))
    return m, m - half, m + half


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    if n == 0:
        return 0.0, 0.0, 1.0
    z = _sps().norm.ppf(0.5 + level / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, centre - half), min(1.0, centre + half)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order."""
    m = len(pvalues)
    order = np.argsort(pvalues)
    adj = [0.0] * m
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[idx]))
        adj[idx] = running
    return adj


def fisher_z_many(r: np.ndarray, dof: int) -> np.ndarray:
    """`fisher_z` over an array of correlations sharing one `dof` (layer-by-layer similarity matrices)."""
    if dof <= 3:
        return np.zeros_like(np.asarray(r, dtype=float))
    r = np.clip(np.asarray(r, dtype=float), -0.999999999999, 0.999999999999)
    return np.arctanh(r) * math.sqrt(dof - 3)


def best_of_z(z: float | np.ndarray, m: int) -> float | np.ndarray:
    """z-score of the best of `m` independent one-sided tests (Šidák: p' = 1 - (1 - p)^m), N(0, 1) again under the
    null, so such z-scores may be combined by Stouffer's method. Exact far into the tail (p' -> m p). Accepts an
    array of z-scores."""
    from scipy.special import ndtri_exp

    if m <= 1:
        return z
    arr = np.asarray(z, dtype=float)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        logp = _sps().norm.logsf(arr)
        lp = np.where(logp > -30, np.log(-np.expm1(m * np.log1p(-np.exp(np.minimum(logp, 0))))),
                      logp + math.log(m))
        out = -ndtri_exp(np.clip(lp, -np.inf, math.log1p(-1e-16)))
    out = np.where(np.isfinite(arr), out, arr)
    return out if np.ndim(z) else float(out)


def holm_log10(log10_p: Sequence[float], m: int | None = None) -> list[float]:
    """Holm–Bonferroni adjusted log10 p-values, in the input order, without underflow. `m` >= len(log10_p) counts
    the tests of the family whose p-values were not computed (taken as 1), e.g. index entries never shortlisted."""
    k = len(log10_p)
    m = max(m or k, k)
    order = np.argsort(log10_p)
    adj = [0.0] * k
    running = -math.inf
    for rank, idx in enumerate(order):
        running = max(running, min(0.0, math.log10(m - rank) + float(log10_p[idx])))
        adj[idx] = running
    return adj


def wilson_modified(k: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """Wilson's interval with Brown, Cai & DasGupta's (2001) repair near 0 and 1: for 1-3 successes (or failures)
    the Wilson bound is too tight on the far side (coverage drops to ~85% for a rare name seen once), so that bound
    is replaced by the one-sided Poisson bound chi2(2x, 1-level) / 2n."""
    p, lo, hi = wilson(k, n, level)
    if n == 0:
        return p, lo, hi
    x_star = 2 if n <= 50 else 3
    alpha = 1 - level
    if 1 <= k <= x_star:
        lo = float(_sps().chi2.ppf(alpha, 2 * k) / (2 * n))
    if 1 <= n - k <= x_star:
        hi = 1 - float(_sps().chi2.ppf(alpha, 2 * (n - k)) / (2 * n))
    return float(p), float(lo), float(hi)


def share(k: int, n: int, level: float = 0.95) -> dict:
    """A share with its (modified) Wilson interval. Answers to different questions are independent but not
    identically distributed (each question has its own probability); the interval is then conservative for the
    mean probability over the questions asked, which is the quantity a share estimates."""
    p, lo, hi = wilson_modified(k, n, level)
    return {"k": k, "n": n, "share": p, "interval": [lo, hi]}


def format_share(s: dict) -> str:
    """'79.2% [71.1–85.6%]' (one decimal below 10%, so small shares do not read as zero)."""

    def pct(x: float) -> str:
        return f"{100 * x:.1f}" if 0 < x < 0.1 or 0.99 < x < 1 else f"{100 * x:.0f}"

    return f"{pct(s['share'])}% [{pct(s['interval'][0])}–{pct(s['interval'][1])}%]"


def paired_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided paired t-test p-value for "x is larger than y on average" over paired observations (NaN pairs
    dropped). Identical pairs give p = 1; a constant positive difference gives p = 0 (reported as below the floor)."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return 1.0
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd == 0.0 or not np.isfinite(sd):
        return 0.0 if mean > 0 else 1.0
    t = mean / (sd / math.sqrt(d.size))
    return float(_sps().t.sf(t, d.size - 1))


def intersection_union(pvalues: Sequence[float]) -> float:
    """p-value of "the effect holds against every comparator" (an intersection-union test): the largest p.
    A candidate must be closer to the suspect than each unrelated reference, not merely than their average."""
    ps = [p for p in pvalues if np.isfinite(p)]
    return max(ps) if ps else 1.0
