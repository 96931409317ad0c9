"""Merges within a family (tree/family.py step 3): which models are exact recipes of others, and their recipe.

Data flow: a family's cached pairs -> per model, relatives making an obtuse angle at it -> Gram stack assembled from
the cached pairs (no fingerprint decoded) -> fingerprint/lineage.py's `explanations` -> accepted fewest parents first,
then parents no recipe explains, never a cycle -> method, weights and intervals from the audit's detectors on the
fingerprints (identify's `_audit_on`), or the fit's own weights in large indexes.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from modeltrace.fingerprint.compare import GramStack
from modeltrace.fingerprint.lineage import Explanation, explanations

if TYPE_CHECKING:
    from modeltrace.tree.family import _Family

__all__ = ["find_merges", "recipe"]

#: A model is offered to the merge search when two relatives make an obtuse angle at it:
#: d(x,a)^2 + d(x,b)^2 <= BETWEEN * d(a,b)^2 (fine-tunes of one base meet at about 90 degrees, ratio 1).
BETWEEN = 0.9
#: Relatives a merge's recipe is searched among.
POOL = 8


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
    present = np.zeros((s, n), dtype=bool)
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
        have = np.zeros(s, dtype=bool)
        have[[pos[k] for k in p.keys if k in pos]] = True
        present[:, i] &= have
        present[:, j] &= have
    floor = np.array([[f.m[h]["floors"].get(k, 0.0) for h in group] for k in keys])
    return GramStack([f.m[h]["name"] for h in group], [None] * s, [{} for _ in group], G, present, floor,  # type: ignore[list-item]
                     np.zeros((n, n, 0), dtype=bool), np.zeros((n, 0), dtype=bool))


def _merge_options(f: _Family, x: str, rel: list[str], obtuse: list[tuple[float, str, str]],
                   explained: set[str]) -> list[Explanation]:
    """Plausible recipes for x over the relatives making an obtuse angle at it, those not in `explained` (models
    some recipe reproduces) first, so a merge's true parents are in its pool even among many sibling merges."""
    exps: list[Explanation] = []
    group: list[str] = [x]
    if obtuse:
        pool: list[str] = []  # the two most obtuse pairs (merges of merges), then unexplained models first
        for _, a, b in obtuse[:2] + sorted(obtuse, key=lambda o: ((o[1] in explained) + (o[2] in explained), o[0])):
            pool += [h for h in (a, b) if h not in pool]
        near = [y for y in rel if y not in pool and y not in explained]  # a task-arithmetic base sits off the segment
        group = [x, *pool[:POOL - 2], *near[:2]] if len(pool) > POOL - 2 else [x, *(pool + near)[:POOL]]
        exps = [e for e in explanations(_stack_of(f, group), 0, list(range(1, len(group)))) if e.kind == "exact"]
    for e in exps:
        e.target = x  # type: ignore[assignment]
        e.weights = {group[i]: w for i, w in e.weights.items()}  # type: ignore[assignment]
        e.base = group[e.base] if e.base is not None else None  # type: ignore[assignment]
    return exps


def find_merges(f: _Family, reps: list[str], stacks: set[str], out: dict) -> dict[str, Explanation]:
    """Accepted recipes by model (`out` holds the stack edges found before, which count as ancestry)."""
    plain = [x for x in reps if x not in stacks]
    rel = {x: sorted((y for y in reps if y != x and f.related(x, y)), key=lambda y: f.dist2(x, y)[0]) for x in plain}
    obtuse = {x: _between(f, x, rel[x]) for x in plain}
    options = {x: _merge_options(f, x, rel[x], obtuse[x], set()) for x in plain}
    first = {x for x, o in options.items() if o}  # again, offering models that no recipe explains first
    options.update({x: _merge_options(f, x, rel[x], obtuse[x], first) for x in first})
    explained = {x for x, o in options.items() if o}
    ranked = sorted(((e.kind != "exact", len(e.members), sum(m in explained for m in e.members), rank, x), e)
                    for x, opts in options.items() for rank, e in enumerate(opts))
    accepted: dict[str, Explanation] = {}
    parents: dict[str, set[str]] = {x: {e["parent"] for e in out["edges"] if e["child"] == x} for x in stacks}

    def ancestors(h: str) -> set[str]:
        seen, todo = set(), [h]
        while todo:
            for p in parents.get(todo.pop(), ()):
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen

    for _, e in ranked:
        x = e.target
        if x in accepted or any(m == x or x in ancestors(m) for m in e.members):  # type: ignore[operator]
            continue
        accepted[x] = e  # type: ignore[index]
        parents[x] = set(e.members)  # type: ignore[arg-type,index]
    return accepted


def recipe(f: _Family, x: str, e: Explanation, audit: bool) -> dict[str, Any]:
    """Method, weights and intervals from the audit's detectors on the fingerprints (as identify reports them); with
    `audit` off, the exact fit's own weights (median over tensors) and linear / task arithmetic by their signs."""
    from modeltrace.identify import _audit_on

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
        v = _audit_on(f.load(x), f.m[x]["name"], fps, [names[h] for h in cands],
                      names[base] if base is not None else None)
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
