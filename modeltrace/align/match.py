"""Which unit of one model is which unit of another: max-cosine matching that scales to 20k-unit layers.

Features (rows = units) are standardized per coordinate first: z-scoring a coordinate across units removes what
every unit shares (a mean direction, a per-dimension scale such as a folded norm gain), so unrelated models do not
look alike through it. Similarities are computed blockwise in float32 BLAS, keeping per suspect unit its best and
second-best candidate and per candidate unit its best suspect, so memory is O(block x n) and never n x n.
A unit whose best candidate picks it back, clearly ahead of the runner-up, is assigned outright; only the remaining,
ambiguous units go to an exact assignment (Hungarian, scipy) over themselves and the candidates left, capped at
`EXACT_MAX` units so the cubic step stays small. Problems of up to `EXACT_ALL` units are solved exactly outright.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Layers up to this many units get a full exact assignment (Hungarian on 1024 x 1024 takes ~0.15 s).
EXACT_ALL = 1024
#: At most this many ambiguous units get the exact assignment in a large layer (2048 -> ~0.5 s).
EXACT_MAX = 2048
#: A mutual best match is accepted outright when it leads the runner-up by this much cosine.
DECIDE_MARGIN = 0.05
#: Float32 cells per similarity block (a block of suspect units x all candidate units): 16 MB.
BLOCK_CELLS = 1 << 22


def standardize(f: np.ndarray) -> np.ndarray:
    """Z-score every coordinate across units, then scale every unit to unit length (float32, same shape)."""
    x = np.asarray(f, dtype=np.float64)
    if x.shape[0] > 1:
        x = x - x.mean(axis=0, keepdims=True)
        sd = x.std(axis=0, keepdims=True)
        x = np.divide(x, sd, out=np.zeros_like(x), where=sd > 1e-12 * max(float(sd.max()), 1e-300))
    n = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, n, out=np.zeros_like(x), where=n > 0)
    return x.astype(np.float32)


@dataclass
class Match:
    """An injective matching of suspect units into candidate units."""

    perm: np.ndarray  # candidate unit per suspect unit, -1 where left unassigned
    score: np.ndarray  # cosine of each assigned pair (nan where unassigned)
    decided: int  # pairs accepted as mutual best matches
    exact: int  # units that went through the exact assignment

    @property
    def assigned(self) -> np.ndarray:
        return self.perm >= 0

    def filled(self, n_c: int) -> np.ndarray:
        """A complete injective map: unassigned suspect units take the unused candidate units in order (only to
        make a usable alignment; such pairs are never evidence)."""
        perm = self.perm.copy()
        free = np.setdiff1d(np.arange(n_c), perm[perm >= 0])
        holes = np.nonzero(perm < 0)[0]
        perm[holes[: len(free)]] = free[: len(holes)]
        return perm


def _exact(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment  # 0.5 s to import: paid only when units must be matched

    rows, cols = linear_sum_assignment(sim, maximize=True)
    return rows, cols


def combine(fs: list[np.ndarray]) -> np.ndarray:
    """One feature matrix whose dot products are the mean cosine over the `standardize`d sets `fs`."""
    if len(fs) == 1:
        return fs[0]
    return np.ascontiguousarray(np.concatenate(fs, axis=1) / np.float32(np.sqrt(len(fs))))


def match(fs: list[np.ndarray], fc: list[np.ndarray], exact_all: int = EXACT_ALL, exact_max: int = EXACT_MAX
          ) -> Match:
    """Match suspect units (rows of every array in `fs`) to candidate units (rows of `fc`), each pair of arrays a
    feature set already `standardize`d; the similarity is the mean cosine over the sets."""
    return match_many({"m": (fs, fc)}, exact_all, exact_max)["m"]


def match_many(sets: dict[str, tuple[list[np.ndarray], list[np.ndarray]]], exact_all: int = EXACT_ALL,
               exact_max: int = EXACT_MAX) -> dict[str, Match]:
    """Several matchings of the same units at once (e.g. input side, output side), one product per set and block."""
    feats = {k: (combine(fs), combine(fc)) for k, (fs, fc) in sets.items()}
    first = next(iter(feats.values()))
    n_s, n_c = first[0].shape[0], first[1].shape[0]
    if n_s == 0 or n_c == 0:
        return {k: Match(np.full(n_s, -1), np.full(n_s, np.nan), 0, 0) for k in sets}
    if max(n_s, n_c) <= exact_all:
        out = {}
        for name, (a, b) in feats.items():
            sim = a @ b.T
            r, c = _exact(sim)
            perm = np.full(n_s, -1)
            perm[r] = c
            score = np.full(n_s, np.nan)
            score[r] = sim[r, c]
            out[name] = Match(perm, score, 0, len(r))
        return out
    block = max(16, min(n_s, BLOCK_CELLS // n_c))
    st = {k: _Stats(n_s, n_c) for k in feats}
    for lo in range(0, n_s, block):
        hi = min(lo + block, n_s)
        for name, (a, b) in feats.items():
            st[name].update(lo, a[lo:hi] @ b.T)
    return {name: _resolve(st[name], a, b, exact_max) for name, (a, b) in feats.items()}


class _Stats:
    """Running best / second-best per suspect row and the best score per candidate column over similarity blocks
    (a suspect unit is its best candidate's best exactly when its score equals that column's maximum)."""

    def __init__(self, n_s: int, n_c: int) -> None:
        self.best = np.zeros(n_s, dtype=np.int64)
        self.second = np.zeros(n_s, dtype=np.int64)
        self.s1 = np.zeros(n_s, dtype=np.float32)
        self.s2 = np.zeros(n_s, dtype=np.float32)
        self.col_s = np.full(n_c, -np.inf, dtype=np.float32)

    def update(self, lo: int, sim: np.ndarray) -> None:
        rows = np.arange(sim.shape[0])
        np.maximum(self.col_s, sim.max(axis=0), out=self.col_s)
        arg = sim.argmax(axis=1)
        s1 = sim[rows, arg]
        sim[rows, arg] = -np.inf  # in place: the block is not used again
        arg2 = sim.argmax(axis=1)
        hi = lo + len(rows)
        self.best[lo:hi], self.second[lo:hi] = arg, arg2
        self.s1[lo:hi], self.s2[lo:hi] = s1, sim[rows, arg2]

    def mutual(self) -> np.ndarray:
        m = self.s1 >= self.col_s[self.best]
        # a tie for a column's maximum: keep only the first suspect unit that reaches it
        cand = np.nonzero(m)[0]
        _, first = np.unique(self.best[cand], return_index=True)
        out = np.zeros_like(m)
        out[cand[first]] = True
        return out


def _resolve(st: _Stats, a: np.ndarray, b: np.ndarray, exact_max: int) -> Match:
    """Mutual best matches with a margin are taken; the most promising ambiguous units (capped) get an exact
    assignment over the candidates they shortlisted (best and second best) that are still free."""
    n_s = len(st.best)
    decided = st.mutual() & (st.s1 - st.s2 >= DECIDE_MARGIN)
    perm = np.full(n_s, -1)
    score = np.full(n_s, np.nan)
    perm[decided] = st.best[decided]
    score[decided] = st.s1[decided]
    rest = np.nonzero(~decided)[0]
    exact = 0
    if len(rest):
        rest = rest[np.argsort(-st.s1[rest], kind="stable")][:exact_max]
        cols = np.setdiff1d(np.union1d(st.best[rest], st.second[rest]), perm[decided])
        if len(cols):
            sub = a[rest] @ b[cols].T
            r, c = _exact(sub)
            perm[rest[r]] = cols[c]
            score[rest[r]] = sub[r, c]
            exact = len(r)
    return Match(perm, score, int(decided.sum()), exact)


def refine(agreed: np.ndarray, a: np.ndarray, b: np.ndarray, exact_max: int = 4 * EXACT_MAX) -> np.ndarray:
    """A full injective map from a partial one (-1 = open): open suspect units get an exact assignment over the
    unused candidate units on features `a`, `b` when few enough, the rest are filled in order."""
    perm = agreed.copy()
    n_c = b.shape[0]
    rest = np.nonzero(perm < 0)[0]
    free = np.setdiff1d(np.arange(n_c), perm[perm >= 0])
    if 0 < len(rest) <= exact_max and 0 < len(free) <= 4 * exact_max:
        r, c = _exact(a[rest] @ b[free].T)
        perm[rest[r]] = free[c]
    return Match(perm, np.full(len(perm), np.nan), 0, 0).filled(n_c)


def identity_score(fs: list[np.ndarray], fc: list[np.ndarray]) -> tuple[float, float]:
    """Mean cosine of unit i with unit i (same index) and its z-score against unrelated units (~N(0, 1/(n k)))."""
    n = min(fs[0].shape[0], fc[0].shape[0])
    if n == 0:
        return 0.0, 0.0
    cos = np.mean([np.einsum("ij,ij->i", x[:n], y[:n]) for x, y in zip(fs, fc, strict=True)], axis=0)
    var = sum(1.0 / max(x.shape[1], 1) for x in fs) / len(fs) ** 2  # of one unit's mean cosine under the null
    m = float(cos.mean())
    return m, m / float(np.sqrt(var / n))


def agreements(p1: np.ndarray, p2: np.ndarray) -> tuple[int, int]:
    """(units where two matchings agree, units both matchings assigned)."""
    both = (p1 >= 0) & (p2 >= 0)
    return int(np.count_nonzero(both & (p1 == p2))), int(both.sum())
