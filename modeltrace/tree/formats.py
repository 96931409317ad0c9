"""The tree written out: JSON (stable schema, docs/tree.md), Graphviz DOT, CycloneDX 1.6 with each model's pedigree,
and the interactive HTML page (tree/html.py).

Data flow: `Tree` (tree/describe.py, built by tree/graph.py) -> one text document. Nodes and edges are sorted by
name, so the same index gives the same document (apart from `stats`, which holds timings).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from modeltrace.schema import SCHEMA_VERSION
from modeltrace.tree.describe import Tree

__all__ = ["FORMATS", "render", "to_cyclonedx", "to_dot", "to_json", "tree_document"]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("modeltrace")
    except Exception:
        return "unknown"


def tree_document(tree: Tree) -> dict[str, Any]:
    """The tree as the JSON document of schema `modeltrace-tree` (docs/tree.md)."""
    return {"schema": "modeltrace-tree", "schema_version": SCHEMA_VERSION, "generated_by": f"modeltrace {_version()}",
            "index": tree.index, "focus": tree.stats.get("focus"),
            "stats": {k: v for k, v in tree.stats.items() if k != "focus"},
            "nodes": [tree.nodes[n] for n in sorted(tree.nodes)],
            "edges": sorted(tree.edges, key=lambda e: (e["child"], e["parent"], e["relation"]))}


def to_json(tree: Tree) -> str:
    return json.dumps(tree_document(tree), indent=1, default=str) + "\n"


_STYLE = {"finetune": "solid", "merge": "bold", "stack": "dotted", "copy": "dashed", "recast": "dashed",
          "quantized": "dashed"}
_SHAPE = {"root": "doubleoctagon", "independent": "octagon", "merge": "box", "stack": "box3d", "copy": "note",
          "finetune": "ellipse"}


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(tree: Tree) -> str:
    """Graphviz: one node per model (shape by role), one edge per relation (weight or layers on merge and stack
    edges; a dashed arrowhead-less edge where the weights do not tell the direction)."""
    lines = ["digraph modeltrace_tree {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for n in sorted(tree.nodes):
        a = tree.nodes[n]
        lines.append(f"  {_q(n)} [shape={_SHAPE.get(a['role'], 'ellipse')}, label={_q(n + chr(10) + a['role'])}, "
                     f"tooltip={_q(a['summary'])}];")
    for e in sorted(tree.edges, key=lambda e: (e["parent"], e["child"])):
        label = e["relation"]
        if e.get("weight") is not None:
            label += f" {e['weight']:.2f}"
        if e.get("layers"):
            label += f" L{e['layers'][0]}-{e['layers'][-1]}"
        attrs = [f"label={_q(label)}", f"style={_STYLE.get(e['relation'], 'solid')}"]
        if e["direction"] == "undetermined" or e.get("parent_or_sibling"):
            attrs += ["dir=none", 'color="gray40"']
        lines.append(f"  {_q(e['parent'])} -> {_q(e['child'])} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_cyclonedx(tree: Tree) -> str:
    """CycloneDX 1.6: every model a `machine-learning-model` component whose `pedigree.ancestors` lists its
    ancestors, nearest first, each with the relation, weight and evidence of the edge that reaches it."""
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from cyclonedx.output.json import JsonV1Dot6

    from modeltrace.report.formats.cyclonedx import CycloneDXFormat, _ref

    prop = CycloneDXFormat._prop
    bom = Bom()
    bom.metadata.tools.components.add(Component(type=ComponentType.APPLICATION, name="modeltrace",
                                                version=_version(), bom_ref=_ref("tool", "modeltrace")))
    bom.metadata.properties.add(prop("tree:schema_version", SCHEMA_VERSION))
    for n in sorted(tree.nodes):
        a = tree.nodes[n]
        purl, refs = CycloneDXFormat._hub(a["spec"])
        props = [prop("role", a["role"]), prop("summary", a["summary"]), prop("content_hash", a["content_hash"])]
        if a.get("recipe"):
            props.append(prop("recipe", a["recipe"]["text"]))
        ancestors = []
        line = {n, *tree.ancestors(n)}
        for anc in tree.ancestors(n):
            edge = next((e for e in tree.children(anc) if e["child"] in line), None)
            ap = [prop("location", tree.nodes[anc]["spec"])]
            if edge is not None:
                ap += [prop("relation", edge["relation"]), prop("of", edge["child"]),
                       prop("direction", edge["direction"])]
                if edge.get("weight") is not None:
                    ap.append(prop("weight", f"{edge['weight']:.4f}"))
                if edge.get("p"):
                    ap.append(prop("independence_p", edge["p"]))
            p2, r2 = CycloneDXFormat._hub(tree.nodes[anc]["spec"])
            ancestors.append(Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=anc, purl=p2,
                                       external_references=r2, bom_ref=_ref("ancestor", n, anc), properties=ap))
        bom.components.add(Component(
            type=ComponentType.MACHINE_LEARNING_MODEL, name=n, bom_ref=_ref("model", n), description=a["summary"],
            purl=purl, external_references=refs, properties=props,
            pedigree=Pedigree(ancestors=ancestors, notes=a["summary"]) if ancestors else None))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no defined dependencies.*")
        return JsonV1Dot6(bom).output_as_string(indent=2) + "\n"


def _html(tree: Tree) -> str:
    from modeltrace.tree.html import to_html

    return to_html(tree, tree_document(tree))


FORMATS = {"json": to_json, "dot": to_dot, "cyclonedx": to_cyclonedx, "html": _html}
SUFFIXES = {".json": "json", ".dot": "dot", ".gv": "dot", ".cdx.json": "cyclonedx", ".html": "html", ".htm": "html"}


def render(tree: Tree, fmt: str) -> str:
    return FORMATS[fmt](tree)
