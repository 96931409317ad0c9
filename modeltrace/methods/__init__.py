"""Merge methods as objects in a registry, in the spirit of mergekit's: name -> MergeMethod (methods/base.py).

Each method knows its paper and parameters, fits itself from one slot's statistics (detectors/fits.py asks them in
`fitting_order()`), summarises what was found in a sentence (verdict.py), writes itself as
mergekit YAML (recipe.to_mergekit) and replays itself on weights (recipe.replay). The built-ins are in builtin.py;
a new method is a subclass in any module plus `register_method(MyMethod())`:

    from modeltrace.methods import MergeMethod, register_method

    class Mean(MergeMethod):
        name, description, paper = "mean", "plain average of the parents", "-"
        fit_order = 35.0  # asked before the linear family

        def fit(self, ctx):  # ctx: detectors.fits.FitContext of one slot
            k = len(ctx.cands)
            if ctx.rss_free <= ctx.floor and all(abs(w - 1 / k) < 0.01 for w in ctx.free.values()):
                return ctx.result(self.name, {c: 1 / k for c in ctx.cands}, ctx.rss_free)
            return None

    register_method(Mean())

A method registered in this process is used by audits streamed here (threads); worker processes (`--workers`,
Ray) import modeltrace afresh, so register it from a module they import too. Registered methods also appear in
detectors/registry.py's METHODS, the list of everything modeltrace can name.
"""

from __future__ import annotations

from modeltrace.detectors.registry import METHODS
from modeltrace.methods.base import MergeMethod
from modeltrace.methods.builtin import BUILTIN

__all__ = ["MergeMethod", "fitting_order", "merge_method", "merge_methods", "register_method",
           "unregister_method"]

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


def fitting_order() -> list[MergeMethod]:
    """The methods fit_slot asks to fit a slot, simplest first (those with a `fit_order`)."""
    return sorted((m for m in _REGISTRY.values() if m.fit_order is not None), key=lambda m: m.fit_order or 0.0)


def merge_methods() -> dict[str, MergeMethod]:
    """Every registered merge method, by name, in registration order (built-ins first)."""
    return dict(_REGISTRY)


for _m in BUILTIN:
    register_method(_m)
