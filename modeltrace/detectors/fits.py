"""Recipe fits for one slot, all closed-form functions of the streamed Gram sums.

`fit_slot` tries the linear family (linear, task arithmetic, model stock), SLERP (per-row angle, as mergekit does)
and the sparse family (TIES, DARE, breadcrumbs, DELLA: exact zeros of suspect - base, and whether survival depends on
magnitude), and returns the simplest recipe that explains the suspect down to its storage rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from modeltrace.detectors.accumulate import SlotStats

#: A recipe "explains" a tensor when its residual is within this factor of the storage rounding floor
#: (mergekit computes in float32 then rounds once; a wrong recipe is orders of magnitude above).
FLOOR_FACTOR = 6.0
#: mergekit falls back to linear interpolation for rows this collinear.
SLERP_DOT_THRESHOLD = 0.9995


@dataclass
class SlotFit:
    method: str  # linear | task_arithmetic | model_stock | slerp | sparse-* | finetune | copy | unexplained
    weights: dict[int, float]  # candidate index -> weight (linear family) or lambda (task arithmetic)
    rel_rss: float  # residual / ||S||^2 of the chosen recipe
    explained: bool
    params: dict[str, float] = field(default_factory=dict)
    free_weights: dict[int, float] = field(default_factory=dict)
    free_rel_rss: float = 1.0


def _solve(G: np.ndarray, idx: list[int]) -> tuple[np.ndarray, float]:
    """Least squares of model 0 on models idx: (weights, rss)."""
    if not idx:
        return np.zeros(0), float(G[0, 0])
    A = G[np.ix_(idx, idx)]
    b = G[idx, 0]
    w = np.linalg.lstsq(A, b, rcond=1e-12)[0]
    rss = float(G[0, 0] - 2 * w @ b + w @ A @ w)
    return w, max(rss, 0.0)


def _solve_sum1(G: np.ndarray, idx: list[int]) -> tuple[np.ndarray, float]:
    """Least squares with weights summing to one (a normalized linear merge)."""
    k = len(idx)
    A = G[np.ix_(idx, idx)]
    b = G[idx, 0]
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = A
    kkt[:k, k] = 1
    kkt[k, :k] = 1
    rhs = np.concatenate([b, [1.0]])
    sol = np.linalg.lstsq(kkt, rhs, rcond=1e-12)[0]
    w = sol[:k]
    rss = float(G[0, 0] - 2 * w @ b + w @ A @ w)
    return w, max(rss, 0.0)


def slerp_coefficients(g: np.ndarray, ia: int, ib: int, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """mergekit's per-row SLERP coefficients for blocks of Grams g (blocks, n, n) at interpolation t."""
    na = np.sqrt(np.maximum(g[:, ia, ia], 0))
    nb = np.sqrt(np.maximum(g[:, ib, ib], 0))
    na = np.where(na > 1e-8, na, 1.0)
    nb = np.where(nb > 1e-8, nb, 1.0)
    dot = np.clip(g[:, ia, ib] / (na * nb), -1, 1)
    lin = np.abs(dot) > SLERP_DOT_THRESHOLD
    theta = np.arccos(np.where(lin, 0.0, dot))
    sin_t = np.where(lin, 1.0, np.sin(theta))
    t = np.asarray(t, dtype=float)[..., None]
    ca = np.where(lin, 1 - t, np.sin((1 - t) * theta) / sin_t)
    cb = np.where(lin, t, np.sin(t * theta) / sin_t)
    return ca, cb


def slerp_rss(g: np.ndarray, ia: int, ib: int, ts: np.ndarray) -> np.ndarray:
    """Total residual of SLERP(t) for each t in ts, summed over blocks."""
    ca, cb = slerp_coefficients(g, ia, ib, ts)
    rss = (g[:, 0, 0] - 2 * (ca * g[:, 0, ia] + cb * g[:, 0, ib]) + ca * ca * g[:, ia, ia]
           + 2 * ca * cb * g[:, ia, ib] + cb * cb * g[:, ib, ib])
    return rss.sum(axis=-1)


