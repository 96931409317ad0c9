"""No import cycles among modeltrace's modules, nor among its subpackages (issue 14).

The graph is read from the source with `ast`: every import statement counts, the ones inside functions too (a lazy
import that closes a loop is still a loop in the design); only `if TYPE_CHECKING:` blocks are left out, since they
never run. The package's own `__init__` resolves its public names by string (lazily), so it has no edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parents[1] / "modeltrace"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                todo.extend(getattr(child, "orelse", []))
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            todo.append(child)
    return found


def import_graph() -> nx.DiGraph:
    mods = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph.add_edge(name, t)
    return graph


def _cycles(graph: nx.DiGraph) -> list[list[str]]:
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def test_the_graph_sees_imports():
    g = import_graph()
    assert g.has_edge("modeltrace.verdict", "modeltrace.audit")  # module level
    assert g.has_edge("modeltrace.commands.core", "modeltrace.api")  # inside a function
    assert not g.has_edge("modeltrace.architectures", "modeltrace.sources.base")  # TYPE_CHECKING only
    assert g.number_of_nodes() > 100


def test_no_cycles_among_modules():
    assert _cycles(import_graph()) == []


def test_no_cycles_among_subpackages():
    """modeltrace.align, modeltrace.detectors, modeltrace.cli, ... as single nodes: no two of them need each other."""
    g = import_graph()
    top = nx.DiGraph()
    for a, b in g.edges():
        ta, tb = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
        if ta != tb:
            top.add_edge(ta, tb)
    assert _cycles(top) == []


def test_a_cycle_would_be_found():
    g = nx.DiGraph([("modeltrace.a", "modeltrace.b"), ("modeltrace.b", "modeltrace.a"), ("modeltrace.b", "x")])
    assert _cycles(g) == [["modeltrace.a", "modeltrace.b"]]
