"""Merge methods as objects in a registry, in the spirit of mergekit's: name -> MergeMethod (methods/base.py).

Each method knows its paper and parameters, summarises what was found in a sentence (verdict.py), writes itself as
mergekit YAML (recipe.to_mergekit) and replays itself on weights (recipe.replay). The built-ins are in builtin.py;
a new method is a subclass in any module plus `register_method(MyMethod())`:

    from modeltrace.methods import MergeMethod, register_method

    class Mean(MergeMethod):
        name, description, paper = "mean", "plain average of the parents", "-"

    register_method(Mean())

Registered methods also appear in detectors/registry.py's METHODS, the list of everything modeltrace can name.
"""

from __future__ import annotations

from modeltrace.detectors.registry import METHODS
from modeltrace.methods.base import MergeMethod
from modeltrace.methods.builtin import BUILTIN

__all__ = ["MergeMethod", "merge_method", "merge_methods", "register_method", "unregister_method"]

_REGISTRY: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    """Add (or replace) a merge method under its name; returns it."""
    for attr in ("name", "description", "paper"):
        if not isinstance(getattr(method, attr, None), str) or not getattr(method, attr):
            raise TypeError(f"{type(method).__name__} needs a non-empty `{attr}` to be registered")
    _REGISTRY[method.name] = method
    METHODS[method.name] = method  # type: ignore[assignment]  # duck-typed like MethodInfo
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register a toy one)."""
    _REGISTRY.pop(name, None)
    METHODS.pop(name, None)


def merge_method(name: str | None) -> MergeMethod | None:
    """The method of that mergekit name, or None when it is not a registered merge method."""
    return _REGISTRY.get(name) if name else None


def merge_methods() -> dict[str, MergeMethod]:
    """Every registered merge method, by name, in registration order (built-ins first)."""
    return dict(_REGISTRY)


for _m in BUILTIN:
    register_method(_m)
