"""Merges within a family (tree/family.py step 3): which models are exact recipes of others, and their recipe.

Data flow: a family's cached pairs -> per model, candidate groups: relatives making an obtuse angle at it, and the
pairs / triples of relatives whose linear span holds it (least squares on summed Gram entries: recipes off the
segment, such as unnormalised linear or task arithmetic with its base) -> Gram stack assembled from the cached pairs
(no fingerprint decoded) -> fingerprint/lineage.py's `explanations` (twice: the second time knowing which models a
recipe explains) -> accepted fewest parents first, then fewest parents that are themselves merges, never a cycle ->
method, weights and intervals from the audit's detectors on the fingerprints (fingerprint_audit.audit_fingerprints),
or the fit's own weights in large indexes.

Recipes that are not exact (sparse merges: TIES, DARE, DELLA, breadcrumbs; model stock) are searched after, in
indexes of up to 1,000 models: for a model no exact recipe explains, candidate sets of two relatives a, b and a base m
among its nearest relatives no exact recipe explains (x, a, b all grew from m; a, b meet at m, relatives.middle; x - m
mostly in the span of a - m, b - m with positive coefficients: all from cached squared distances), ranked by the share
of x - m outside that span (a parent replaced by its fine-tune leaves more), then by the share of coordinates x keeps
equal to m; audited in that order on the fingerprints (audit_fingerprints) until one verdict's relation is "merge" (a
recipe to storage rounding, or the sparse signature for sparse methods), never "related", "finetune" (also a merge
then trained: `chain`) or "upcycled"; sets whose parents are not audited merges first. The exact recipes are then
accepted again counting the audited merges as explained."""

from __future__ import annotations

import itertools
import math
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from modeltrace.fingerprint.compare import GramStack
from modeltrace.fingerprint.lineage import Explanation, explanations
from modeltrace.relatives import middle
from modeltrace.tree.evidence import DIRECTED_R, Pair

if TYPE_CHECKING:
    from modeltrace.tree.family import _Family

__all__ = ["find_merges", "recipe"]

#: A model is offered to the merge search when two relatives make an obtuse angle at it:
#: d(x,a)^2 + d(x,b)^2 <= BETWEEN * d(a,b)^2 (fine-tunes of one base meet at about 90 degrees, ratio 1).
BETWEEN = 0.9
#: Relatives a merge's recipe is searched among.
POOL = 8
#: Audited search: nearest relatives no exact recipe explains, offered as parents and bases, candidate sets audited
#: per model, and the
#: largest share of |x - m|^2 left outside span(a - m, b - m) for a set to be audited.
AUDIT_POOL = 16
AUDIT_SETS = 4
AUDIT_RESIDUAL = 0.6
#: A parent of an audited merge carries at least this weight (a relative at weight ~0.03 is a fit's leftover).
AUDIT_MIN_WEIGHT = 0.05
#: Span search: relatives searched in triples (nearest first; pairs: all), the largest residual of x outside a set's
#: span relative to x's squared distance to its nearest relative (an exact recipe leaves only storage rounding; a
#: fine-tune of any model in the span leaves its own training delta, about that squared distance: ratio ~1), and the
#: sets of each size offered to the exact fit.
SPAN_RELATIVES = 48
SPAN_RESIDUAL = 0.1
SPAN_SETS = 4


@dataclass
class _Audited(Explanation[str]):
    """A recipe that is not exact, named by the audit's verdict on the fingerprints (kind "audit")."""

    verdict: dict[str, Any] = field(default_factory=dict)


# ---- 3. merges --------------------------------------------------------------------------------------------------
def _between(f: _Family, x: str, rel: list[str]) -> list[tuple[float, str, str]]:
    """Pairs of x's relatives making an obtuse angle at x (ratio <= BETWEEN), best first."""
    d = np.array([f.dist2(x, y)[0] for y in rel])
    out = []
    for i, j in itertools.combinations(range(len(rel)), 2):
        if d[i] + d[j] > BETWEEN * max(d[i], d[j]) * 4:  # cannot be obtuse: d(a,b) <= d(x,a) + d(x,b)
            continue
        dab = f.dist2(rel[i], rel[j])[0]
        if math.isnan(dab):
            dab = f.dist2(rel[i], rel[j], compute=True)[0]
        if dab > 0 and d[i] + d[j] <= BETWEEN * dab:
            out.append(((d[i] + d[j]) / dab, rel[i], rel[j]))
    return sorted(out)


