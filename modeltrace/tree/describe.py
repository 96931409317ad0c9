"""From solved families (content hashes) to the tree's nodes and edges by model name, with plain-words summaries.

Data flow: family solutions (tree/family.py) + index entries -> edges renamed, p-values stated, and per node: its
role (independent, root, fine-tune, merge, stack, copy), the family it belongs to, its depth, its recipe or layer map
and one summary line that names the chain it came through ("fine-tune of t_mc_lin (0.60 × t_c2 + 0.40 × t_c3,
linear)") -> `Tree` (defined here): nodes and edges by model name, with parents, ancestors, descendants, subtrees and
a networkx view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modeltrace.stats import format_p

__all__ = ["Tree", "assemble", "summary"]

ROLE_OF = {"finetune": "finetune", "merge": "merge", "stack": "stack", "copy": "copy", "recast": "copy",
           "quantized": "copy"}


@dataclass(frozen=True)
class Tree:
    """The lineage graph: `nodes[name]` (attributes) and `edges` (parent -> child, relation, evidence)."""

    index: str
    nodes: dict[str, dict[str, Any]]
    edges: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)
    _in: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False, compare=False)
    _out: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for e in self.edges:
            self._in.setdefault(e["child"], []).append(e)
            self._out.setdefault(e["parent"], []).append(e)

    def graph(self):
        import networkx as nx

        g = nx.MultiDiGraph()
        for n, a in self.nodes.items():
            g.add_node(n, **a)
        for e in self.edges:
            g.add_edge(e["parent"], e["child"], **e)
        return g

    def parents(self, name: str) -> list[dict[str, Any]]:
        return list(self._in.get(name, []))

    def children(self, name: str) -> list[dict[str, Any]]:
        return list(self._out.get(name, []))

    def ancestors(self, name: str) -> list[str]:
        """Every ancestor, nearest first."""
        return self._walk(name, self._in, "parent")

    def descendants(self, name: str) -> list[str]:
        return self._walk(name, self._out, "child")

    @staticmethod
    def _walk(name: str, edges: dict[str, list[dict[str, Any]]], end: str) -> list[str]:
        """Models reached from `name` along `edges` (by their `end`), breadth first, nearest first."""
        seen: list[str] = []
        todo = [name]
        while todo:
            nxt = []
            for x in todo:
                for e in edges.get(x, []):
                    if e[end] not in seen and e[end] != name:
                        seen.append(e[end])
                        nxt.append(e[end])
            todo = nxt
        return seen

    def subtree(self, name: str) -> Tree:
        """`name` with its ancestors and descendants (and the merge co-parents that name its descendants' recipes)."""
        keep = {name, *self.ancestors(name), *self.descendants(name)}
        for e in self.edges:
            if e["child"] in keep and e["relation"] == "merge":
                keep.add(e["parent"])
        return Tree(self.index, {n: a for n, a in self.nodes.items() if n in keep},
                    [e for e in self.edges if e["parent"] in keep and e["child"] in keep],
                    {**self.stats, "focus": name})


def recipe_text(rec: dict[str, Any], name_of: dict[str, str]) -> str:
    ws = {h: (w.get("weight") if isinstance(w, dict) else w) for h, w in rec["weights"].items()}
    if not ws or any(v is None for v in ws.values()):
        ws = dict(rec.get("fit_weights") or {})
    base = rec.get("base")
    method = rec.get("method") or "merge"
    terms = [(name_of.get(h, h), w) for h, w in sorted(ws.items(), key=lambda x: -abs(x[1] or 0)) if h != base]
    if base and method not in ("linear", "slerp"):
        body = f"{name_of.get(base, base)} + " + " + ".join(f"{w:.2f} × ({n} − {name_of.get(base, base)})"
                                                          for n, w in terms)
    else:
        body = " + ".join(f"{w:.2f} × {n}" for n, w in terms)
    if method == "slerp" and rec.get("parameters", {}).get("t") is not None:
        body = f"slerp({', '.join(n for n, _ in terms)}, t = {rec['parameters']['t']:.2f})"
    return f"{body}, {method}"


def assemble(index_path: str, hashes: list[str], entries: dict, infos: dict[str, dict], families: list[list[str]],
             solutions: list[dict], name_of: dict[str, str]) -> Tree:
    fam_of = {h: i for i, fam in enumerate(families) for h in fam}
    nodes: dict[str, dict[str, Any]] = {}
    for h in hashes:
        e, info = entries[h], infos[h]
        nodes[e.name] = {"name": e.name, "spec": e.spec, "content_hash": h, "architecture": info.get("architecture"),
                         "dtype": info["dtype"], "layers": info["n_layers"], "parameters": e.parameters,
                         "added_at": e.added_at, "declared_base_model": info.get("declared", []),
                         "family": fam_of[h], "family_size": len(families[fam_of[h]]), "role": "root"}
    edges: list[dict[str, Any]] = []
    recipes: dict[str, dict] = {}
    for sol in solutions:
        for x, rec in sol["merges"].items():
            recipes[name_of[x]] = {**rec, "base": name_of.get(rec["base"]) if rec.get("base") else None,
                                   "weights": {name_of[h]: w for h, w in rec["weights"].items()},
                                   "fit_weights": {name_of[h]: w for h, w in rec["fit_weights"].items()},
                                   "text": recipe_text(rec, name_of)}
        for x, st in sol["stacks"].items():
            nodes[name_of[x]]["layer_map"] = [{**m, "parent": name_of[m["parent"]]} for m in st["layer_map"]]
        for e in sol["edges"]:
            lp = e.get("log10_p")
            edges.append({**e, "parent": name_of[e["parent"]], "child": name_of[e["child"]],
                          "p": format_p(lp) if lp is not None else None})
    for e in edges:
        nodes[e["child"]]["role"] = ROLE_OF[e["relation"]]
    for n, rec in recipes.items():
        nodes[n]["recipe"] = rec
    for a in nodes.values():
        if a["family_size"] == 1:
            a["role"] = "independent"
    edges.sort(key=lambda e: (e["child"], e["parent"]))
    tree = Tree(index_path, nodes, edges, {})
    for n, a in nodes.items():
        a["depth"] = _depth(tree, n)
        a["summary"] = summary(tree, n)
    return tree


def _depth(tree: Tree, name: str) -> int:
    d, todo, seen = 0, [name], {name}
    while True:
        ps = [e["parent"] for x in todo for e in tree.parents(x) if e["parent"] not in seen]
        if not ps:
            return d
        seen.update(ps)
        todo, d = ps, d + 1


def summary(tree: Tree, name: str, nested: bool = True) -> str:
    """One line: what the model is made from, naming the chain through merges and stacks."""
    a = tree.nodes[name]
    ps = tree.parents(name)
    if a["role"] == "independent":
        return "independent: no related model in the index"
    if not ps:
        size = a["family_size"]
        return f"root: no ancestor in the index (family of {size} models)"
    rel = ps[0]["relation"]
    if rel == "merge":
        return f"merge: {a['recipe']['text']}" if "recipe" in a else "merge of " + ", ".join(e["parent"] for e in ps)
    if rel == "stack":
        parts = [f"{e['parent']} (layers {_span(e.get('layers', []))})" for e in ps]
        return "layer stack of " + " and ".join(parts)
    e = ps[0]
    parent = e["parent"]
    via = ""
    pa = tree.nodes[parent]
    if nested and pa["role"] in ("merge", "stack"):
        via = f" ({summary(tree, parent, nested=False)})"
    elif nested and pa["role"] == "finetune":
        up = tree.parents(parent)
        if up and tree.nodes[up[0]["parent"]]["role"] in ("merge", "stack"):
            via = f" (itself a fine-tune of {up[0]['parent']})"
    if rel in ("copy", "recast", "quantized"):
        kind = {"copy": "copy", "recast": "re-encoded copy", "quantized": "quantized copy"}[rel]
        return f"{kind} of {parent} ({a['dtype']}){via}"
    how = {"weights": "", "implied": "", "declared": " (direction from the declared base_model)",
           "undetermined": " (direction undetermined by the weights)"}.get(e["direction"], "")
    if e.get("parent_or_sibling"):
        how = " (or a sibling of it: the weights do not tell)"
    return f"fine-tune of {parent}{via}{how}"


def _span(layers: list[int]) -> str:
    if not layers:
        return "?"
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else \
        ",".join(map(str, layers))
