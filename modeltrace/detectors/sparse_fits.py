"""The sparse family's fit (TIES, DARE linear/TIES, DELLA, breadcrumbs), from the statistics the streaming pass keeps
for task-vector merges: exact zeros of suspect - base where parents changed the weight, magnitude histograms of what
survived, Gram sums where parents agree or conflict in sign, on their top entries and where both survived.

Data flow: modeltrace/methods' Sparse method calls `fit_sparse` from fit_slot's FitContext; the result names the
member of the family the statistics point to. Memory: a few n x n matrices per slot.
"""

from __future__ import annotations

import numpy as np

from modeltrace.detectors import lsq
from modeltrace.detectors.accumulate import SlotStats
from modeltrace.detectors.fits import FitContext, SlotFit, _solve

__all__ = ["DELTA_R2_SHARE", "fit_sparse", "magnitude_threshold_density", "top_zero_ratio"]

#: A sparse merge's delta (suspect - base) is explained by the parents' task vectors to R^2 = its density p for DARE
#: (each kept entry rescaled by 1/p: the variance is 1/p times what the span explains), more for TIES (the top
#: entries kept). With k parents, p = 1 - zero_active^(1/k), zero_active the share of entries equal to the base
#: where every parent changed. Half of that is asked (a fixed 0.5 missed every DARE of density <= 0.5).
DELTA_R2_SHARE = 0.5


def fit_sparse(ctx: FitContext) -> SlotFit | None:
    """Sparse task-vector merges: suspect == base exactly where every parent changed the weight, and the suspect's
    delta still mostly a combination of the parents' task vectors; or every entry used but the parents' outliers
    removed (breadcrumbs). None when neither holds or there is no base."""
    st, base, parents = ctx.st, ctx.base, ctx.parents
    if base is None or not parents or st.active_all <= 1000:
        return None
    zero_active = st.zero_active_all / st.active_all
    r2_delta = _delta_r2(st, parents, base)
    if zero_active > 0.04 and r2_delta > DELTA_R2_SHARE * (1 - zero_active ** (1 / len(parents))):
        return _sparse_fit(st, parents, base, ctx.free, ctx.rss_free, zero_active, r2_delta)
    outliers = _outlier_weights(st, parents)
    if r2_delta > 0.8 and outliers is not None and outliers < 0.3:
        fit = _sparse_fit(st, parents, base, ctx.free, ctx.rss_free, zero_active, r2_delta)
        fit.method = "breadcrumbs"
        fit.weights = _kept_weights(st, parents, normalized=False) or fit.weights
        fit.params["outlier_weight_ratio"] = outliers
        return fit
    return None


def magnitude_threshold_density(st: SlotStats, i: int) -> float:
    """TIES density of parent i: share of its entries above the smallest magnitude that always survives."""
    dropped = st.hist_dropped[i]
    allh: np.ndarray = st.hist_all[i].astype(float)
    nz = np.nonzero(dropped)[0]
    if len(nz) == 0 or allh.sum() == 0:
        return 1.0
    # Highest bin that still has dropped entries (ignore a stray tail of <0.1% of drops).
    cum = np.cumsum(dropped[::-1])
    cut = len(dropped) - 1 - int(np.searchsorted(cum, 0.001 * dropped.sum(), side="right"))
    above = allh[cut + 1:].sum() + 0.5 * allh[cut]
    return float(above / (st.detail_numel or st.numel))


def _delta_r2(st: SlotStats, parents: list[int], base: int) -> float:
    """R^2 of (suspect - base) regressed on the parents' task vectors (parent - base)."""
    idx = [0] + parents
    T = np.zeros((len(idx), st.n))
    for r, i in enumerate(idx):
        T[r, i] = 1
        T[r, base] -= 1
    D = lsq.gram_of(st, T)
    if D[0, 0] <= 0:
        return 0.0
    _, rss = _solve(D, list(range(1, len(idx))))
    return 1 - rss / D[0, 0]


def _outlier_weights(st: SlotStats, parents: list[int]) -> float | None:
    """Largest ratio, over parents, of a parent's weight fitted on its own top-1% entries to its weight elsewhere.

    ~1 when every entry of a task vector is used; ~0 when its outliers were removed (Model Breadcrumbs)."""
    if st.G_outlier is None or st.G_agree is None or st.G_agree[0, 0] <= 0:
        return None
    k = len(parents)
    idx = list(range(1, k + 1))
    wa, _ = _solve(st.G_agree, idx)
    ratios = []
    for j in range(k):
        g = st.G_outlier[j]
        if g[j + 1, j + 1] <= 0 or abs(wa[j]) < 1e-6:
            return None
        wo, _ = _solve(g, idx)
        ratios.append(wo[j] / wa[j])
    return float(max(ratios))


def top_zero_ratio(st: SlotStats, i: int, top: float = 0.1) -> float:
    """P(suspect == base | parent i's |tau| in its top decile) / P(suspect == base | tau != 0).

    0 for magnitude trimming (TIES keeps the top entries), ~1 for random dropping (DARE), in between for
    magnitude-ranked random dropping (DELLA)."""
    allh: np.ndarray = st.hist_all[i].astype(float)
    dropped: np.ndarray = st.hist_dropped[i].astype(float)
    total, zeros = allh.sum(), dropped.sum()
    if total == 0 or zeros == 0:
        return float("nan")
    cum = np.cumsum(allh[::-1])
    nb = int(np.searchsorted(cum, top * total)) + 1
    return float((dropped[::-1][:nb].sum() / allh[::-1][:nb].sum()) / (zeros / total))