def _stack_of(f: _Family, group: list[str]) -> GramStack:
    """Gram stack of `group` (first: the target) assembled from cached pairs: no fingerprint is decoded."""
    t = group[0]
    keys = f.m[t]["keys"]
    pos = {k: i for i, k in enumerate(keys)}
    n, s = len(group), len(keys)
    G = np.zeros((s, n, n))
    present: np.ndarray = np.zeros((s, n), dtype=bool)
    present[:, 0] = True
    for i, j in itertools.combinations(range(n), 2):
        p = f.pair(group[i], group[j])
        gi, gj = (p.gaa, p.gbb) if p.a == group[i] else (p.gbb, p.gaa)
        for q, k in enumerate(p.keys):
            r = pos.get(k)
            if r is None:
                continue
            G[r, i, i], G[r, j, j], G[r, i, j] = gi[q], gj[q], p.gab[q]
            G[r, j, i] = p.gab[q]
            if i == 0:
                present[r, j] = True
    for i, j in itertools.combinations(range(1, n), 2):  # a member pair missing a key voids it for both
        p = f.pair(group[i], group[j])
        have: np.ndarray = np.zeros(s, dtype=bool)
        have[[pos[k] for k in p.keys if k in pos]] = True
        present[:, i] &= have
        present[:, j] &= have
    floor = np.array([[f.m[h]["floors"].get(k, 0.0) for h in group] for k in keys])
    # keys: no Slot objects (None each); the exact fits read only the Gram entries, presence and floors
    return GramStack([f.m[h]["name"] for h in group], [None] * s, [{} for _ in group], G, present, floor,  # type: ignore[list-item]
                     np.zeros((n, n, 0), dtype=bool), np.zeros((n, 0), dtype=bool))


