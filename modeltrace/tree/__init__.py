"""The family tree of an index: who descends from whom, and how (issue 15). See docs/tree.md."""

from modeltrace.tree.describe import Tree
from modeltrace.tree.graph import build_tree

__all__ = ["Tree", "build_tree"]
