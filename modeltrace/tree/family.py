"""Solve one family (models connected by significant pairwise evidence): who is whose direct parent, and how.

Data flow: members (tree/cache.py model infos) + their pairs (tree/evidence.py) -> in this order:

1. copies: pairs equal up to storage rounding (or quantization, when one side is stored quantized) are grouped; the
   original is the member whose values need the richest grid (float32 > 16-bit > quantized), stored natively in it;
   the others are its `recast` / `quantized` / `copy` children and take no further part (quantized models are leaves);
2. stacks: a model whose every layer is a whole copy of a layer of other members, with more than one source or a moved
   layer (fingerprint/lineage.py's `stack_sources`, from the pairs' copied-layer maps);
3. merges (tree/merges.py): a model between two others (the angle it makes with them is obtuse) is offered to
   fingerprint/lineage.py's `explanations` (exact recipes to storage rounding) over its relatives; explanations are
   accepted fewest parents first, then those whose parents are not themselves explained, never making a cycle. A
   merge's method and weights (with intervals) then come from the audit's own detectors run on the fingerprints
   (audit_fingerprints); then, for models no exact recipe explains, candidate parent sets (two relatives and a
   base they grew from) audited on the fingerprints, a merge accepted only on the verdict's relation "merge";
4. fine-tunes: a minimum spanning arborescence (tree/arborescence.py) over the rest, merges and stacks entering only as
   parents. Edge cost u -> v is the relative distance times a direction penalty: a child is its parent plus one
   training delta that does not depend on the parent's weights, so tensor by tensor |v|^2 - |u|^2 = |v - u|^2
   (r = +1); the reverse pair gives r = -1 and two siblings something in between. A declared `base_model` on v
   naming u lowers the cost (a prior, named in the edge). Each edge then states what decided its direction: the
   weights (sign test of the norm growth over tensors), its parent's own edge (a model has one parent), the
   declaration, or nothing ("undetermined"); an edge whose r is near 0 may join two siblings whose base is missing.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from modeltrace.fingerprint.core import Fingerprint
from modeltrace.tree.arborescence import direct_search, edmonds_search
from modeltrace.tree.evidence import COPY_SCALE_TOL, DIRECTED_R, Pair
from modeltrace.tree.merges import find_merges
from modeltrace.tree.merges import recipe as merge_recipe

if TYPE_CHECKING:
    from modeltrace.fingerprint.lineage import Explanation

__all__ = ["solve_family"]

#: Direction penalty: cost(u -> v) = distance * (1 + DIRECTION_WEIGHT * (1 - r) / 2).
DIRECTION_WEIGHT = 3.0
#: Cost of making a model a root (relative distance units: unrelated models are ~1.4 apart, fine-tunes ~0.01-0.3).
ROOT_COST = 0.5
#: A declared base_model multiplies the cost of the edge it names by this (a prior, never proof).
PRIOR_FACTOR = 0.7
#: Direction from the weights when the sign test over tensors gives p below this and r at least DIRECTED_R
#: (tree/evidence.py).
DIRECTION_P = 1e-3
#: Copies differ by at most this many times the two models' expected squared storage rounding, tensor by tensor.
COPY_FLOORS = 4.0


Getter = Callable[[str, str], Pair]
Loader = Callable[[str], Fingerprint]


class _Family:
    def __init__(self, members: list[dict], pairs: dict[tuple[str, str], Pair], alpha_log10: float,
                 get_pair: Getter, load: Loader) -> None:
        self.m = {x["hash"]: x for x in members}
        self.pairs = pairs
        self.alpha = alpha_log10
        self.get_pair = get_pair
        self.load = load
        self._dist: dict[tuple[str, str], tuple[float, float]] = {}
        self._growth: dict[tuple[str, str], tuple[float, int, int]] = {}
        #: exact recipes fitted per group of models (tree/merges.py: the second round often offers the same groups)
        self.explanations: dict[tuple[str, ...], list[Explanation[int]]] = {}

    @overload
    def pair(self, a: str, b: str, compute: Literal[True] = True) -> Pair: ...

    @overload
    def pair(self, a: str, b: str, compute: bool) -> Pair | None: ...

    def pair(self, a: str, b: str, compute: bool = True) -> Pair | None:
        """The pair's evidence: computed (and kept) when not cached, unless `compute` is off (then None)."""
        key = (a, b) if a < b else (b, a)
        p = self.pairs.get(key)
        if p is None and compute:
            p = self.pairs[key] = self.get_pair(*key)
        return p

    def related(self, a: str, b: str) -> bool:
        p = self.pair(a, b, compute=False)
        return p is not None and p.log10_p < self.alpha

    def dist2(self, a: str, b: str, compute: bool = False) -> tuple[float, float]:
        """(squared distance, mean squared norm) over the pair's shared tensors; (nan, nan) if not cached."""
        key = (a, b) if a < b else (b, a)
        got = self._dist.get(key)
        if got is None:
            p = self.pair(a, b, compute)
            if p is None or not p.keys:
                return math.nan, math.nan
            got = self._dist[key] = (float((p.gaa - 2 * p.gab + p.gbb).sum()), float((p.gaa + p.gbb).sum() / 2))
        return got

    def rel_dist(self, a: str, b: str) -> float:
        d, n = self.dist2(a, b)
        return math.sqrt(max(d, 0.0) / n) if n and n > 0 else math.inf

    def growth(self, u: str, v: str) -> tuple[float, int, int]:
        """(median r, tensors where v is larger, tensors compared): r = (|v|^2 - |u|^2) / |v - u|^2 per tensor."""
        got = self._growth.get((u, v))
        if got is None:
            got = self._growth[u, v] = self._growth_of(u, v)
        return got

    def _growth_of(self, u: str, v: str) -> tuple[float, int, int]:
        p = self.pair(u, v, compute=False)
        if p is None or not p.keys:
            return 0.0, 0, 0
        guu, gvv = (p.gaa, p.gbb) if p.a == u else (p.gbb, p.gaa)
        d = p.gaa - 2 * p.gab + p.gbb
        floors = np.array([self.m[u]["floors"].get(k, 0.0) + self.m[v]["floors"].get(k, 0.0) for k in p.keys])
        ok = d > 4 * floors + 1e-12 * (p.gaa + p.gbb)
        if not ok.any():
            return 0.0, 0, 0
        r = (gvv[ok] - guu[ok]) / d[ok]
        return float(np.median(r)), int((gvv[ok] > guu[ok]).sum()), int(ok.sum())


