"""modeltrace/stats.py against reference values: scipy's distributions and tests, computed independently here
(other code paths: scipy.stats.combine_pvalues, scipy.stats.false_discovery_control's sibling logic written out,
scipy.stats.binomtest's Wilson interval, arbitrary-precision mpmath where p-values underflow a float)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from scipy import stats as sps

from modeltrace import stats


@pytest.mark.parametrize("r,dof", [(0.0, 100), (0.1, 1000), (-0.3, 50), (0.9, 10), (0.5, 4)])
def test_fisher_z(r, dof):
    assert stats.fisher_z(r, dof) == pytest.approx(0.5 * math.log((1 + r) / (1 - r)) * math.sqrt(dof - 3))


def test_fisher_z_degenerate():
    assert stats.fisher_z(0.5, 3) == 0.0  # too few samples to say anything
    assert np.isfinite(stats.fisher_z(1.0, 100))  # clipped, not infinite


def test_fisher_z_is_normal_under_the_null():
    """Correlations of independent samples: Fisher z over dof is N(0, 1) (Kolmogorov-Smirnov)."""
    rng = np.random.default_rng(0)
    n = 200
    zs = [stats.fisher_z(float(np.corrcoef(rng.normal(size=n), rng.normal(size=n))[0, 1]), n) for _ in range(800)]
    assert sps.kstest(zs, "norm").pvalue > 1e-3


def test_stouffer_matches_scipy():
    zs = [1.2, -0.3, 2.5, 0.7]
    ps = sps.norm.sf(zs)
    _, p_ref = sps.combine_pvalues(ps, method="stouffer")
    assert stats.p_from_z(stats.stouffer(zs)) == pytest.approx(p_ref, rel=1e-9)
    assert stats.stouffer([1.0, float("nan"), float("inf")]) == 1.0  # non-finite scores dropped
    assert stats.stouffer([]) == 0.0


@pytest.mark.parametrize("ps", [[0.5, 0.2, 0.9], [1e-5, 0.3], [0.01] * 10, [1.0]])
def test_fisher_log10_matches_scipy(ps):
    _, p_ref = sps.combine_pvalues(ps, method="fisher")
    assert 10 ** stats.fisher_log10([math.log10(p) for p in ps]) == pytest.approx(p_ref, rel=1e-9)


def test_fisher_log10_far_tail_against_mpmath():
    """Where the combined p underflows a float, the asymptotic tail still gives the right exponent."""
    log10ps = [-200.0, -250.0, -180.0]
    stat = -2 * math.log(10) * sum(log10ps)
    ref = mpmath.log10(mpmath.gammainc(len(log10ps), stat / 2, mpmath.inf, regularized=True))
    assert stats.fisher_log10(log10ps) == pytest.approx(float(ref), abs=0.05)
    assert stats.fisher_log10([]) == 0.0


@pytest.mark.parametrize("z", [0.0, 1.96, 5.0, 12.0, 40.0])
def test_log10_sf_and_inverse(z):
    ref = float(mpmath.log10(mpmath.ncdf(-z)))
    assert stats.log10_sf(z) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert stats.z_from_log10p(ref) == pytest.approx(z, abs=1e-6)


@pytest.mark.parametrize("k,lam", [(0, 1.0), (1, 1.0), (3, 1.0), (10, 2.5), (7, 0.3)])
def test_poisson_log10_sf_matches_scipy(k, lam):
    ref = float(sps.poisson.sf(k - 1, lam)) if k > 0 else 1.0
    assert 10 ** stats.poisson_log10_sf(k, lam) == pytest.approx(ref, rel=1e-9)


def test_poisson_far_tail_against_mpmath():
    k, lam = 400, 1.0  # P(X >= 400) ~ 1e-870: below any float
    ref = mpmath.log10(mpmath.nsum(lambda j: mpmath.exp(-lam) * mpmath.mpf(lam) ** j / mpmath.factorial(j),
                                   [k, mpmath.inf]))
    assert stats.poisson_log10_sf(k, lam) == pytest.approx(float(ref), abs=1e-6)


def test_poisson_randomized_is_uniform_under_the_null():
    rng = np.random.default_rng(1)
    ks = rng.poisson(1.0, 4000)
    us = rng.uniform(size=4000)
    ps = [10 ** stats.poisson_log10_randomized(int(k), 1.0, float(u)) for k, u in zip(ks, us, strict=True)]
    assert sps.kstest(ps, "uniform").pvalue > 1e-3
    # at u -> 1 it is the ordinary tail P(X >= k); at u -> 0, P(X > k)
    assert 10 ** stats.poisson_log10_randomized(2, 1.0, 1.0) == pytest.approx(sps.poisson.sf(1, 1.0), rel=1e-9)
    assert 10 ** stats.poisson_log10_randomized(2, 1.0, 1e-300) == pytest.approx(sps.poisson.sf(2, 1.0), rel=1e-9)


def _holm_reference(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment written out from its definition: p_(i) * (m - i + 1), monotone, capped at 1."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adj = [0.0] * m
    best = 0.0
    for rank, i in enumerate(order):
        best = max(best, min(1.0, (m - rank) * ps[i]))
        adj[i] = best
    return adj


@pytest.mark.parametrize("ps", [[0.01, 0.04, 0.03, 0.2], [0.5], [1e-8, 1e-8, 0.9], [0.3, 0.01, 0.02]])
def test_holm(ps):
    assert stats.holm(ps) == pytest.approx(_holm_reference(ps))
    assert stats.holm_log10([math.log10(p) for p in ps]) == pytest.approx(
        [math.log10(p) for p in _holm_reference(ps)])


def test_holm_against_statsmodels_values():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_log10_counts_untested_members():
    assert stats.holm_log10([-10.0], m=1000) == pytest.approx([-7.0])


def test_mean_interval_is_the_t_interval():
    v = [0.58, 0.61, 0.6, 0.62, 0.59]
    m, lo, hi = stats.mean_interval(v)
    ref = sps.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=sps.sem(v))
    assert (m, lo, hi) == pytest.approx((np.mean(v), *ref))
    assert stats.mean_interval([0.3]) == (0.3, 0.3, 0.3)
    assert all(math.isnan(x) for x in stats.mean_interval([]))


def test_pooled_interval_fixed_effect_when_homogeneous():
    """Equal estimates with known errors: the inverse-variance mean and its normal interval."""
    x, se = [0.6, 0.6, 0.6], [0.01, 0.02, 0.02]
    w = 1 / np.square(se)
    m, lo, hi = stats.pooled_interval(x, se)
    assert m == pytest.approx(0.6)
    assert hi - m == pytest.approx(sps.norm.ppf(0.975) / math.sqrt(w.sum()))
    assert m - lo == pytest.approx(hi - m)


def test_pooled_interval_random_effects_widen_with_heterogeneity():
    """DerSimonian-Laird tau^2 from Cochran's Q, checked against the formula computed here."""
    x = np.array([0.55, 0.62, 0.58, 0.66, 0.6])
    se = np.array([0.01, 0.012, 0.01, 0.011, 0.009])
    w = 1 / se**2
    m_fe = (w * x).sum() / w.sum()
    q = (w * (x - m_fe) ** 2).sum()
    tau2 = max(0.0, (q - (len(x) - 1)) / (w.sum() - (w**2).sum() / w.sum()))
    ws = 1 / (se**2 + tau2)
    m_re = (ws * x).sum() / ws.sum()
    m, lo, hi = stats.pooled_interval(list(x), list(se))
    assert tau2 > 0 and m == pytest.approx(m_re)
    assert hi - m >= sps.norm.ppf(0.975) / math.sqrt(ws.sum()) - 1e-12
    assert lo < 0.6 < hi


def test_pooled_interval_drops_uninformative_tensors():
    m, lo, hi = stats.pooled_interval([0.6, 5.0], [0.01, float("inf")])
    assert m == pytest.approx(0.6)
    assert hi - m == pytest.approx(sps.norm.ppf(0.975) * 0.01)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (79, 100), (100, 100), (1, 128)])
def test_wilson_matches_scipy(k, n):
    p, lo, hi = stats.wilson(k, n)
    ci = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert p == pytest.approx(k / n)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_empty():
    assert stats.wilson(0, 0) == (0.0, 0.0, 1.0)


def test_format_p():
    assert stats.format_p(-400) == "p < 1e-300"
    assert stats.format_p(-12.4) == "p = 1e-12"
    assert stats.format_p(math.log10(0.05)) == "p = 0.05"