def fit_slerp(st: SlotStats, ia: int, ib: int) -> tuple[float, float]:
    """Best t in [0, 1] and its residual (coarse grid, then refined)."""
    if st.blocks.shape[0] == 0:
        return 0.0, float("inf")
    ts = np.linspace(0, 1, 101)
    r = slerp_rss(st.blocks, ia, ib, ts)
    i = int(np.argmin(r))
    lo, hi = ts[max(i - 1, 0)], ts[min(i + 1, len(ts) - 1)]
    ts2 = np.linspace(lo, hi, 201)
    r2 = slerp_rss(st.blocks, ia, ib, ts2)
    j = int(np.argmin(r2))
    return float(ts2[j]), max(float(r2[j]), 0.0)


def magnitude_auc(st: SlotStats, i: int) -> float:
    """P(|tau| of a surviving entry > |tau| of a dropped one): ~0.5 random drop (DARE), ~1 magnitude (TIES)."""
    kept, dropped = st.hist_kept[i].astype(float), st.hist_dropped[i].astype(float)
    nk, nd = kept.sum(), dropped.sum()
    if nk == 0 or nd == 0:
        return float("nan")
    cum_d = np.cumsum(dropped) - dropped  # dropped entries strictly below each bin
    return float((kept * (cum_d + 0.5 * dropped)).sum() / (nk * nd))


def top_dropped_fraction(st: SlotStats, i: int, top: float = 0.005) -> float:
    """Share of the largest |tau| entries that were dropped: high only for breadcrumbs (outliers removed)."""
    allh = st.hist_all[i].astype(float)
    total = allh.sum()
    if total == 0:
        return float("nan")
    cum = np.cumsum(allh[::-1])
    nb = int(np.searchsorted(cum, top * total)) + 1
    top_all = allh[::-1][:nb].sum()
    top_dropped = st.hist_dropped[i][::-1][:nb].sum()
    return float(top_dropped / top_all) if top_all else float("nan")


def magnitude_threshold_density(st: SlotStats, i: int) -> float:
    """TIES density of parent i: share of its entries above the smallest magnitude that always survives."""
    dropped = st.hist_dropped[i]
    allh = st.hist_all[i].astype(float)
    nz = np.nonzero(dropped)[0]
    if len(nz) == 0 or allh.sum() == 0:
        return 1.0
    # Highest bin that still has dropped entries (ignore a stray tail of <0.1% of drops).
    cum = np.cumsum(dropped[::-1])
    cut = len(dropped) - 1 - int(np.searchsorted(cum, 0.001 * dropped.sum(), side="right"))
    above = allh[cut + 1:].sum() + 0.5 * allh[cut]
    return float(above / (st.detail_numel or st.numel))