# ---- 1. copies --------------------------------------------------------------------------------------------------
def _is_copy(f: _Family, p: Pair) -> bool:
    """Equal up to the two models' storage rounding (or quantization) on almost every shared tensor, at scale 1."""
    if not p.keys:
        return False
    d = p.gaa - 2 * p.gab + p.gbb
    floors = np.array([f.m[p.a]["floors"].get(k, 0.0) + f.m[p.b]["floors"].get(k, 0.0) for k in p.keys])
    scale = p.gab / np.maximum(p.gbb, 1e-300)
    within = d <= COPY_FLOORS * floors + 1e-12 * (p.gaa + p.gbb)
    return bool(np.mean(within) >= 0.9 and np.median(np.abs(scale - 1)) <= COPY_SCALE_TOL)


_GRID_RANK = {"f32": 3, "bf16": 2, "f16": 2, "quant": 0}


def _original_key(x: dict) -> tuple:
    native = x["grid"] == x["dtype"].lower() or (x["grid"] == "f32" and x["dtype"].upper() == "F32")
    return (-_GRID_RANK.get(x["grid"], 1), not native, x.get("format") == "gguf", x.get("added_at", ""), x["name"])


def _copies(f: _Family, out: dict) -> dict[str, str]:
    parent = {h: h for h in f.m}

    def find(h: str) -> str:
        while parent[h] != h:
            parent[h] = parent[parent[h]]
            h = parent[h]
        return h

    for p in f.pairs.values():
        if p.a in f.m and p.b in f.m and _is_copy(f, p):
            parent[find(p.a)] = find(p.b)
    groups: dict[str, list[str]] = {}
    for h in f.m:
        groups.setdefault(find(h), []).append(h)
    rep: dict[str, str] = {}
    for members in groups.values():
        orig = min(members, key=lambda h: _original_key(f.m[h]))
        for h in members:
            rep[h] = orig
            if h == orig:
                continue
            child, src = f.m[h], f.m[orig]
            rel = "quantized" if child["grid"] == "quant" else "copy" if child["dtype"] == src["dtype"] else "recast"
            cp = f.pair(orig, h, compute=False)
            out["edges"].append(_edge(orig, h, rel, cp.log10_p if cp else None, "copy",
                                      f"{src['dtype']} -> {child['dtype']}; the original holds the richer values"))
    return rep


