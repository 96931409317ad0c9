"""Recipe fits for one slot, all closed-form functions of the streamed Gram sums.

`fit_slot` tries the linear family (linear, task arithmetic, model stock), SLERP (per-row angle, as mergekit does)
and the sparse family (TIES, DARE, breadcrumbs, DELLA: exact zeros of suspect - base, and whether survival depends on
magnitude), and returns the simplest recipe that explains the suspect down to its storage rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from modeltrace.detectors import lsq, rounding
from modeltrace.detectors.accumulate import SlotStats

#: A recipe "explains" a tensor when its residual is within this factor of the storage rounding floor
#: (mergekit computes in float32 then rounds once; a wrong recipe is orders of magnitude above).
FLOOR_FACTOR = 6.0
#: A re-encoded copy is rejected when more candidates cut the residual by more than this many times the share a
#: useless extra regressor removes by chance (k / numel).
COPY_GAIN_FACTOR = 50.0
#: Unexplained tensors still read as a linear merge (plus noise or further training) when at least two candidates
#: carry this weight and the fit explains this share of the centred variance.
NOISY_MIN_WEIGHT, NOISY_MIN_R2 = 0.1, 0.5
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
    #: standard error of each weight on this slot (inf: not identifiable here, e.g. the parents are equal)
    se: dict[int, float] = field(default_factory=dict)


def _solve(G: np.ndarray, idx: list[int]) -> tuple[np.ndarray, float]:
    """Least squares of model 0 on models idx: (weights, rss)."""
    if not idx:
        return np.zeros(0), float(G[0, 0])
    A = G[np.ix_(idx, idx)]
    b = G[idx, 0]
    w = np.linalg.lstsq(A, b, rcond=1e-12)[0]
    rss = float(G[0, 0] - 2 * w @ b + w @ A @ w)
    return w, max(rss, 0.0)


def slerp_coefficients(g: np.ndarray, ia: int, ib: int, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """mergekit's SLERP coefficients for models ia (t=0) and ib (t=1) given their Gram g, at interpolation t.

    The angle is measured between the whole flattened tensors (mergekit 0.1.5 as run on real checkpoints; verified
    against its output), and nearly collinear tensors fall back to linear interpolation."""
    na, nb = math.sqrt(max(g[ia, ia], 0)), math.sqrt(max(g[ib, ib], 0))
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = float(np.clip(g[ia, ib] / (na * nb), -1, 1))
    t = np.asarray(t, dtype=float)
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(dot)
    return np.sin((1 - t) * theta) / math.sin(theta), np.sin(t * theta) / math.sin(theta)


def slerp_rss(st: SlotStats, ia: int, ib: int, ts: np.ndarray) -> np.ndarray:
    ca, cb = slerp_coefficients(st.G, ia, ib, ts)
    return lsq.rss(st, [{ia: float(a), ib: float(b)} for a, b in zip(ca, cb, strict=True)])


def fit_slerp(st: SlotStats, ia: int, ib: int) -> tuple[float, float]:
    """Best t in [0, 1] and its residual (coarse grid, then refined)."""
    ts = np.linspace(0, 1, 101)
    r = slerp_rss(st, ia, ib, ts)
    i = int(np.argmin(r))
    ts2 = np.linspace(ts[max(i - 1, 0)], ts[min(i + 1, len(ts) - 1)], 201)
    r2 = slerp_rss(st, ia, ib, ts2)
    j = int(np.argmin(r2))
    return float(ts2[j]), max(float(r2[j]), 0.0)


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
    # 1. An exact copy of one candidate (byte-level equality of values; all-zero and constant tensors included:
    #    equal values are the evidence they are, whatever their information), or a re-encoding of one: every value
    #    equal to the candidate's rounded to the suspect's storage dtype.
    for c in cands:
        if st.equal[c] == st.numel:
            return SlotFit("copy", {c: 1.0}, 0.0, True, {}, {c: 1.0}, 0.0)
    for c in cands:
        if st.requal is not None and st.numel and st.requal[c] == st.numel:
            rel_c = float(st.sqdist()[0, c]) / g00 if g00 > 0 else 0.0
            return SlotFit("copy", {c: 1.0}, rel_c, True, {"rounded": 1.0}, {c: 1.0}, rel_c)
    if g00 <= 0:
        return SlotFit("empty", {}, 0.0, True)
    w_free, rss_free = lsq.solve(st, cands)
    free = {c: float(w) for c, w in zip(cands, w_free, strict=True)}
    # storage noise of the suspect, plus that of quantized candidates as the fit carries it (weight^2 x noise);
    # their noise also attenuates the weights (errors in variables: see the verdict's warning)
    cand = 0.0 if st.cand_noise is None else sum(max(free[c] ** 2, 1.0 if len(cands) == 1 else 0.0)
                                                  * float(st.cand_noise[c]) for c in cands)
    floor = FLOOR_FACTOR * (st.noise_floor + cand) + 1e-12 * g00
    rel = rss_free / g00

    def result(method: str, weights: dict[int, float], rss: float, **params: float) -> SlotFit:
        return SlotFit(method, weights, rss / g00, rss <= floor, params, free, rel)

    # 2. A single candidate re-encoded (values equal up to rounding), unless the candidates together fit
    #    significantly better: coarse storage (fp8, 4-bit) can hide a merge's parents' difference below its floor,
    #    yet over many elements the improvement of a real second parent stands far above chance (~ k / numel).
    for c in cands:
        rss_c = float(st.sqdist()[0, c])
        gain = (rss_c - rss_free) / max(rss_free, 1e-300)
        if rss_c <= floor and (len(cands) == 1 or gain <= COPY_GAIN_FACTOR * len(cands) / max(st.numel, 1)):
            return result("copy", {c: 1.0}, rss_c)
    parents = [c for c in cands if c != base]
    # 3. SLERP between two models (mergekit calls one of them the base): the angle is per row, so SLERP can
    #    explain the suspect where every per-tensor linear fit leaves a residual.
    pair = cands if len(cands) == 2 else (parents if len(parents) == 2 else None)
    if pair is not None:
        if base in pair:  # orient as mergekit does: t = 0 is the base model
            pair = [base] + [c for c in pair if c != base]
        t, rss_s = fit_slerp(st, pair[0], pair[1])
        w_n, rss_n = lsq.solve(st, list(pair), sum1=True)
        if rss_s <= floor and rss_s < 0.5 * rss_n:
            return result("slerp", {pair[0]: 1 - t, pair[1]: t}, rss_s, t=t)
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
        used = [c for c in cands if abs(free[c]) > 1e-3] or cands
        w_n, rss_n, se_n = lsq.solve_se(st, used, sum1=True)
        if rss_n <= floor:
            return _rounded(st, result("linear", {c: float(w) for c, w in zip(used, w_n, strict=True)}, rss_n,
                                       sum_weights=1.0, normalized=1.0), used, se_n)
        _, _, se_f = lsq.solve_se(st, cands)
        return _rounded(st, result("linear", free, rss_free, sum_weights=sum(free.values()), normalized=0.0),
                        cands, se_f)
    # 5. Sparse task-vector merges: suspect == base exactly where every parent changed the weight, and the
    #    suspect's delta is still mostly a combination of the parents' task vectors.
    if base is not None and parents and st.active_all > 1000:
        zero_active = st.zero_active_all / st.active_all
        r2_delta = _delta_r2(st, parents, base)
        if zero_active > 0.04 and r2_delta > 0.5:
            return _sparse_fit(st, parents, base, free, rss_free, zero_active, r2_delta)
        outliers = _outlier_weights(st, parents)
        if r2_delta > 0.8 and outliers is not None and outliers < 0.3:
            fit = _sparse_fit(st, parents, base, free, rss_free, zero_active, r2_delta)
            fit.method = "breadcrumbs"
            fit.weights = _kept_weights(st, parents, normalized=False) or fit.weights
            fit.params["outlier_weight_ratio"] = outliers
            return fit
    # 6. Not a recipe over these candidates: a fine-tune (one dominant candidate), a merge under noise or further
    #    training (two or more parents still carry weight and explain most of the tensor), or unexplained.
    dom = max(cands, key=lambda c: abs(st.corr(c)))
    if abs(st.corr(dom)) > 0.3 and abs(free[dom]) > 0.5 and sum(abs(free[c]) for c in cands if c != dom) < 0.35:
        return result("finetune", {dom: free[dom]}, rss_free)
    heavy = [c for c in cands if abs(free[c]) >= NOISY_MIN_WEIGHT]
    if base is None and len(heavy) >= 2 and _centred_r2(st, cands) >= NOISY_MIN_R2:
        used = [c for c in cands if abs(free[c]) > 1e-3]
        w_n, rss_n = lsq.solve(st, used, sum1=True)
        if abs(sum(free.values()) - 1) < 0.05 and rss_n <= 1.05 * rss_free:
            return result("linear", {c: float(w) for c, w in zip(used, w_n, strict=True)}, rss_n, sum_weights=1.0,
                          normalized=1.0, noisy=1.0)
        return result("linear", free, rss_free, sum_weights=sum(free.values()), normalized=0.0, noisy=1.0)
    return result("unexplained", free, rss_free)


#: Standard errors never go below this: weights are applied in float32 (float32(0.7) = 0.69999999), so a recipe
#: weight is resolved to about 2^-23 of its size, however many elements agree.
SE_FLOOR = 2.0**-23


def _rounded(st: SlotStats, fit: SlotFit, used: list[int], se: np.ndarray) -> SlotFit:
    """Attach standard errors, and where the suspect's storage rounding biases least squares (bf16/fp16/fp8 and
    two or more parents), replace the weights with the rounding-aware fit (detectors.rounding)."""
    fit.se = {c: max(float(v), SE_FLOOR * max(1.0, abs(fit.weights.get(c, 0.0)))) for c, v in zip(used, se,
                                                                                                  strict=True)}
    if len(used) < 2 or st.sample is None or st.suspect_dtype not in rounding.ROUNDED:
        return fit
    start = np.array([fit.weights.get(c, 0.0) for c in used])
    rf = rounding.fit(st.sample, used, st.suspect_dtype, start)
    if rf is None or not np.all(np.isfinite(rf.weights)):
        return fit
    w = {c: float(v) for c, v in zip(used, rf.weights, strict=True)}
    if fit.params.get("normalized"):
        total = sum(w.values())
        if abs(total - 1) > 0.05:  # the rounding fit disagrees with the normalised recipe: keep least squares
            return fit
    fit.weights = w
    fit.se = {c: max(float(v), SE_FLOOR * max(1.0, abs(w[c]))) for c, v in zip(used, rf.se, strict=True)}
    fit.params["rounding_fit"] = 1.0
    fit.params["rounding_sigma"] = rf.sigma
    return fit


def _centred_r2(st: SlotStats, cands: list[int]) -> float:
    """Share of the suspect's double-centred variance the free fit explains (centring removes shared offsets)."""
    if st.Gc[0, 0] <= 0:
        return 0.0
    _, rss = _solve(st.Gc, cands)
    return 1 - rss / st.Gc[0, 0]


def _model_stock(st: SlotStats, parents: list[int], base: int, lam: dict[int, float]) -> float | None:
    """Model Stock's t = k cos / (1 + (k - 1) cos), cos the mean angle between task vectors; None if no match."""
    if len(parents) < 2:
        return None
    combos = np.zeros((st.n, st.n))
    for i in range(st.n):
        combos[i, i] += 1
        combos[i, base] -= 1
    D = lsq.gram_of(st, combos)

    def tau_dot(i: int, j: int) -> float:
        return float(D[i, j])

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
    allh = st.hist_all[i].astype(float)
    dropped = st.hist_dropped[i].astype(float)
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
    excess = (rss_imposed - rss_c) / max(st.G_conflict[0, 0], 1e-300)
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
