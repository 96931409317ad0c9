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

import numpy as np
from scipy import stats as sps

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
    return float(sps.norm.logsf(z) / math.log(10))


def p_from_z(z: float) -> float:
    return max(float(sps.norm.sf(z)), 0.0)


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
    half = float(sps.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - half, m + half


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    if n == 0:
        return 0.0, 0.0, 1.0
    z = sps.norm.ppf(0.5 + level / 2)
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
