"""Who explains whom among related models, from fingerprint Gram stacks alone.

Similarity cannot tell a parent from a child or a sibling (a merge of the suspect with another model is closer to the
suspect than the suspect's own parent). What can: a model that is a *plausible merge* of other models in the set is a
merge, not an ancestor of them. A merge here is what mergekit makes:

- exact: the model equals a combination of two or three others down to its storage rounding (linear, SLERP, task
  arithmetic, model stock), with weights a recipe would use: each in [0, 1.05], at most one negative (a task
  arithmetic base, then the weights sum to 1), and members that are affinely independent (three models on one line,
  such as A, B and 0.6 A + 0.4 B, explain each other with any weights and prove nothing);
- sparse: the model equals a base exactly on a share of the coordinates that every other member changed (TIES,
  DARE, DELLA, breadcrumbs), its difference from the base is a positive combination of theirs, and it lies between
  the base and them (closer to the members than the base is). That last test gives the direction: a base and its
  sparse merge share exact coordinates either way round, but only the merge moved towards the members.

Such models are set aside as descendants or siblings; the suspect's recipe is searched among the rest.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from modeltrace.detectors.fits import FLOOR_FACTOR
from modeltrace.fingerprint.compare import GramStack, fit, zero_share

#: A member takes part in a recipe when its weight is at least this.
MIN_WEIGHT = 0.05
MAX_WEIGHT = 1.05
#: Sparse merges leave the base's exact value on at least this share of jointly changed coordinates (fit_slot's
#: threshold for the audit).
MIN_ZERO_SHARE = 0.04
#: ... and the rest of their difference from the base is mostly a combination of the members' task vectors.
MIN_DELTA_R2 = 0.5
#: Members of a recipe must be affinely independent: their differences may correlate at most this much.
MAX_DIFF_CORR = 0.9
#: An exact recipe must reproduce at least this share of the tensors (a layer stack reproduces only its own layers).
MIN_EXACT_SHARE = 0.9


#: How an explanation names models: by position in a Gram stack here (int); the family tree relabels them by content
#: hash (str).
M = TypeVar("M")


@dataclass
class Explanation(Generic[M]):
    target: M
    kind: str  # copy | exact | sparse
    weights: dict[M, float]  # member -> weight (sparse: task-vector weights, base excluded)
    base: M | None
    quality: float  # share of slots explained exactly (copy, exact) or share of base-valued coordinates (sparse)

    @property
    def members(self) -> list[M]:
        return list(self.weights) + ([self.base] if self.base is not None and self.base not in self.weights else [])


def _plausible(w: dict[int, float]) -> bool:
    vals = list(w.values())
    neg = [v for v in vals if v < -MIN_WEIGHT]
    if any(v > MAX_WEIGHT for v in vals) or len(neg) > 1:
        return False
    return not neg or (neg[0] >= -MAX_WEIGHT and abs(sum(vals) - 1) <= 0.05)


def _difference_grams(gs: GramStack, models: list[int], origin: int) -> np.ndarray:
    """Per slot (where all are present), the Gram matrix of (m - origin) for m in `models`: (slots, k, k)."""
    mask = gs.present[:, [origin, *models]].all(axis=1)
    G = gs.G[mask]
    T = np.zeros((len(models), G.shape[1]))
    for r, i in enumerate(models):
        T[r, i] += 1
        T[r, origin] -= 1
    return np.einsum("ai,sij,bj->sab", T, G, T)


def _affine_ok(gs: GramStack, members: list[int]) -> bool:
    """Whether the members' differences from the first one are far from collinear, tensor by tensor (weights that
    change from layer to layer make collinear members look independent when pooled)."""
    if len(members) <= 2:
        return True
    o, rest = members[0], members[1:]
    D = _difference_grams(gs, rest, o)
    d = np.sqrt(np.maximum(np.einsum("saa->sa", D), 1e-300))
    C = np.abs(D / (d[:, :, None] * d[:, None, :]))
    iu = np.triu_indices(len(rest), 1)
    worst = C[:, iu[0], iu[1]].max(axis=1)
    return bool(np.median(worst) <= MAX_DIFF_CORR)


def _delta_fit(gs: GramStack, target: int, base: int, others: tuple[int, ...]) -> tuple[dict[int, float], float]:
    """Weights (medians over slots; empty when R² < MIN_DELTA_R2) and R² of (target - base) on (other - base)."""
    D = _difference_grams(gs, [target, *others], base)
    if not len(D):
        return {}, 0.0
    A, b = D[:, 1:, 1:], D[:, 1:, 0]
    scale = np.maximum(np.trace(A, axis1=1, axis2=2), 1e-300)[:, None, None]
    w = np.linalg.solve(A + 1e-12 * scale * np.eye(len(others)), b[..., None])[..., 0]
    rss = np.maximum(D[:, 0, 0] - 2 * (w * b).sum(1) + np.einsum("si,sij,sj->s", w, A, w), 0)
    total = float(D[:, 0, 0].sum())
    r2 = 1 - float(rss.sum()) / total if total > 0 else 0.0
    if r2 < MIN_DELTA_R2:
        return {}, r2
    return {o: float(v) for o, v in zip(others, np.median(w, axis=0), strict=True)}, r2


def _spread(gs: GramStack, x: int, others: tuple[int, ...]) -> float:
    """Sum of squared distances from x to the others, over the slots where all are present."""
    mask = gs.present[:, [x, *others]].all(axis=1)
    G = gs.G[mask]
    return float(sum((G[:, x, x] - 2 * G[:, x, o] + G[:, o, o]).sum() for o in others))


def explanations(gs: GramStack, target: int, pool: list[int], base_excluded: int | None = None
                 ) -> list[Explanation[int]]:
    """Plausible merges (or a copy) of models in `pool` that reproduce `target`, simplest first.

    `base_excluded` may not serve as a sparse merge's base (the suspect, when asking whether a candidate is a merge of
    the suspect: a copy of the suspect's layers is not a sparse merge over it)."""
    pool = [p for p in pool if p != target]
    found: list[tuple[tuple, Explanation[int]]] = []
    for k in (1, 2, 3):
        for Q in itertools.combinations(pool, k):
            f = fit(gs, target, Q)
            if f.slots == 0 or f.exact < MIN_EXACT_SHARE:
                continue
            sig = {m: w for m, w in f.weights.items() if abs(w) >= MIN_WEIGHT}
            if len(sig) == 1:
                (m, w), = sig.items()
                if abs(w - 1) > 0.02 or len(Q) > 1:
                    continue
                found.append(((0, 1, -f.exact, f.rho), Explanation(target, "copy", sig, None, f.exact)))
            elif len(sig) == len(Q) and _plausible(sig) and _affine_ok(gs, list(sig)):
                neg = [m for m, w in sig.items() if w < 0]
                found.append(((1, len(sig), -f.exact, f.rho),
                              Explanation(target, "exact", sig, neg[0] if neg else None, f.exact)))
    if any(e.kind == "exact" for _, e in found):  # sparse signatures are looked for only when nothing is exact
        return [e for _, e in sorted(found, key=lambda x: x[0])]
    for b in pool:
        if b == base_excluded:
            continue
        rest = [p for p in pool if p != b]
        for k in (2, 3) if len(rest) <= 4 else (2,):
            for others in itertools.combinations(rest, k):
                w, r2 = _delta_fit(gs, target, b, others)
                if r2 < MIN_DELTA_R2 or not w or not all(MIN_WEIGHT <= v <= MAX_WEIGHT for v in w.values()):
                    continue
                near, far = _spread(gs, target, others), _spread(gs, b, others)
                if near >= far:
                    continue
                zs = zero_share(gs, target, b, others)
                if zs < MIN_ZERO_SHARE:
                    continue
                found.append(((2, len(others), -zs, near / far), Explanation(target, "sparse", w, b, zs)))
    return [e for _, e in sorted(found, key=lambda x: x[0])]


