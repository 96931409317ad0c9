"""A merge method defined and registered from one module, as a user would (tests/test_api.py imports it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from modeltrace.methods import MergeMethod, register_method


class ToyMean(MergeMethod):
    name = "toy_mean"
    description = "plain average of the parents, whatever their weights"
    paper = "Toy et al., Averages, 2026"
    parameters = ()  # no per-model weights in its YAML
    fit_order = 35.0  # asked after SLERP, before the linear family

    def fit(self, ctx: Any) -> Any:
        """Claims a slot when the candidates' free least-squares fit is their plain mean, down to storage rounding."""
        k = len(ctx.cands)
        if ctx.rss_free <= ctx.floor and all(abs(w - 1 / k) < 0.01 for w in ctx.free.values()):
            return ctx.result(self.name, {c: 1 / k for c in ctx.cands}, ctx.rss_free)
        return None

    def summarise(self, verdict: dict[str, Any], suspect: str) -> str:
        return f"{suspect} is the plain mean of {' and '.join(p['model'] for p in verdict['parents'])}"

    def global_parameters(self, verdict: dict[str, Any]) -> dict[str, Any]:
        return {"toy_scale": 1.0}

    def combine(self, rows: dict[str, np.ndarray], verdict: dict[str, Any], cfg: dict[str, Any], layer: int,
                n_layers: int) -> np.ndarray | None:
        return np.mean([rows[p["model"]] for p in verdict["parents"]], axis=0)


TOY = register_method(ToyMean())