# ---- 2. stacks --------------------------------------------------------------------------------------------------
def _copied_layers(f: _Family, x: str, y: str) -> dict[int, int]:
    p = f.pair(x, y, compute=False)
    if p is None:
        return {}
    return p.copies_ab if p.a == x else p.copies_ba


def _stacks(f: _Family, reps: list[str], out: dict) -> set[str]:
    found: dict[str, list[tuple[str, dict[int, int]]]] = {}
    for x in reps:
        n = int(f.m[x]["n_layers"] or 0)
        if n <= 0:
            continue
        covers = {y: _copied_layers(f, x, y) for y in reps if y != x and f.related(x, y)}
        covers = {y: c for y, c in covers.items() if c}
        if not covers or set().union(*map(set, covers.values())) != set(range(n)):
            continue
        if any(len(c) == n and all(i == j for i, j in c.items()) for c in covers.values()):
            continue  # a copy of one model's layers
        found[x] = list(covers.items())
    for x, sources in found.items():
        left = set(range(int(f.m[x]["n_layers"])))
        chosen: list[tuple[str, dict[int, int]]] = []
        while left:  # sources that are not stacks themselves first, most layers first
            y, c = max(sources, key=lambda yc: (yc[0] not in found, len(set(yc[1]) & left), yc[0]))
            chosen.append((y, {i: j for i, j in c.items() if i in left}))
            left -= set(c)
        if len(chosen) == 1 and all(i == j for i, j in chosen[0][1].items()):
            continue
        lmap: list[dict[str, Any]] = sorted(
            ({"layer": i, "parent": y, "parent_layer": j} for y, c in chosen for i, j in c.items()),
            key=lambda e: e["layer"])
        out["stacks"][x] = {"layer_map": lmap}
        for y, c in chosen:
            p = f.pair(x, y, compute=False)
            out["edges"].append(_edge(y, x, "stack", p.log10_p if p else None, "stack",
                                      f"layers {_ranges(sorted(c))} copied from its layers "
                                      f"{_ranges(sorted(c.values()))}",
                                      layers=sorted(c)))
    return set(out["stacks"])


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


# ---- 4. fine-tunes ----------------------------------------------------------------------------------------------
def _declares(f: _Family, child: str, parent: str) -> bool:
    return parent in f.m[child].get("declared_hashes", [])


