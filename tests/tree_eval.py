"""Score a family tree against the collection's true tree (tests/tree_collection.py). Shared by tests/tree/ and
benchmarks/bench_tree.py.

- directed edges: an edge the tree states (parent -> child) is right when the manifest has that parent for that
  child; precision over the tree's edges, recall over the manifest's;
- merge weights: for every true merge with known coefficients (linear, task arithmetic) whose parents the tree named,
  the largest difference between a reported weight and the true coefficient (layer-independent recipes only);
- roots: models without parents in the manifest against models without parents in the tree;
- families: the manifest's connected components; an edge joining two of them is an edge between independent
  families.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Score:
    edges: int
    truth: int
    correct: int
    reversed: int
    precision: float
    recall: float
    roots_right: int
    roots_total: int
    extra_roots: list[str]
    cross_family: list[tuple[str, str]]
    merges_total: int
    merges_parents_right: int
    weight_errors: dict[str, float]
    by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)  # true kind -> (found, total)
    wrong: list[tuple[str, str, str]] = field(default_factory=list)
    missed: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def max_weight_error(self) -> float:
        return max(self.weight_errors.values(), default=0.0)


def true_families(models: dict[str, dict[str, Any]]) -> dict[str, int]:
    parent = {n: n for n in models}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for n, e in models.items():
        for p in e["parents"]:
            parent[find(n)] = find(p)
    roots = sorted({find(n) for n in models})
    return {n: roots.index(find(n)) for n in models}


def score(tree: Any, models: dict[str, dict[str, Any]]) -> Score:
    truth = {(p, n) for n, e in models.items() for p in e["parents"]}
    pred = {(e["parent"], e["child"]): e for e in tree.edges}
    correct = [k for k in pred if k in truth]
    rev = [k for k in pred if k not in truth and (k[1], k[0]) in truth]
    fam = true_families(models)
    cross = sorted(k for k in pred if fam[k[0]] != fam[k[1]])
    true_roots = {n for n, e in models.items() if not e["parents"]}
    tree_roots = {n for n in tree.nodes if not tree.parents(n)}
    by_kind: dict[str, list[int]] = {}
    for p, n in truth:
        k = models[n]["kind"]
        by_kind.setdefault(k, [0, 0])
        by_kind[k][1] += 1
        by_kind[k][0] += (p, n) in pred
    merges = [n for n, e in models.items() if e["kind"] == "merge"]
    right = [n for n in merges if {e["parent"] for e in tree.parents(n) if e["relation"] == "merge"}
             == set(models[n]["parents"])]
    werr: dict[str, float] = {}
    for n in right:
        e = models[n]
        coeffs = e.get("coefficients")
        if not coeffs or e.get("coefficients_by_layer") or e.get("layer_values"):
            continue
        got = {x["parent"]: x.get("weight") for x in tree.parents(n)}
        base = e.get("base")
        errs = [abs((got.get(k) or 0.0) - w) for k, w in coeffs.items() if k != base and k in got]
        if errs:
            werr[n] = max(errs)
    return Score(len(pred), len(truth), len(correct), len(rev), len(correct) / max(1, len(pred)),
                 len(correct) / max(1, len(truth)), len(true_roots & tree_roots), len(true_roots),
                 sorted(tree_roots - true_roots), cross, len(merges), len(right), werr,
                 {k: (v[0], v[1]) for k, v in sorted(by_kind.items())},
                 sorted((p, n, pred[(p, n)]["relation"]) for p, n in pred if (p, n) not in truth),
                 sorted((p, n, models[n]["kind"]) for p, n in truth if (p, n) not in pred))