def _sign_election(st: SlotStats, k: int) -> tuple[dict[int, float], float]:
    """Task-vector weights fitted where parents agree in sign, and how differently the conflict entries behave.

    Without sign election (dare_linear) one set of weights fits both; with it (TIES, dare_ties, DELLA) the minority
    sign is dropped, so the weights fitted on conflicting entries differ."""
    if st.G_agree is None or st.G_conflict is None or st.G_agree[0, 0] <= 0:
        return {}, float("nan")
    idx = list(range(1, k + 1))
    wa, _ = _solve(st.G_agree, idx)
    if st.G_conflict[0, 0] <= 0:
        return {i: float(w) for i, w in zip(idx, wa, strict=True)}, float("nan")
    wc, rss_c = _solve(st.G_conflict, idx)
    # residual on conflicting entries when the agree-fitted weights are imposed, relative to their own fit
    b = st.G_conflict[idx, 0]
    A = st.G_conflict[np.ix_(idx, idx)]
    rss_imposed = float(st.G_conflict[0, 0] - 2 * wa @ b + wa @ A @ wa)
    excess = (rss_imposed - rss_c) / max(float(st.G_conflict[0, 0]), 1e-300)
    return {i: float(w) for i, w in zip(idx, wa, strict=True)}, float(excess + float(np.abs(wc - wa).max()))


def _kept_weights(st: SlotStats, parents: list[int], normalized: bool = True) -> dict[int, float] | None:
    """Weights of a two-parent sparse merge from the entries both parents kept (accumulate._kept_by_all), where
    delta = sum_i w_i c_i tau_i / sum_i w_i with sign election and normalisation (TIES: c_i = 1; DELLA: c_i its
    survivor rescale) or sum_i w_i tau_i without (breadcrumbs: lone survivors carry w_i tau_i, so c_i = w_i).
    Normalised, the fitted coefficient a_i over c_i is w_i / sum w; else a_i is w_i and a_i / c_i is 1. None for
    other than two parents, too few such entries, or coefficients not of that form."""
    if len(parents) != 2 or st.G_kept is None or not st.rescale or st.G_kept[0, 0] <= 0:
        return None
    if min(st.rescale) <= 0 or min(st.G_kept[1, 1], st.G_kept[2, 2]) <= 0:
        return None
    a, _ = _solve(st.G_kept, [1, 2])
    w = [float(a[j] / st.rescale[j]) for j in range(2)]
    if not normalized:
        return {c: float(a[j]) for j, c in enumerate(parents)} if max(abs(x - 1) for x in w) <= 0.15 else None
    if abs(sum(w) - 1) > 0.15:
        return None
    return {c: w[j] / sum(w) for j, c in enumerate(parents)}


def _sparse_fit(st: SlotStats, parents: list[int], base: int, free: dict[int, float], rss_free: float,
                zero_active: float, r2_delta: float) -> SlotFit:
    k = len(parents)
    ratios = [top_zero_ratio(st, p) for p in parents]
    ratio = float(np.nanmean(ratios)) if not all(np.isnan(ratios)) else float("nan")
    agree_w, election = _sign_election(st, k)
    lam = {c: agree_w.get(j + 1, free[c]) for j, c in enumerate(parents)}
    params: dict[str, float] = {"zero_fraction": zero_active, "top_zero_ratio": ratio, "delta_r2": r2_delta,
                                "sign_election": election}
    elected = bool(election > 0.05) if np.isfinite(election) else False
    if ratio <= 0.05:
        method = "ties"
        params["density"] = float(np.mean([magnitude_threshold_density(st, p) for p in parents]))
        # Where every parent is in its top decile and signs agree, TIES keeps all of them and takes their
        # weighted mean: the fit there gives the weights (normalized to sum 1, as mergekit's default normalize).
        if st.G_top is not None:
            from modeltrace.detectors.accumulate import TOP_LEVELS

            need = 1 - params["density"] + 0.01
            level = next((i for i, q in enumerate(TOP_LEVELS) if q >= need), len(TOP_LEVELS) - 1)
            if st.G_top[level, 0, 0] > 0:
                wt, _ = _solve(st.G_top[level], list(range(1, k + 1)))
                lam = {c: float(wt[j]) for j, c in enumerate(parents)}
        # ... and with two parents, every entry both kept says the same, far more of them (_kept_weights)
        lam = _kept_weights(st, parents) or lam
    elif ratio >= 0.75:
        method = "dare_ties" if elected else "dare_linear"
        params["density"] = float(1 - zero_active ** (1 / k))
    elif ratio >= 0.2:
        method = "della"
        params["density"] = float(1 - zero_active ** (1 / k))
        kept = _kept_weights(st, parents)
        if kept is not None:
            lam = kept
    else:
        method = "sparse"
    g00 = st.G[0, 0]
    return SlotFit(method, lam, rss_free / g00, False, params, free, rss_free / g00)