def _finetunes(f: _Family, reps: list[str], fixed: dict[str, set[str]], out: dict) -> None:
    anc: dict[str, set[str]] = {}

    def ancestors(h: str) -> set[str]:
        if h not in anc:
            seen, todo = set(), [h]
            while todo:
                for p in fixed.get(todo.pop(), ()):
                    if p not in seen:
                        seen.add(p)
                        todo.append(p)
            anc[h] = seen
        return anc[h]

    root = "\0root"
    weights: dict[tuple[str, str], float] = {(root, x): 0.0 if x in fixed else ROOT_COST for x in reps}
    for u, v in itertools.permutations(reps, 2):
        if v in fixed or not f.related(u, v) or v in ancestors(u):
            continue
        r, _, _ = f.growth(u, v)
        cost = f.rel_dist(u, v) * (1 + DIRECTION_WEIGHT * (1 - max(-1.0, min(1.0, r))) / 2)
        weights[u, v] = cost * (PRIOR_FACTOR if _declares(f, v, u) else 1.0)
    fixed_edges = [(p, c) for c, ps in fixed.items() for p in ps]
    chosen = direct_search(reps, fixed_edges, weights, root)
    if chosen is None:
        chosen = edmonds_search(reps, fixed_edges, weights, root)
    basis: dict[str, str] = {x: ("merge" if x in out["merges"] else "stack") for x in fixed}
    for u, v in _ordered(chosen, basis):
        r, up, n = f.growth(u, v)
        p = f.pair(u, v, compute=False)
        assert p is not None  # an edge joins related models only, whose pair is cached
        lp = p.log10_p
        sign_p = _sign_log10_p(up, n)
        if sign_p <= math.log10(DIRECTION_P) and r >= DIRECTED_R:
            how = "weights"
        elif basis.get(u, "undetermined") != "undetermined":
            how = "implied"
        elif _declares(f, v, u):
            how = "declared"
        else:
            how = "undetermined"
        basis[v] = how
        notes = [f"r = {r:+.2f} ({up}/{n} tensors larger in the child; direction p = {10 ** sign_p:.1e})"]
        if _declares(f, v, u):
            notes.append(f"{f.m[v]['name']}'s card declares base_model {f.m[u]['name']} (prior)")
        sibling = abs(r) < DIRECTED_R and how != "implied"
        if sibling:
            notes.append("parent or sibling: the weights do not tell (their shared base may be missing)")
        out["edges"].append(_edge(u, v, "finetune", lp, how, "; ".join(notes), r=round(r, 3),
                                  parent_or_sibling=sibling))


def _ordered(edges: list[tuple[str, str]], fixed_basis: dict[str, str]) -> list[tuple[str, str]]:
    """Edges parents-first, so each edge can lean on its parent's."""
    import networkx as nx

    g = nx.DiGraph(edges)
    order = {h: i for i, h in enumerate(nx.topological_sort(g))}
    return sorted(edges, key=lambda e: order[e[0]])


@functools.lru_cache(maxsize=4096)  # a few tensor counts recur in every family
def _sign_log10_p(up: int, n: int) -> float:
    """log10 of the one-sided binomial p of `up` or more of `n` tensors growing, under a fair coin."""
    if n == 0:
        return 0.0
    from scipy.stats import binom

    return float(max(binom.logsf(up - 1, n, 0.5) / math.log(10), -300.0))


# ---- the whole family -------------------------------------------------------------------------------------------
def _edge(parent: str, child: str, relation: str, log10_p: float | None, direction: str, note: str,
          **extra: Any) -> dict[str, Any]:
    return {"parent": parent, "child": child, "relation": relation,
            "log10_p": None if log10_p is None else round(float(log10_p), 2), "direction": direction,
            "note": note, **extra}


def solve_family(members: list[dict], pairs: dict[tuple[str, str], Pair], alpha_log10: float, get_pair: Getter,
                 load: Loader, audit_recipes: bool = True) -> dict[str, Any]:
    """Edges (parent -> child, relation, evidence), merge recipes and stack layer maps of one family; hashes as ids.
    `audit_recipes`: name each merge's method and weight intervals with the audit's detectors (~0.1 s a merge)."""
    f = _Family(members, pairs, alpha_log10, get_pair, load)
    out: dict[str, Any] = {"edges": [], "merges": {}, "stacks": {}}
    rep = _copies(f, out)
    reps = sorted({r for r in rep.values()})
    stacks = _stacks(f, reps, out)
    merges = find_merges(f, reps, stacks, out, audit_recipes)
    fixed: dict[str, set[str]] = {x: {e["parent"] for e in out["edges"] if e["child"] == x} for x in stacks}
    for x, e in merges.items():
        recipe = merge_recipe(f, x, e, audit_recipes)
        out["merges"][x] = recipe
        fixed[x] = set(e.members)
        for m in e.members:
            p = f.pair(m, x)
            w = recipe["weights"].get(m, {})
            role = "base" if m == recipe["base"] and m not in recipe["weights"] else "parent"
            out["edges"].append(_edge(m, x, "merge", p.log10_p if p else None, "merge",
                                      f"{role} of the {recipe['method']} merge", role=role,
                                      weight=w.get("weight", recipe["fit_weights"].get(m)),
                                      interval=w.get("interval")))
    _finetunes(f, reps, fixed, out)
    return out