def fit_slot(st: SlotStats, cands: list[int], base: int | None) -> SlotFit:
    """Choose the simplest recipe that explains suspect slot `st` from candidates `cands` (indices into st)."""
    g00 = st.G[0, 0]
    if g00 <= 0:
        return SlotFit("empty", {}, 0.0, True)
    floor = FLOOR_FACTOR * st.noise_floor + 1e-12 * g00
    w_free, rss_free = _solve(st.G, cands)
    free = {c: float(w) for c, w in zip(cands, w_free, strict=True)}
    rel = rss_free / g00

    def result(method: str, weights: dict[int, float], rss: float, **params: float) -> SlotFit:
        return SlotFit(method, weights, rss / g00, rss <= floor, params, free, rel)

    # 1. An exact copy of one candidate (byte-level equality of values).
    for c in cands:
        if st.equal[c] == st.numel:
            return result("copy", {c: 1.0}, 0.0)
    # 2. A single candidate re-encoded (values equal up to rounding).
    for c in cands:
        rss_c = float(st.G[0, 0] - 2 * st.G[0, c] + st.G[c, c])
        if rss_c <= floor:
            return result("copy", {c: 1.0}, rss_c)
    parents = [c for c in cands if c != base]
    # 3. SLERP between two parents (no base weight): angle per row, so it can beat the per-tensor linear fit.
    if len(parents) == 2 and st.Gd is not None:
        # Judged on the rows that carry per-row Grams (all rows for small tensors, a spread subset otherwise).
        t, rss_s = fit_slerp(st, parents[0], parents[1])
        w_n, rss_n = _solve_sum1(st.Gd, parents)
        floor_d = FLOOR_FACTOR * st.detail_noise_floor + 1e-12 * st.Gd[0, 0]
        if rss_s <= floor_d and rss_s < 0.9 * rss_n:
            return SlotFit("slerp", {parents[0]: 1 - t, parents[1]: t}, rss_s / st.Gd[0, 0], True, {"t": t}, free, rel)
    # 4. The linear family, when the free fit explains the suspect.
    if rss_free <= floor:
        if base is not None and abs(free[base]) > 0.01:
            lam = {c: free[c] for c in parents}
            s = sum(free.values())
            if abs(s - 1) < 0.01:
                ms = _model_stock(st, parents, base, lam)
                if ms is not None:
                    return result("model_stock", lam, rss_free, t=ms)
                return result("task_arithmetic", lam, rss_free, sum_weights=s)
            return result("linear", free, rss_free, sum_weights=s)
        used = [c for c in cands if abs(free[c]) > 1e-3]
        w_n, rss_n = _solve_sum1(st.G, used or cands)
        if rss_n <= floor:
            return result("linear", {c: float(w) for c, w in zip(used or cands, w_n, strict=True)}, rss_n,
                          sum_weights=1.0, normalized=1.0)
        return result("linear", free, rss_free, sum_weights=sum(free.values()), normalized=0.0)
    # 5. Sparse task-vector merges: suspect == base exactly where every parent changed the weight.
    if base is not None and parents and st.active_all > 1000:
        zero_active = st.zero_active_all / st.active_all
        if zero_active > 0.05:
            return _sparse_fit(st, parents, base, free, rss_free, zero_active)
    # 6. Not a recipe over these candidates: a fine-tune (one dominant candidate) or unexplained.
    dom = max(cands, key=lambda c: abs(st.corr(c)))
    if abs(st.corr(dom)) > 0.3 and abs(free[dom]) > 0.5 and sum(abs(free[c]) for c in cands if c != dom) < 0.35:
        return result("finetune", {dom: free[dom]}, rss_free)
    return result("unexplained", free, rss_free)


def _model_stock(st: SlotStats, parents: list[int], base: int, lam: dict[int, float]) -> float | None:
    """Model Stock's t = k cos / (1 + (k - 1) cos), cos the mean angle between task vectors; None if no match."""
    if len(parents) < 2:
        return None
    G = st.G

    def tau_dot(i: int, j: int) -> float:
        return G[i, j] - G[i, base] - G[j, base] + G[base, base]

    coss = []
    for a in range(len(parents)):
        for b in range(a + 1, len(parents)):
            i, j = parents[a], parents[b]
            den = math.sqrt(max(tau_dot(i, i), 0) * max(tau_dot(j, j), 0))
            coss.append(tau_dot(i, j) / max(den, 1e-6))
    cos = float(np.clip(np.mean(coss), -1, 1))
    k = len(parents)
    den = 1 + (k - 1) * cos
    if abs(den) < 1e-6:
        return None
    t = k * cos / den
    if all(abs(v - t / k) < 0.01 for v in lam.values()):
        return t
    return None


def _sparse_fit(st: SlotStats, parents: list[int], base: int, free: dict[int, float], rss_free: float,
                zero_active: float) -> SlotFit:
    aucs = [magnitude_auc(st, p) for p in parents]
    auc = float(np.nanmean(aucs)) if not all(np.isnan(aucs)) else float("nan")
    top_drop = float(np.nanmean([top_dropped_fraction(st, p) for p in parents]))
    k = len(parents)
    lam = {c: free[c] for c in parents}
    params: dict[str, float] = {"zero_fraction": zero_active, "magnitude_auc": auc, "top_dropped": top_drop}
    if top_drop > 0.5 and auc > 0.55:
        method = "breadcrumbs"
    elif auc >= 0.9:
        method = "ties"
        params["density"] = float(np.mean([magnitude_threshold_density(st, p) for p in parents]))
    elif auc <= 0.6:
        method = "dare"
        params["density"] = float(1 - zero_active ** (1 / k))
    else:
        method = "della"
        params["density"] = float(1 - zero_active ** (1 / k))
    g00 = st.G[0, 0]
    return SlotFit(method, lam, rss_free / g00, False, params, free, rss_free / g00)
