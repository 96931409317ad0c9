"""The fine-tune step's direct arborescence (tree/arborescence.py) gives networkx's answer wherever it answers."""

from __future__ import annotations

import itertools

import numpy as np

from modeltrace.tree.arborescence import direct_search, edmonds_search

ROOT = "\0root"


def _case(rng: np.random.Generator, n: int) -> tuple[list[str], list[tuple[str, str]], dict]:
    reps = [f"m{i}" for i in range(n)]
    merge = reps[0] if n >= 4 and rng.random() < 0.5 else None  # a merge of two others: parents fixed
    fixed = [(p, merge) for p in rng.choice(reps[1:], 2, replace=False)] if merge else []
    weights = {(ROOT, x): 0.0 if x == merge else 0.5 for x in reps}
    for u, v in itertools.permutations(reps, 2):
        if v != merge and rng.random() < 0.8:
            weights[u, v] = float(rng.uniform(0.01, 0.7))
    return reps, fixed, weights


def test_direct_search_matches_networkx() -> None:
    rng = np.random.default_rng(0)
    answered = 0
    for k in range(300):
        reps, fixed, weights = _case(rng, 2 + k % 6)
        got = direct_search(reps, fixed, weights, ROOT)
        if got is not None:
            answered += 1
            assert set(got) == set(edmonds_search(reps, fixed, weights, ROOT))
    assert answered >= 200  # ties are rare with random costs: nearly every family is answered directly


def test_tie_goes_to_networkx() -> None:
    reps = ["a", "b"]
    weights = {(ROOT, "a"): 0.5, (ROOT, "b"): 0.5, ("a", "b"): 0.2, ("b", "a"): 0.2}
    assert direct_search(reps, [], weights, ROOT) is None