def merges_among(gs: GramStack, nodes: list[int], suspect: int = 0) -> dict[int, Explanation[int]]:
    """Which of `nodes` are merges of the others (the suspect included as a possible member, never as a target).

    Accepted greedily, simplest explanations first, so that the set stays consistent: a model already used as a
    member of an accepted merge is an ancestor and is not itself explained away, and an accepted merge is not used
    as a member or base of another."""
    everyone = [suspect, *nodes]
    options: list[tuple[tuple, Explanation[int]]] = []
    for x in nodes:
        for rank, e in enumerate(explanations(gs, x, everyone, base_excluded=suspect)):
            if e.kind != "copy":
                options.append(((e.kind != "exact", len(e.members), rank), e))
    accepted: dict[int, Explanation[int]] = {}
    ancestors: set[int] = set()
    for _, e in sorted(options, key=lambda x: x[0]):
        if e.target in accepted or e.target in ancestors or any(m in accepted for m in e.members):
            continue
        accepted[e.target] = e
        ancestors.update(e.members)
    return accepted


def explain(gs: GramStack, target: int, pool: list[int]) -> Explanation[int] | None:
    """The simplest plausible recipe over `pool` for `target` (the suspect), or None (a fine-tune or unexplained)."""
    found = explanations(gs, target, pool)
    return found[0] if found else None


def stack_sources(gs: GramStack, pool: list[int]) -> list[int] | None:
    """Models whose layers the suspect copies whole (a passthrough stack), when every suspect layer is a copy of a
    layer of some model in `pool` and more than one model, or a moved layer, is needed; else None."""
    G = gs.G
    copies: dict[int, np.ndarray] = {}
    for m in pool:
        gmm = np.maximum(G[:, m, m], 1e-300)
        w = G[:, 0, m] / gmm
        rss = G[:, 0, 0] - G[:, 0, m] ** 2 / gmm
        floor = FLOOR_FACTOR * gs.floor[:, 0] + 1e-12 * G[:, 0, 0]
        copies[m] = gs.present[:, m] & (np.abs(w - 1) <= 0.02) & (rss <= floor)
    layers = sorted({k.layer for k in gs.keys if k.layer >= 0})
    if not layers:
        return None
    covers: dict[int, set[int]] = {m: set() for m in pool}
    for layer in layers:
        rows = np.array([k.layer == layer for k in gs.keys])
        for m in pool:
            have = rows & gs.present[:, m]
            if have.any() and copies[m][have].all():
                covers[m].add(layer)
    if set().union(*covers.values()) != set(layers):
        return None
    chosen: list[int] = []
    left = set(layers)
    while left:
        m = max(pool, key=lambda c: (len(covers[c] & left), -pool.index(c)))
        chosen.append(m)
        left -= covers[m]
    if len(chosen) == 1 and not gs.layer_maps[chosen[0]]:
        return None  # a copy of one model, not a stack
    return sorted(chosen, key=lambda c: min(covers[c]))


def centre(gs: GramStack, members: list[int]) -> int | None:
    """The member the others look like fine-tunes of (each closer to it than to one another), i.e. a task-vector
    merge's base; None for siblings."""
    mask = gs.present[:, members].all(axis=1)
    G = gs.G[mask].sum(axis=0)

    def d(i: int, j: int) -> float:
        return float(G[i, i] - 2 * G[i, j] + G[j, j])

    for c in members:
        others = [m for m in members if m != c]
        if all(d(o, c) < 0.8 * d(a, b) for o in others for a, b in itertools.combinations(others, 2)):
            return c
    return None
