"""Recipe fits for one slot, all closed-form functions of the streamed Gram sums.

`fit_slot` tests copies and re-encodings, then asks each registered merge method (modeltrace/methods; it passes
them in) to fit itself from a `FitContext`, simplest first: SLERP (`fit_spherical`, per-tensor angle as mergekit
does), the linear family (`fit_task_vectors`, `fit_linear`) and the sparse family (sparse_fits.py: TIES, DARE,
breadcrumbs, DELLA from exact zeros of suspect - base and whether survival depends on magnitude). It returns the
simplest recipe that explains the suspect down to its storage rounding, else a fine-tune, a merge under noise, or
unexplained. Memory: a few n x n matrices per slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

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


class Fitter(Protocol):
    """What fit_slot asks of a merge method (modeltrace/methods registers them): a name, a place in the order of
    simplicity, and a fit that returns the recipe when this method explains the slot, else None."""

    @property
    def name(self) -> str: ...

    @property
    def fit_order(self) -> float | None: ...

    def fit(self, ctx: FitContext) -> SlotFit | None: ...


@dataclass(frozen=True)
class FitContext:
    """One slot as every method's fit reads it: the statistics, the candidates (indices into st; `base` among them
    or None), the free least-squares fit on all of them, and the residual floor a recipe must reach."""

    st: SlotStats
    cands: list[int]
    base: int | None
    free: dict[int, float]
    rss_free: float
    floor: float
    #: run the rounding-aware weight fit where it applies (the audit runs it on a spread subset of a huge plan)
    refine: bool = True

    @property
    def parents(self) -> list[int]:
        return [c for c in self.cands if c != self.base]

    def result(self, method: str, weights: dict[int, float], rss: float, **params: float) -> SlotFit:
        g00 = self.st.G[0, 0]
        return SlotFit(method, weights, rss / g00, rss <= self.floor, params, self.free, self.rss_free / g00)


def fit_slot(st: SlotStats, cands: list[int], base: int | None, methods: Sequence[Fitter] = (),
             refine: bool = True) -> SlotFit:
    """Choose the simplest recipe that explains suspect slot `st` from candidates `cands` (indices into st): a copy
    or re-encoding first, then each of `methods` in their order (modeltrace.methods.fitting_order(): SLERP, the
    linear family, the sparse family), then a fine-tune, a merge under noise, or unexplained."""
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
    ctx = FitContext(st, cands, base, free, rss_free, FLOOR_FACTOR * (st.noise_floor + cand) + 1e-12 * g00, refine)
    # 2. A single candidate re-encoded (values equal up to rounding), unless the candidates together fit
    #    significantly better: coarse storage (fp8, 4-bit) can hide a merge's parents' difference below its floor,
    #    yet over many elements the improvement of a real second parent stands far above chance (~ k / numel).
    for c in cands:
        rss_c = float(st.sqdist()[0, c])
        gain = (rss_c - rss_free) / max(rss_free, 1e-300)
        if rss_c <= ctx.floor and (len(cands) == 1 or gain <= COPY_GAIN_FACTOR * len(cands) / max(st.numel, 1)):
            return ctx.result("copy", {c: 1.0}, rss_c)
    # 3. The registered merge methods, simplest first.
    for method in methods:
        fit = method.fit(ctx)
        if fit is not None:
            return fit
    # 4. Not a recipe over these candidates: a fine-tune (one dominant candidate), a merge under noise or further
    #    training (two or more parents still carry weight and explain most of the tensor), or unexplained.
    dom = max(cands, key=lambda c: abs(st.corr(c)))
    if abs(st.corr(dom)) > 0.3 and abs(free[dom]) > 0.5 and sum(abs(free[c]) for c in cands if c != dom) < 0.35:
        return ctx.result("finetune", {dom: free[dom]}, rss_free)
    heavy = [c for c in cands if abs(free[c]) >= NOISY_MIN_WEIGHT]
    if base is None and len(heavy) >= 2 and _centred_r2(st, cands) >= NOISY_MIN_R2:
        used = [c for c in cands if abs(free[c]) > 1e-3]
        w_n, rss_n = lsq.solve(st, used, sum1=True)
        if abs(sum(free.values()) - 1) < 0.05 and rss_n <= 1.05 * rss_free:
            return ctx.result("linear", {c: float(w) for c, w in zip(used, w_n, strict=True)}, rss_n,
                              sum_weights=1.0, normalized=1.0, noisy=1.0)
        return ctx.result("linear", free, rss_free, sum_weights=sum(free.values()), normalized=0.0, noisy=1.0)
    return ctx.result("unexplained", free, rss_free)


def fit_spherical(ctx: FitContext) -> SlotFit | None:
    """SLERP between two models (mergekit calls one of them the base): the angle is per tensor, so SLERP can explain
    the suspect where every linear fit leaves a residual."""
    cands, base = ctx.cands, ctx.base
    parents = ctx.parents
    pair = cands if len(cands) == 2 else (parents if len(parents) == 2 else None)
    if pair is None:
        return None
    if base in pair:  # orient as mergekit does: t = 0 is the base model
        pair = [base] + [c for c in pair if c != base]
    t, rss_s = fit_slerp(ctx.st, pair[0], pair[1])
    _, rss_n = lsq.solve(ctx.st, list(pair), sum1=True)
    if rss_s <= ctx.floor and rss_s < 0.5 * rss_n:
        return ctx.result("slerp", {pair[0]: 1 - t, pair[1]: t}, rss_s, t=t)
    return None


#: A task vector weighted below this carries no recipe (the verdict names parents from 0.02 up).
LONE_TASK_VECTOR = 0.02


def fit_task_vectors(ctx: FitContext, model_stock: bool) -> SlotFit | None:
    """base + sum of lambda_i (parent_i - base) when the free fit explains the suspect with the base carrying weight
    and all weights summing to 1: Model Stock when every lambda is its t / k (model_stock=True), else task
    arithmetic."""
    if ctx.rss_free > ctx.floor or ctx.base is None or abs(ctx.free[ctx.base]) <= 0.01:
        return None
    s = sum(ctx.free.values())
    if abs(s - 1) >= 0.01:
        return None
    lam = {c: ctx.free[c] for c in ctx.parents}
    if sum(1 for v in lam.values() if abs(v) >= LONE_TASK_VECTOR) < 2:
        # base + lambda (parent - base) is the linear merge lambda * parent + (1 - lambda) * base: named linear,
        # the simpler recipe (the Rio case), by fit_linear
        return None
    if model_stock:
        t = _model_stock(ctx.st, ctx.parents, ctx.base, lam)
        return None if t is None else ctx.result("model_stock", lam, ctx.rss_free, t=t)
    return ctx.result("task_arithmetic", lam, ctx.rss_free, sum_weights=s)


def fit_linear(ctx: FitContext) -> SlotFit | None:
    """A weighted sum of the candidates when the free fit explains the suspect: normalised (weights sum to 1, fitted
    under that constraint) when that still explains it, else the free weights; weights of rounded storage are then
    refined by the rounding-aware fit."""
    st, cands, free, rss_free = ctx.st, ctx.cands, ctx.free, ctx.rss_free
    if rss_free > ctx.floor:
        return None
    if ctx.base is not None and abs(free[ctx.base]) > 0.01:
        return ctx.result("linear", free, rss_free, sum_weights=sum(free.values()))
    used = [c for c in cands if abs(free[c]) > 1e-3] or cands
    w_n, rss_n, se_n = lsq.solve_se(st, used, sum1=True)
    if rss_n <= ctx.floor:
        return _rounded(st, ctx.result("linear", {c: float(w) for c, w in zip(used, w_n, strict=True)}, rss_n,
                                       sum_weights=1.0, normalized=1.0), used, se_n, ctx.refine)
    _, _, se_f = lsq.solve_se(st, cands)
    return _rounded(st, ctx.result("linear", free, rss_free, sum_weights=sum(free.values()), normalized=0.0),
                    cands, se_f, ctx.refine)


#: Standard errors never go below this: weights are applied in float32 (float32(0.7) = 0.69999999), so a recipe
#: weight is resolved to about 2^-23 of its size, however many elements agree.
SE_FLOOR = 2.0**-23


def _rounded(st: SlotStats, fit: SlotFit, used: list[int], se: np.ndarray, refine: bool = True) -> SlotFit:
    """Attach standard errors, and where the suspect's storage rounding biases least squares (bf16/fp16/fp8, or a
    GGUF grid with cells, and two or more parents), replace the weights with the rounding-aware fit
    (detectors.rounding); without `refine` the biased least-squares weights stay, with no standard error, so that
    they never enter a pooled weight."""
    fit.se = {c: max(float(v), SE_FLOOR * max(1.0, abs(fit.weights.get(c, 0.0)))) for c, v in zip(used, se,
                                                                                                  strict=True)}
    if len(used) < 2 or st.sample is None or (st.suspect_dtype not in rounding.ROUNDED and st.cells is None):
        return fit
    if not refine:
        fit.se = {c: math.inf for c in used}
        fit.params["rounding_skipped"] = 1.0
        return fit
    start = np.array([fit.weights.get(c, 0.0) for c in used])
    rf = rounding.fit(st.sample, used, st.suspect_dtype, start, st.cells)
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
    if st.cells is not None:
        fit.params["grid_cells"] = 1.0
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

