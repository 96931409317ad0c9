"""The fine-tune step's arborescence (tree/family.py step 4): each model's one parent among its relatives, cheapest
in all, never closing a cycle through the merges' and stacks' fixed parents.

Data flow: edge costs u -> v (and from a virtual root) + the fixed edges -> `direct_search`: where the minimum
spanning arborescence is the only one (the cheapest incoming edges when they make no cycle; else Chu-Liu/Edmonds,
certified unique by finding the best arborescence without each of its edges in turn) and every cycle it closes
through the fixed edges names the same costliest edge of its own, that edge is forbidden and the search repeated; on
any tie (within TIE) or cycles that disagree, None -> `edmonds_search`: networkx's Edmonds, the same loop, whose
answer on ties depends on its edge order. Where both answer they agree (tests/tree/test_arborescence.py); the direct
one costs a few hundred microseconds a family, networkx's a few milliseconds.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TIE", "direct_search", "edmonds_search"]


def edmonds_search(reps: list[str], fixed_edges: list[tuple[str, str]], weights: dict[tuple[str, str], float],
                   root: str) -> list[tuple[str, str]]:
    """The fine-tune edges: a minimum spanning arborescence (Edmonds, networkx) over `weights`; where its edges close
    a cycle through the merges' and stacks' edges, the costliest of its edges on the cycle is forbidden and the
    arborescence found again."""
    import networkx as nx
    from networkx.algorithms.tree.branchings import minimal_branching

    forbidden: set[tuple[str, str]] = set()
    for _ in range(len(reps) + 1):
        g = nx.DiGraph()
        g.add_node(root)
        for (u, v), w in weights.items():
            if (u, v) not in forbidden:
                g.add_edge(u, v, weight=w)
        # minimum_spanning_arborescence is this branching plus a check that costs as much again: here every model
        # has an edge from the root, so the branching spans; the check kept is its edge count
        arb = minimal_branching(g, attr="weight", preserve_attrs=True)
        if arb.number_of_edges() != len(reps):
            raise nx.NetworkXException("No minimum spanning arborescence in G.")
        chosen = [(u, v) for u, v in arb.edges() if u != root]
        full = nx.DiGraph(fixed_edges + chosen)
        try:
            cycle = nx.find_cycle(full)
        except nx.NetworkXNoCycle:
            break
        mine = [e for e in cycle if (e[0], e[1]) in set(chosen)]
        if not mine:
            raise RuntimeError(f"cycle among merges and stacks: {cycle}")
        worst = max(mine, key=lambda e: g.edges[e[0], e[1]]["weight"])
        forbidden.add((worst[0], worst[1]))
    return chosen


def direct_search(reps: list[str], fixed_edges: list[tuple[str, str]], weights: dict[tuple[str, str], float],
                  root: str) -> list[tuple[str, str]] | None:
    """`edmonds_search`'s answer without networkx where it is certain (families of a few models): where the minimum
    arborescence is the only one (`_unique_arborescence`), networkx finds the same edges; where they close cycles
    through the fixed edges and every cycle's costliest edge of theirs is the same one (by more than TIE), that edge
    is forbidden, whichever cycle networkx would have found. None (ask networkx) on any tie or cycles that
    disagree."""
    forbidden: set[tuple[str, str]] = set()
    for _ in range(len(reps) + 1):
        allowed = {e: w for e, w in weights.items() if e not in forbidden}
        chosen_set = _unique_arborescence(reps, allowed, root)
        if chosen_set is None:
            return None
        chosen = [e for e in allowed if e in chosen_set and e[0] != root]
        cycles = _cycles(fixed_edges + chosen)
        if cycles is None:
            return None
        if not cycles:
            return chosen
        worst = set()
        for cycle in cycles:
            mine = sorted((weights[e], e) for e in cycle if e in set(chosen))
            if not mine or (len(mine) > 1 and mine[-1][0] - mine[-2][0] <= TIE * (abs(mine[-1][0]) + 1)):
                return None
            worst.add(mine[-1][1])
        if len(worst) != 1:
            return None
        forbidden.add(worst.pop())
    return None


#: Another arborescence within this share of the best one's cost counts as a tie (Edmonds might pick it).
TIE = 1e-9


def _unique_arborescence(reps: list[str], weights: dict[tuple[str, str], float], root: str
                         ) -> set[tuple[str, str]] | None:
    """The minimum spanning arborescence when it is the only one (None when another one costs as little, within
    TIE): the cheapest incoming edges when they make none; else Chu-Liu/Edmonds, certified unique by finding the
    best arborescence without each of its edges in turn."""
    best_in: dict[str, list[tuple[float, str]]] = {x: [] for x in reps}
    for (u, v), w in weights.items():
        best_in[v].append((w, u))
    parent: dict[str, str] = {}
    unique = True
    for v in reps:
        if not best_in[v]:
            return None
        w0 = min(w for w, _ in best_in[v])
        at = [u for w, u in best_in[v] if w == w0]
        unique &= len(at) == 1
        parent[v] = at[0]
    if unique and _reaches_root(parent, root):
        return {(parent[v], v) for v in reps}
    got = _chu_liu(set(reps), weights, root)
    if got is None:
        return None
    cost = sum(weights[e] for e in got)
    for e in got:
        other = _chu_liu(set(reps), {k: w for k, w in weights.items() if k != e}, root)
        if other is not None and sum(weights[k] for k in other) <= cost + TIE * (abs(cost) + 1):
            return None
    return got


def _reaches_root(parent: dict[str, str], root: str) -> bool:
    for v in parent:
        x, steps = v, 0
        while x != root:
            x, steps = parent[x], steps + 1
            if steps > len(parent):
                return False
    return True


def _chu_liu(nodes: set, weights: dict, root: Any) -> set | None:
    """A minimum spanning arborescence of `nodes` from `root` (Chu-Liu/Edmonds, by contraction); None if none."""
    best: dict[Any, tuple[float, Any]] = {}
    for (u, v), w in weights.items():
        if v != root and u != v and (v not in best or w < best[v][0]):
            best[v] = (w, u)
    if any(v not in best for v in nodes):
        return None
    parent = {v: best[v][1] for v in nodes}
    cycle: list = []
    for v in nodes:
        path, x = [], v
        while x in parent and x not in path:
            path.append(x)
            x = parent[x]
        if x in path:
            cycle = path[path.index(x):]
            break
    if not cycle:
        return {(parent[v], v) for v in nodes}
    cyc = set(cycle)
    c = ("\0cycle", len(nodes), tuple(sorted(map(str, cyc))))
    sub: dict = {}
    origin: dict = {}
    for (u, v), w in weights.items():
        if u in cyc and v in cyc:
            continue
        key = (c if u in cyc else u, c if v in cyc else v)
        w2 = w - best[v][0] if v in cyc else w
        if key not in sub or w2 < sub[key]:
            sub[key], origin[key] = w2, (u, v)
    got = _chu_liu((nodes - cyc) | {c}, sub, root)
    if got is None:
        return None
    out = {origin[e] for e in got}
    entering = next(origin[e][1] for e in got if e[1] == c)
    return out | {(parent[v], v) for v in cyc if v != entering}


def _cycles(edges: list[tuple[str, str]], limit: int = 64) -> list[list[tuple[str, str]]] | None:
    """Every simple cycle of a small graph (as edge lists); None past `limit` cycles or search steps."""
    out: dict[str, list[str]] = {}
    for u, v in dict.fromkeys(edges):
        out.setdefault(u, []).append(v)
    order = {h: i for i, h in enumerate(sorted(out))}
    found: list[list[tuple[str, str]]] = []
    steps = 0
    for s in out:  # cycles through s and nodes after it only: each cycle once
        stack = [(s, [s])]
        while stack:
            x, path = stack.pop()
            steps += 1
            if steps > 64 * limit:
                return None
            for y in out.get(x, ()):
                if y == s:
                    found.append(list(zip(path, path[1:] + [s], strict=True)))
                    if len(found) > limit:
                        return None
                elif y in order and order[y] > order[s] and y not in path:
                    stack.append((y, path + [y]))
    return found
