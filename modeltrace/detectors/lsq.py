"""Least squares on one slot's streamed sums, exact when the models are close.

A residual computed as G_00 - 2 w.b + w A w from the raw Gram cancels: when the suspect is a copy, a recast or an
exact merge of its candidates, the residual is 1e-6..1e-13 of ||S||^2 while G's entries carry errors of ~1e-8 of
||S||^2, so copies look like fine-tunes and exact merges like noisy ones.

Here every fit is written in a basis anchored at the candidate R nearest to the suspect:
    [D0 = S - R, R, D_i = P_i - R for the other candidates]
whose Gram H comes from the exact squared differences E (accumulate.sqdiff64 / the kernel) for every entry that
does not involve R itself, and from G only for <R, .>. A residual vector v has coordinates (1 - sum of weights) on
R, which is ~0 for every recipe that keeps the scale, so G's rounding enters only at second order. The least-squares
problem is solved on a square root F of H (H = F^T F, from the eigen-decomposition of H scaled to unit diagonal,
which is backward stable whatever the spread of scales), so the residual ||F y - F C w||^2 is accurate to ~1e-16
of ||S||^2. Memory and time: O(models^3) per slot; nothing here touches the weights.
"""

from __future__ import annotations

import numpy as np

from modeltrace.detectors.accumulate import SlotStats


def reference(st: SlotStats, among: list[int] | None = None) -> int:
    """The candidate nearest to the suspect (smallest squared distance), among `among` or all candidates."""
    e = st.sqdist()
    idx = among if among else list(range(1, st.n))
    return min(idx, key=lambda i: (e[0, i], i))


def basis(st: SlotStats, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, T): the Gram H of the basis [S - R, R, P_i - R (i != r)], and T with T[m] the coordinates of model m
    (0 = suspect) in that basis."""
    n = st.n
    e = st.sqdist()
    g = st.G
    others = [i for i in range(1, n) if i != r]
    pos = {i: k + 2 for k, i in enumerate(others)}
    T = np.zeros((n, n))
    T[0, 0] = T[0, 1] = 1.0
    T[r, 1] = 1.0
    for i in others:
        T[i, 1] = 1.0
        T[i, pos[i]] = 1.0
    # index of each basis vector's "model" for the E-derived entries: D0 <-> model 0, D_i <-> model i
    model_of = [0] + [-1] + others
    H = np.zeros((n, n))
    for a in range(n):
        for b in range(a, n):
            ma, mb = model_of[a], model_of[b]
            if a == 1 and b == 1:
                h = g[r, r]
            elif a == 1 or b == 1:
                m = mb if a == 1 else ma
                h = g[m, r] - g[r, r]
            else:
                h = 0.5 * (e[ma, r] + e[mb, r] - e[ma, mb])
            H[a, b] = H[b, a] = h
    return H, T


def _root(H: np.ndarray) -> np.ndarray:
    """F with F^T F = H (H symmetric positive semi-definite up to rounding), stable across scales."""
    d = np.sqrt(np.maximum(np.diag(H), 0.0))
    s = np.where(d > 0, d, 1.0)
    Hs = H / np.outer(s, s)
    lam, Q = np.linalg.eigh((Hs + Hs.T) / 2)
    lam = np.clip(lam, 0.0, None)
    return (np.sqrt(lam)[:, None] * Q.T) * s[None, :]


def solve(st: SlotStats, idx: list[int], sum1: bool = False, ref: int | None = None) -> tuple[np.ndarray, float]:
    """Least squares of the suspect on candidates `idx` (weights in idx's order, residual sum of squares); with
    `sum1` the weights sum to one (a normalised linear merge)."""
    w, rss, _ = solve_se(st, idx, sum1, ref)
    return w, rss


def solve_se(st: SlotStats, idx: list[int], sum1: bool = False, ref: int | None = None
             ) -> tuple[np.ndarray, float, np.ndarray]:
    """`solve`, plus the weights' standard errors (residual variance per element times the inverse normal matrix;
    inf for a weight the data cannot tell apart, e.g. two candidates equal on this slot)."""
    if st.G[0, 0] <= 0 and (st.E is None or not np.any(st.E[0] > 0)):
        return np.zeros(len(idx)), 0.0, np.full(len(idx), np.inf)
    if not idx:
        return np.zeros(0), float(max(st.G[0, 0], 0.0)), np.zeros(0)
    r = ref if ref is not None else reference(st, idx)
    H, T = basis(st, r)
    F = _root(H)
    y = T[0].copy()
    C = T[idx].T.copy()  # columns: coordinates of each candidate
    if sum1:
        last = C[:, -1].copy()
        y = y - last
        C = C[:, :-1] - last[:, None]
    A, b = F @ C, F @ y
    k = C.shape[1]
    if k:
        w, _, rank, sv = np.linalg.lstsq(A, b, rcond=1e-13)
        res = b - A @ w
    else:
        w, res, rank, sv = np.zeros(0), b, 0, np.zeros(0)
    rss = float(res @ res)
    var = rss / max(st.numel - len(idx), 1)
    if k and rank == k and sv.min() > 1e-10 * sv.max():
        cov = np.linalg.inv(A.T @ A) * var
    else:
        cov = np.full((k, k), np.inf)
    if sum1:
        w = np.concatenate([w, [1.0 - float(w.sum())]])
        one = np.ones(k)
        last = float(one @ cov @ one) if np.all(np.isfinite(cov)) else np.inf
        se = np.sqrt(np.maximum(np.concatenate([np.diag(cov), [last]]), 0.0))
    else:
        se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    return w, rss, se


def rss(st: SlotStats, coef: dict[int, float] | list[dict[int, float]], ref: int | None = None) -> np.ndarray:
    """||S - sum_i c_i P_i||^2 for one or several coefficient sets, accurately (see the module docstring)."""
    sets = [coef] if isinstance(coef, dict) else coef
    r = ref if ref is not None else reference(st)
    H, T = basis(st, r)
    V = np.tile(T[0], (len(sets), 1))
    for k, c in enumerate(sets):
        for i, w in c.items():
            V[k] -= w * T[i]
    out = np.einsum("ka,ab,kb->k", V, H, V)
    return np.maximum(out, 0.0)


def gram_of(st: SlotStats, combos: np.ndarray, ref: int | None = None) -> np.ndarray:
    """Gram matrix of linear combinations of the models (rows of `combos`, over models 0..n-1), accurately: a
    combination whose coefficients sum to zero (a difference such as S - M or P_i - M) never touches G."""
    r = ref if ref is not None else reference(st)
    H, T = basis(st, r)
    X = combos @ T
    return X @ H @ X.T


__all__ = ["basis", "gram_of", "reference", "rss", "solve", "solve_se"]
