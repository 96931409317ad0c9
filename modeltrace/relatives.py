"""Who lies between whom: the base of a family of candidates, parents told from siblings, and direction.

Training adds a delta that is close to orthogonal to every other training delta, so along a line of descent squared
distances add: if S was trained from X and X from M, then d(S, M)^2 ~ d(S, X)^2 + d(X, M)^2, and X is "between" S
and M (the right angle of the triangle is at X, opposite its longest side). Siblings S and X of one base M put M
between them. Three models therefore say which one is in the middle, but not which end is the root: the root must
come from outside the weights (the base the user names, or one inferred as the candidate that the other candidates
all meet at). With only the suspect and one relative, parent, sibling and child cannot be told apart at all.

Inputs are squared distances summed over the slots every model was compared on (exact sums from the streaming
pass, or, before it, over a fixed sample of rows); the functions are pure and cheap (O(models^3)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: A side counts as the longest of a triangle only when it exceeds the others by this factor (squared distances);
#: training deltas of one task correlate (cos 0.3-0.6), which moves the right angle but keeps this margin.
MARGIN = 1.1
#: Two models are of one family when their squared distance is below this share of their squared norms summed
#: (independent models: ~1; a fine-tune: 1e-6..1e-1).
RELATED_SHARE = 0.5
#: Slots sampled per model to infer a base before the streaming pass (4 rows each, as the layer map reads).
BASE_SAMPLE_SLOTS = 16


@dataclass(frozen=True)
class Placement:
    """Where the suspect (index 0) sits among related candidates, given a base (or None)."""

    parent: int | None  # the candidate it descends from directly, when the evidence gives direction
    via: list[int] = field(default_factory=list)  # candidates between the suspect and the base, nearest first
    siblings: list[int] = field(default_factory=list)  # candidates that meet the suspect at the base
    descendants: list[int] = field(default_factory=list)  # candidates the suspect lies between (them and the base)
    nearest: int | None = None  # the closest related candidate, with or without direction


def middle(D: np.ndarray, a: int, b: int, c: int) -> int | None:
    """The vertex of triangle (a, b, c) opposite its clearly longest side, or None if no side is clearly longest."""
    sides = {c: D[a, b], a: D[b, c], b: D[a, c]}  # vertex -> opposite side
    order = sorted(sides, key=lambda v: sides[v], reverse=True)
    if sides[order[0]] > MARGIN * sides[order[1]]:
        return order[0]
    return None


def related(D: np.ndarray, norms: np.ndarray, i: int, j: int) -> bool:
    return bool(D[i, j] < RELATED_SHARE * (norms[i] + norms[j]))


def infer_base(D: np.ndarray, norms: np.ndarray, cands: list[int]) -> int | None:
    """The candidate every other related candidate meets at: at least two others, all of one family with it, and for
    every pair of them it lies between the two. None when no candidate is that clearly."""
    found = []
    for m in cands:
        others = [x for x in cands if x != m and related(D, norms, x, m)]
        if len(others) < 2:
            continue
        pairs = [(x, y) for k, x in enumerate(others) for y in others[k + 1:]]
        if all(middle(D, x, y, m) == m for x, y in pairs):
            found.append(m)
    return found[0] if len(found) == 1 else None


def place(D: np.ndarray, norms: np.ndarray, cands: list[int], base: int | None) -> Placement:
    """The suspect's parent (nearest model between it and the base, or the base), the candidates that are its
    siblings or descendants, and its nearest relative. Without a base only `nearest` is set."""
    rel = [c for c in cands if related(D, norms, 0, c)]
    if not rel:
        return Placement(None)
    nearest = min(rel, key=lambda c: D[0, c])
    if base is None or base not in rel:
        return Placement(None, nearest=nearest)
    via, sibs, desc = [], [], []
    for x in rel:
        if x == base:
            continue
        mid = middle(D, 0, x, base)
        if mid == x:
            via.append(x)
        elif mid == base:
            sibs.append(x)
        elif mid == 0:
            desc.append(x)
    via.sort(key=lambda x: D[0, x])
    parent = via[0] if via else base
    return Placement(parent, via, sibs, desc, nearest)


def sample_distances(views: list) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances and squared norms between models over a fixed sample of rows of up to BASE_SAMPLE_SLOTS
    matrix slots that every model has with the same shape (the layer map's row choice: same rows for the same
    shape). Reads 4 rows per slot per model."""
    from modeltrace.align.layers import slot_sample
    from modeltrace.architectures import is_structured

    s = views[0]
    common = [sl for sl, p in s.parts.items() if sl.layer >= 0 and not is_structured(sl, p)
              and all(sl in v.parts and (v.parts[sl].rows, v.parts[sl].cols) == (p.rows, p.cols) for v in views)]
    common.sort(key=lambda sl: (sl.layer, sl.role, sl.expert if sl.expert is not None else -1))
    if len(common) > BASE_SAMPLE_SLOTS:
        common = [common[i] for i in np.linspace(0, len(common) - 1, BASE_SAMPLE_SLOTS).astype(int)]
    n = len(views)
    D = np.zeros((n, n))
    norms = np.zeros(n)
    for sl in common:
        xs = [np.nan_to_num(slot_sample(v, sl).astype(np.float64)) for v in views]
        for i in range(n):
            norms[i] += float(xs[i] @ xs[i])
            for j in range(i + 1, n):
                d = xs[i] - xs[j]
                D[i, j] += float(d @ d)
    return D + D.T, norms


__all__ = ["Placement", "infer_base", "middle", "place", "related", "sample_distances"]
