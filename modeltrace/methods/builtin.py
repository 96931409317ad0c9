"""The merge methods modeltrace recognises, as mergekit names them, each with its paper.

Linear, task arithmetic, model stock and SLERP are deterministic and replay to storage precision; TIES is replayed
on tensors small enough to rank in memory; DARE, DELLA and breadcrumbs drop entries at random or by a whole-model
ranking, so only their statistics can be compared (the audit's parameters), not their output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from modeltrace.detectors.fits import FitContext, SlotFit

from modeltrace.methods.base import MergeMethod, layer_value, per_layer, ref

__all__ = ["BUILTIN"]

#: TIES ranks whole tensors in memory: larger ones are skipped by the replay
TIES_REPLAY_MAX_ELEMENTS = 16 * 1024 * 1024


class Linear(MergeMethod):
    name = "linear"
    description = "weighted average of the parents, per tensor (model soup)"
    paper = "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482"
    fit_order = 42.0  # after SLERP and the task-vector methods, which are linear recipes with more structure

    def fit(self, ctx: FitContext) -> SlotFit | None:
        from modeltrace.detectors.fits import fit_linear

        return fit_linear(ctx)

    def global_parameters(self, verdict: dict[str, Any]) -> dict[str, Any]:
        s = (verdict.get("parameters") or {}).get("sum_weights", {}).get("value", 1.0)
        return {"normalize": bool(abs(s - 1) < 0.01)}

    def combine(self, rows: dict[str, np.ndarray], verdict: dict[str, Any], cfg: dict[str, Any], layer: int,
                n_layers: int) -> np.ndarray | None:
        ws = self.weights_at(verdict, cfg, layer, n_layers)
        pred: np.ndarray = sum(w * rows[n] for n, w in ws.items())  # type: ignore[assignment]
        if cfg.get("parameters", {}).get("normalize"):
            pred = pred / sum(ws.values())
        return pred


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    description = "base plus weighted sum of task vectors (parent - base)"
    paper = "Ilharco et al., Editing models with task arithmetic, ICLR 2023, arXiv:2212.04089"
    needs_base = True
    fit_order = 41.0
    #: every lambda tied to the parents' angle (Model Stock) rather than free
    tied: ClassVar[bool] = False

    def fit(self, ctx: FitContext) -> SlotFit | None:
        from modeltrace.detectors.fits import fit_task_vectors

        return fit_task_vectors(ctx, model_stock=self.tied)

    def summarise(self, verdict: dict[str, Any], suspect: str) -> str:
        return f"{suspect} ≈ {verdict['base']} + task vectors: {self.terms(verdict)} ({self.name})"

    def combine(self, rows: dict[str, np.ndarray], verdict: dict[str, Any], cfg: dict[str, Any], layer: int,
                n_layers: int) -> np.ndarray | None:
        base = rows[verdict["base"]]
        ws = self.weights_at(verdict, cfg, layer, n_layers)
        return base + sum(w * (rows[n] - base) for n, w in ws.items())  # type: ignore[no-any-return]


class ModelStock(TaskArithmetic):
    name = "model_stock"
    description = "average of fine-tunes pulled toward the base by a ratio set by their angle"
    paper = "Jang et al., Model Stock, ECCV 2024, arXiv:2403.19522"
    parameters = ()
    fit_order = 40.0  # task arithmetic with every lambda tied to the parents' angle: the more specific first
    tied = True


class Slerp(MergeMethod):
    name = "slerp"
    description = "spherical interpolation of two parents, angle measured per output row"
    paper = "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985"
    family = "spherical"
    parameters = ()
    fit_order = 30.0

    def fit(self, ctx: FitContext) -> SlotFit | None:
        from modeltrace.detectors.fits import fit_spherical

        return fit_spherical(ctx)

    def summarise(self, verdict: dict[str, Any], suspect: str) -> str:
        t = (verdict.get("parameters") or {}).get("t", {}).get("value")
        return f"{suspect} is a SLERP merge of {' and '.join(p['model'] for p in verdict['parents'])} (mean t = {t})"

    def to_mergekit(self, verdict: dict[str, Any], specs: dict[str, str]) -> dict[str, Any] | None:
        parents = [p["model"] for p in verdict["parents"]]
        return {"merge_method": self.name, "dtype": self.dtype(verdict), "base_model": ref(specs[parents[0]]),
                "models": [{"model": ref(specs[m])} for m in parents], "parameters": {"t": per_layer(verdict, "t")}}

    def combine(self, rows: dict[str, np.ndarray], verdict: dict[str, Any], cfg: dict[str, Any], layer: int,
                n_layers: int) -> np.ndarray | None:
        from modeltrace.detectors.fits import SLERP_DOT_THRESHOLD

        parents = [p["model"] for p in verdict["parents"]]
        t = layer_value(cfg["parameters"]["t"], layer, n_layers)
        a, b = rows[parents[0]], rows[parents[1]]
        na = np.linalg.norm(a, axis=1, keepdims=True)
        nb = np.linalg.norm(b, axis=1, keepdims=True)
        na = np.where(na > 1e-8, na, 1)
        nb = np.where(nb > 1e-8, nb, 1)
        dot = np.clip(((a / na) * (b / nb)).sum(axis=1, keepdims=True), -1, 1)
        lin = np.abs(dot) > SLERP_DOT_THRESHOLD
        theta = np.arccos(np.where(lin, 0, dot))
        s = np.where(lin, 1, np.sin(theta))
        ca = np.where(lin, 1 - t, np.sin((1 - t) * theta) / s)
        cb = np.where(lin, t, np.sin(t * theta) / s)
        return ca * a + cb * b  # type: ignore[no-any-return]


class _Sparse(MergeMethod):
    family = "sparse"
    parameters: ClassVar[tuple[str, ...]] = ("weight", "density")
    needs_base = True
    not_replayable: ClassVar[str | None] = (
        "drops entries at random (or by a rule that needs the whole-model ranking); its exact output cannot be "
        "replayed, only its statistics (see the audit's parameters)")

    def summarise(self, verdict: dict[str, Any], suspect: str) -> str:
        d = (verdict.get("parameters") or {}).get("density", {}).get("value")
        return (f"{suspect} is a sparse task-vector merge ({self.name}, density ≈ {d}) of "
                f"{', '.join(p['model'] for p in verdict['parents'])} over base {verdict['base']}")

    def combine(self, rows: dict[str, np.ndarray], verdict: dict[str, Any], cfg: dict[str, Any], layer: int,
                n_layers: int) -> np.ndarray | None:
        return None


class Ties(_Sparse):
    name = "ties"
    description = "task vectors trimmed to top-k magnitudes, sign election, disjoint mean"
    paper = "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708"
    whole_tensor = True
    not_replayable = None

    def combine(self, rows: dict[str, np.ndarray], verdict: dict[str, Any], cfg: dict[str, Any], layer: int,
                n_layers: int) -> np.ndarray | None:
        base = rows[verdict["base"]]
        if base.size > TIES_REPLAY_MAX_ELEMENTS:
            return None
        parents = [rows[p["model"]] for p in verdict["parents"]]
        weights = [layer_value(m["parameters"]["weight"], layer, n_layers) for m in cfg["models"]]
        density = float(cfg["models"][0]["parameters"].get("density", 1.0))
        deltas = []
        for p in parents:
            d = (p - base).ravel()
            k = max(1, int(density * d.size))
            keep = np.zeros(d.size, dtype=bool)
            keep[np.argpartition(-np.abs(d), k - 1)[:k]] = True
            deltas.append(np.where(keep, d, 0))
        D = np.stack(deltas) * np.asarray(weights)[:, None]
        sign = np.where(D.sum(axis=0) >= 0, 1.0, -1.0)
        mask = np.sign(D) == sign
        mixed = (D * mask).sum(axis=0)
        div = (np.asarray(weights)[:, None] * mask).sum(axis=0)
        div[div == 0] = 1
        return base + (mixed / div).reshape(base.shape)  # type: ignore[no-any-return]


class DareLinear(_Sparse):
    name = "dare_linear"
    description = "task vectors randomly dropped with probability p and rescaled, then summed"
    paper = "Yu et al., Language models are Super Mario (DARE), ICML 2024, arXiv:2311.03099"


class DareTies(_Sparse):
    name = "dare_ties"
    description = "DARE drop-and-rescale followed by TIES sign election"
    paper = "Yu et al., arXiv:2311.03099; Yadav et al., arXiv:2306.01708"


class Breadcrumbs(_Sparse):
    name = "breadcrumbs"
    description = "task vectors with both the largest outliers and the smallest entries removed"
    paper = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795"


class Della(_Sparse):
    name = "della"
    description = "magnitude-ranked stochastic dropping (MagPrune) with sign election"
    paper = "Deep et al., DELLA-Merging, arXiv:2406.11617"


class Sparse(_Sparse):
    name = "sparse"
    description = "a sparsified task-vector merge whose sparsifier is not identified (breadcrumbs-like)"
    paper = "Davari & Belilovsky, arXiv:2312.06795; Yadav et al., arXiv:2306.01708"
    parameters = ()
    not_replayable = None  # no mergekit method of that name: it is not a recipe to replay
    fit_order = 50.0  # fits the whole family and names the member the statistics point to (TIES, DARE, ...)

    def fit(self, ctx: FitContext) -> SlotFit | None:
        from modeltrace.detectors.sparse_fits import fit_sparse

        return fit_sparse(ctx)


class Passthrough(MergeMethod):
    name = "passthrough"
    description = "layers copied whole from parents and stacked (frankenmerge)"
    paper = "Kim et al., SOLAR 10.7B depth up-scaling, arXiv:2312.15166"
    family = "stack"
    parameters = ()
    not_replayable = ("copies whole layers: nothing to recompute (the layer map shows which source layer each one "
                      "equals)")

    def summarise(self, verdict: dict[str, Any], suspect: str) -> str:
        return f"{suspect} is a layer stack (passthrough)"

    def to_mergekit(self, verdict: dict[str, Any], specs: dict[str, str]) -> dict[str, Any] | None:
        runs: list[tuple[str, int, int]] = []
        for e in verdict["layer_map"]:
            if runs and runs[-1][0] == e["model"] and runs[-1][2] + 1 == e["source_layer"]:
                runs[-1] = (runs[-1][0], runs[-1][1], e["source_layer"])
            else:
                runs.append((e["model"], e["source_layer"], e["source_layer"]))
        slices = [{"sources": [{"model": ref(specs[m]), "layer_range": [a, b + 1]}]} for m, a, b in runs]
        return {"merge_method": self.name, "slices": slices, "dtype": self.dtype(verdict)}

    def combine(self, rows: dict[str, np.ndarray], verdict: dict[str, Any], cfg: dict[str, Any], layer: int,
                n_layers: int) -> np.ndarray | None:
        return None


BUILTIN: tuple[MergeMethod, ...] = (Linear(), TaskArithmetic(), Slerp(), ModelStock(), Ties(), DareLinear(),
                                    DareTies(), Breadcrumbs(), Della(), Sparse(), Passthrough())