def _span_sets(f: _Family, x: str, rel: list[str], explained: set[str]) -> list[list[str]]:
    """Pairs and triples of x's relatives whose linear span holds x with recipe-like weights (least squares on the
    Gram entries summed over shared tensors, all from cached pairs): an exact recipe with any weights (unnormalised
    linear, task arithmetic with its base) lies in its members' span wherever it lies, between them or not. Sets with
    fewer members first, then those with fewer members in `explained`, then the smallest residual."""
    from modeltrace.fingerprint.lineage import _plausible

    p_x: dict[str, Pair] = {}
    for y in rel:
        p = f.pair(x, y, compute=False)
        if p is not None and p.keys:
            p_x[y] = p
    rel = [y for y in rel if y in p_x]
    if len(rel) < 2:
        return []
    gx = np.array([float(p_x[y].gab.sum()) for y in rel])
    x2 = float(np.median([(p_x[y].gaa if p_x[y].a == x else p_x[y].gbb).sum() for y in rel]))
    ny = np.array([float((p_x[y].gbb if p_x[y].a == x else p_x[y].gaa).sum()) for y in rel])
    d_near = min(f.dist2(x, y)[0] for y in rel)
    if not d_near > 0:
        return []
    n = len(rel)
    G = np.full((n, n), np.nan)
    G[np.diag_indices(n)] = ny
    for i, j in itertools.combinations(range(n), 2):
        p = f.pair(rel[i], rel[j], compute=False)
        if p is not None and p.keys:
            G[i, j] = G[j, i] = float(p.gab.sum())
    fits = []
    for k in (2, 3):
        Q = np.array(list(itertools.combinations(range(min(n, SPAN_RELATIVES if k == 3 else n)), k)), dtype=int)
        if not len(Q):
            continue
        A = G[Q[:, :, None], Q[:, None, :]]
        ok = ~np.isnan(A).any(axis=(1, 2))
        Q, A = Q[ok], A[ok]
        g = gx[Q]
        scale = np.maximum(np.trace(A, axis1=1, axis2=2), 1e-300)[:, None, None]
        try:
            W = np.linalg.solve(A + 1e-12 * scale * np.eye(k), g[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a degenerate set (all-zero tensors): least squares for every set instead
            W = np.einsum("qij,qj->qi", np.linalg.pinv(A), g)
        res = (x2 - (W * g).sum(axis=1)) / d_near
        for q in np.flatnonzero(res <= SPAN_RESIDUAL):
            w = {int(i): float(v) for i, v in zip(Q[q], W[q], strict=True)}
            if _plausible(w) and min(abs(v) for v in w.values()) >= 0.05:
                members = [rel[int(i)] for i in Q[q]]
                fits.append((k, sum(m in explained for m in members), float(res[q]), members))
    fits.sort(key=lambda t: t[:3])
    return [m for k in (2, 3) for m in [m for kk, *_, m in fits if kk == k][:SPAN_SETS]]


def _merge_options(f: _Family, x: str, rel: list[str], obtuse: list[tuple[float, str, str]],
                   spans: list[list[str]], explained: AbstractSet[str] = frozenset()) -> list[Explanation[str]]:
    """Plausible exact recipes for x over (1) the relatives making an obtuse angle at it, those not in `explained`
    (models some recipe reproduces) first, so a merge's true parents are in its pool even among many sibling merges,
    and (2) each set of relatives whose span holds x (`spans`, from _span_sets). A model with neither has no
    exact recipe, whatever `explained` holds."""
    groups: list[list[str]] = []
    if obtuse:
        pool: list[str] = []  # the two most obtuse pairs (merges of merges), then unexplained models first
        for _, a, b in obtuse[:2] + sorted(obtuse, key=lambda o: ((o[1] in explained) + (o[2] in explained), o[0])):
            pool += [h for h in (a, b) if h not in pool]
        near = [y for y in rel if y not in pool and y not in explained]  # a task-arithmetic base sits off the segment
        groups.append([x, *pool[:POOL - 2], *near[:2]] if len(pool) > POOL - 2 else [x, *(pool + near)[:POOL]])
    for sp in spans:  # a set inside a group already offered was fitted with it (explanations tries subsets)
        if not any(set(sp) <= set(g) for g in groups):
            groups.append([x, *sp])
    exps: list[Explanation[str]] = []
    seen: set[frozenset[str]] = set()
    memo = f.explanations  # the second round often offers the same groups
    for group in groups:
        key = tuple(group)
        if key not in memo:
            memo[key] = [e for e in explanations(_stack_of(f, group), 0, list(range(1, len(group))))
                         if e.kind == "exact"]
        for e0 in memo[key]:
            e = Explanation(x, e0.kind, {group[i]: w for i, w in e0.weights.items()},
                            group[e0.base] if e0.base is not None else None, e0.quality)
            if frozenset(e.weights) not in seen:
                seen.add(frozenset(e.weights))
                exps.append(e)
    return exps


def _task_sets(f: _Family, x: str, rel: list[str], explained: set[str]) -> list[tuple[tuple, str, str, str]]:
    """(rank, a, b, m): two relatives of x that no recipe explains and a base m that x, a and b all grew from
    (training adds norm: r >= DIRECTED_R), a and b meeting at m, x - m mostly in the span of a - m, b - m; best first.

    Bases first by the share of coordinates x keeps exactly equal to them (a sparse merge keeps the base's value
    wherever its members' changes were dropped; a dense merge or a fine-tune keeps none but storage ties), then sets
    by the share of |x - m|^2 outside span(a - m, b - m): x carries its true parents' task vectors and nothing of a
    fine-tune of a parent, whose own training delta leaves residual (a parent replaced by its fine-tune, or a
    sibling, fits worse)."""
    pool = [y for y in rel if y not in explained][:AUDIT_POOL]
    hs = [x, *pool]
    DD = np.array([[f.dist2(u, v)[0] if u != v else 0.0 for v in hs] for u in hs])
    bases = [k for k in range(1, len(hs)) if f.growth(hs[k], x)[0] >= DIRECTED_R]
    eq = {k: round(getattr(f.pair(x, hs[k], compute=False), "equal", 0.0), 3) for k in bases}
    grew = {(m, k): f.growth(hs[m], hs[k])[0] >= DIRECTED_R for m in bases for k in range(1, len(hs)) if m != k}
    out = []
    for ia, ib in itertools.combinations(range(1, len(hs)), 2):
        for im in bases:
            if im in (ia, ib) or not (grew[im, ia] and grew[im, ib]):
                continue
            D = DD[np.ix_([0, ia, ib, im], [0, ia, ib, im])]
            if np.isnan(D).any() or middle(D, 1, 2, 3) != 3:
                continue
            # inner products of x - m, a - m, b - m from squared distances (law of cosines)
            g = np.array([[(D[i, 3] + D[j, 3] - D[i, j]) / 2 for j in range(3)] for i in range(3)])
            if min(g[0, 0], g[1, 1], g[2, 2]) <= 0:
                continue
            try:
                coef = np.linalg.solve(g[1:, 1:], g[1:, 0])
            except np.linalg.LinAlgError:
                continue
            residual = 1 - float(g[0, 1:] @ coef) / g[0, 0]
            if residual <= AUDIT_RESIDUAL and min(coef) > 0:
                out.append(((round(residual, 3), -eq[im]), hs[ia], hs[ib], hs[im]))
    return sorted(out)[:AUDIT_SETS]


def _audited(f: _Family, x: str, sets: list[tuple[tuple, str, str, str]]) -> list[Explanation[str]]:
    """The first set (in `sets`' order) the audit's verdict on the fingerprints calls a merge, as an explanation
    whose quality is minus its rank (empty when the audit calls none a merge)."""
    from modeltrace.fingerprint_audit import audit_fingerprints

    for rank, (_, a, b, m) in enumerate(sets):
        cands = [a, b, m]
        names = {h: f.m[h]["name"] for h in cands}
        fps = {names[h]: f.load(h) for h in cands}
        try:
            v = audit_fingerprints(f.load(x), f.m[x]["name"], [fps[names[h]] for h in cands],
                                   [names[h] for h in cands], names[m])
        except Exception:  # noqa: BLE001 - the detectors cannot run on this set: no claim
            continue
        if v.get("relation") != "merge":  # "related", "finetune" (with or without a chain), "upcycled": no merge
            continue
        by_name = {n: h for h, n in names.items()}
        ws = {by_name[p["model"]]: float(p.get("weight") or 0.0) for p in v.get("parents", [])
              if p.get("model") in by_name and by_name[p["model"]] != m}
        if len(ws) < 2 or min(ws.values()) < AUDIT_MIN_WEIGHT:  # sparse merges add positive task vectors
            continue
        return [_Audited(x, "audit", ws, m, -float(rank), v)]
    return []


def find_merges(f: _Family, reps: list[str], stacks: set[str], out: dict, audit: bool = False
                ) -> dict[str, Explanation[str]]:
    """Accepted recipes by model (`out` holds the stack edges found before, which count as ancestry); with `audit`,
    also the audited search for recipes that are not exact."""
    plain = [x for x in reps if x not in stacks]
    rel = {x: sorted((y for y in reps if y != x and f.related(x, y)), key=lambda y: f.dist2(x, y)[0]) for x in plain}
    obtuse = {x: _between(f, x, rel[x]) for x in plain}
    spans = {x: _span_sets(f, x, rel[x], set()) for x in plain}
    options = {x: _merge_options(f, x, rel[x], obtuse[x], spans[x]) for x in plain}
    first = {x for x, o in options.items() if o}  # again, offering models that no recipe explains first
    options.update({x: _merge_options(f, x, rel[x], obtuse[x], _span_sets(f, x, rel[x], first), first)
                    for x in plain if first and (obtuse[x] or spans[x])})
    explained = {x for x, o in options.items() if o}
    stack_parents = {x: {e["parent"] for e in out["edges"] if e["child"] == x} for x in stacks}
    accepted = _accept(_rank_exact(options, explained), [], stack_parents)
    if not audit:
        return accepted
    audited = {x: _audited(f, x, _task_sets(f, x, rel[x], set(accepted))) for x in plain if x not in accepted}
    audited = {x: o for x, o in audited.items() if o}
    ranked_a = [e for _, e in sorted(((sum(m in audited for m in e.members), -e.quality, x), e)  # one set a model
                                     for x, opts in audited.items() for e in opts)]
    first_pass = _accept(_rank_exact(options, explained), ranked_a, stack_parents, audited)
    # again, counting the merges the audit found as explained: an exact recipe over four models in one plane (a
    # base, two fine-tunes, their model-stock merge) then names the models that are not merges
    again = _accept(_rank_exact(options, explained | {x for x, e in first_pass.items() if e.kind == "audit"}),
                    ranked_a, stack_parents, audited)
    return again


def _rank_exact(options: dict[str, list[Explanation[str]]], explained: set[str]) -> list[Explanation[str]]:
    """Exact recipes, fewest members first, then those with fewest members some recipe explains."""
    return [e for _, e in sorted(((len(e.members), sum(m in explained for m in e.members), rank, x), e)
                                 for x, opts in options.items() for rank, e in enumerate(opts))]


def _accept(exact: list[Explanation[str]], audited: list[Explanation[str]], stack_parents: dict[str, set[str]],
            audited_by: dict[str, list[Explanation[str]]] | None = None) -> dict[str, Explanation[str]]:
    """Recipes accepted in order (exact ones, then audited ones whose members are no audited merge), never making a
    model its own ancestor."""
    accepted: dict[str, Explanation[str]] = {}
    parents = {x: set(p) for x, p in stack_parents.items()}

    def ancestors(h: str) -> set[str]:
        seen: set[str] = set()
        todo = [h]
        while todo:
            for p in parents.get(todo.pop(), ()):
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen

    for e in exact:
        x = e.target
        if x in accepted or any(m == x or x in ancestors(m) for m in e.members):
            continue
        accepted[x] = e
        parents[x] = set(e.members)
    for e in audited:
        x = e.target
        if x in accepted or any(m == x or x in ancestors(m) or m in accepted and m in (audited_by or {})
                                for m in e.members):
            continue
        accepted[x] = e
        parents[x] = set(e.members)
    return accepted


def recipe(f: _Family, x: str, e: Explanation[str], audit: bool) -> dict[str, Any]:
    """Method, weights and intervals from the audit's detectors on the fingerprints (as identify reports them); with
    `audit` off, the exact fit's own weights (median over tensors) and linear / task arithmetic by their signs."""
    from modeltrace.fingerprint_audit import audit_fingerprints

    if isinstance(e, _Audited):  # kind "audit"
        return _from_verdict(f, e, e.verdict)
    if not audit:
        neg = [m for m, w in e.weights.items() if w < 0]
        return {"method": "task_arithmetic" if neg else "linear", "kind": e.kind, "base": neg[0] if neg else None,
                "audit_relation": None, "weights": {m: {"weight": round(w, 4), "interval": None}
                                                    for m, w in e.weights.items()},
                "fit_weights": {h: round(w, 4) for h, w in e.weights.items()}, "parameters": {}, "layers": None}

    members = sorted(e.weights, key=lambda m: -abs(e.weights[m]))
    base = e.base
    if e.kind == "exact" and base is None and len(members) == 3:
        base = None
    cands = [*members, *([base] if base is not None and base not in members else [])]
    names = {h: f.m[h]["name"] for h in cands}
    fps = {names[h]: f.load(h) for h in cands}
    try:
        v = audit_fingerprints(f.load(x), f.m[x]["name"], [fps[names[h]] for h in cands],
                               [names[h] for h in cands], names[base] if base is not None else None)
    except Exception as exc:  # the fit's own weights stand when the detectors cannot run
        v = {"relation": "merge", "method": None, "parents": [], "error": str(exc)}
    by_name = {n: h for h, n in names.items()}
    weights = {p["model"]: p for p in v.get("parents", []) if p.get("model") in by_name}
    method = v.get("method") if v.get("relation") == "merge" else None
    if method is None:
        method = "task_arithmetic" if e.kind == "exact" and e.base is not None else \
            "linear" if e.kind == "exact" else "sparse"
    return {"method": method, "kind": e.kind, "base": base, "audit_relation": v.get("relation"),
            "weights": {by_name[n]: {"weight": p.get("weight"), "interval": p.get("interval")}
                        for n, p in weights.items()},
            "fit_weights": {h: round(w, 4) for h, w in e.weights.items()},
            "parameters": {k: d.get("value") for k, d in (v.get("parameters") or {}).items()
                           if isinstance(d, dict)}, "layers": v.get("layers")}


def _from_verdict(f: _Family, e: Explanation[str], v: dict[str, Any]) -> dict[str, Any]:
    by_name = {f.m[h]["name"]: h for h in e.members}
    return {"method": v.get("method") or "sparse", "kind": e.kind, "base": e.base, "audit_relation": v.get("relation"),
            "weights": {by_name[p["model"]]: {"weight": p.get("weight"), "interval": p.get("interval")}
                        for p in v.get("parents", []) if p.get("model") in by_name},
            "fit_weights": {h: round(w, 4) for h, w in e.weights.items()},
            "parameters": {k: d.get("value") for k, d in (v.get("parameters") or {}).items() if isinstance(d, dict)},
            "layers": v.get("layers")}
