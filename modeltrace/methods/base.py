"""What a merge method is to modeltrace: an object that knows its name, paper and parameters, how to say what it
found in a sentence, how to write itself as a mergekit configuration, and how to replay itself on weights.

Data flow: the audit's fit_slot (detectors/fits.py) asks each method with a `fit_order`, simplest first, to `fit`
one slot's statistics; verdict.decide names the method the per-tensor fits agree on and asks it for the summary;
recipe.to_mergekit asks it for the mergekit configuration; recipe.replay streams the parents' rows and asks it to
combine them (`combine`), comparing the result with the suspect. A new method is one subclass registered with
`modeltrace.methods.register_method` (see docs/api.md); nothing else needs an edit.

The verdict a method reads is modeltrace/verdict.py's dict: `parents` [{model, weight, interval}], `base`,
`parameters` {t, density, sum_weights, r2_min...: {value, interval}}, `layers` (per-layer rows with `weights`, `t`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from modeltrace.detectors.fits import FitContext, SlotFit

__all__ = ["MERGEKIT_DTYPE", "MergeMethod", "layer_value", "per_layer", "ref"]

#: mergekit's name for the suspect's storage dtype (what the recipe must write to reproduce the bytes)
MERGEKIT_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def ref(spec: str) -> str:
    """A model as mergekit names it: hf://org/name -> org/name; local paths as they are."""
    return spec[5:] if spec.startswith("hf://") else spec


def per_layer(verdict: dict[str, Any], key: str, model: str | None = None) -> list[float] | float | None:
    """Per-layer values (a mergekit gradient) when they vary across layers, else one number (None for a parent's
    weight: its pooled weight is used instead)."""
    vals = []
    for e in verdict["layers"]:
        if e["layer"] < 0:
            continue
        v = e.get(key) if model is None else e.get("weights", {}).get(model)
        if v is None:
            return None
        vals.append(float(v))
    if not vals:
        return None
    if max(vals) - min(vals) < 0.01:
        return None if model is not None else round(float(np.mean(vals)), 4)
    return [round(v, 4) for v in vals]


def layer_value(value: Any, layer: int, n_layers: int) -> float:
    """A mergekit parameter at one layer: a number, or a gradient (list) interpolated over the layers."""
    if isinstance(value, list):
        if len(value) == 1 or n_layers <= 1:
            return float(value[0])
        pos = layer / (n_layers - 1) * (len(value) - 1) if layer >= 0 else 0
        return float(np.interp(pos, np.arange(len(value)), value))
    return float(value)


def _value(verdict: dict[str, Any], key: str) -> Any:
    return (verdict.get("parameters") or {}).get(key, {}).get("value")


class MergeMethod:
    """A merge method. Subclasses set the class attributes and override what differs from a weighted sum."""

    #: mergekit's merge_method name
    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str]
    #: linear | spherical | sparse | stack
    family: ClassVar[str] = "linear"
    #: per-model mergekit parameters this method writes ("weight", "density")
    parameters: ClassVar[tuple[str, ...]] = ("weight",)
    #: True when one parent over a base is already a merge (task vectors); else two parents are needed
    needs_base: ClassVar[bool] = False
    #: True when `combine` needs whole tensors (a top-k over the tensor) rather than row chunks
    whole_tensor: ClassVar[bool] = False
    #: why the output cannot be replayed, after the method's name ("dare_ties drops entries at random ..."), or None
    not_replayable: ClassVar[str | None] = None
    #: where fit_slot asks this method to fit a slot, simplest recipes first (lower first); None: never asked (a
    #: method told apart by another's fit, as the sparse family's members are by `sparse`, or by the layer map)
    fit_order: ClassVar[float | None] = None

    def __repr__(self) -> str:
        return f"<merge method {self.name}: {self.description}>"

    def info(self) -> dict[str, str]:
        return {"description": self.description, "paper": self.paper}

    # ---- from the statistics ----------------------------------------------------------------------------------
    def fit(self, ctx: FitContext) -> SlotFit | None:
        """The recipe of this method that explains one slot (detectors/fits.FitContext: the slot's statistics, the
        candidates, their free least-squares fit and the residual floor), or None when it does not. Build the
        answer with `ctx.result(self.name, weights, rss, **params)`."""
        return None

    # ---- in words ---------------------------------------------------------------------------------------------
    def summarise(self, verdict: dict[str, Any], suspect: str) -> str:
        """The first clause of the verdict's summary, e.g. "rio ≈ 0.60·nex + 0.40·qwen (linear merge), R² ≥ 0.9999"."""
        r2 = (verdict.get("parameters") or {}).get("r2_min")
        text = f"{suspect} ≈ {self.terms(verdict)}"
        return f"{text} ({self.name} merge), R² ≥ {r2:.4f}" if r2 is not None else text

    @staticmethod
    def terms(verdict: dict[str, Any]) -> str:
        return " + ".join(f"{p['weight']:.2f}·{p['model']}" for p in verdict["parents"])

    # ---- as mergekit YAML -------------------------------------------------------------------------------------
    def to_mergekit(self, verdict: dict[str, Any], specs: dict[str, str]) -> dict[str, Any] | None:
        """mergekit configuration (a dict, dumped as YAML by recipe.to_yaml) that reproduces the suspect."""
        cfg: dict[str, Any] = {"merge_method": self.name, "dtype": self.dtype(verdict)}
        models = []
        for p in verdict["parents"]:
            params = self.model_parameters(verdict, p)
            models.append({"model": ref(specs[p["model"]]), **({"parameters": params} if params else {})})
        cfg["models"] = models
        if verdict.get("base"):
            cfg["base_model"] = ref(specs[verdict["base"]])
        glob = self.global_parameters(verdict)
        if glob:
            cfg["parameters"] = glob
        return cfg

    @staticmethod
    def dtype(verdict: dict[str, Any]) -> str:
        return MERGEKIT_DTYPE.get(verdict.get("suspect_dtype", ""), "bfloat16")

    def model_parameters(self, verdict: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if "weight" in self.parameters:
            params["weight"] = per_layer(verdict, "weights", parent["model"]) or parent["weight"]
        if "density" in self.parameters:
            dens = _value(verdict, "density")
            if dens is not None:
                params["density"] = round(float(dens), 3)
        return params

    def global_parameters(self, verdict: dict[str, Any]) -> dict[str, Any]:
        return {}

    # ---- replay -----------------------------------------------------------------------------------------------
    def combine(self, rows: dict[str, np.ndarray], verdict: dict[str, Any], cfg: dict[str, Any], layer: int,
                n_layers: int) -> np.ndarray | None:
        """What the recipe makes of the same rows (float64) of each parent and the base (keyed by model name), at
        `layer`; None when this method cannot be replayed on them."""
        ws = self.weights_at(verdict, cfg, layer, n_layers)
        out: np.ndarray = sum(w * rows[n] for n, w in ws.items())  # type: ignore[assignment]
        return out

    @staticmethod
    def weights_at(verdict: dict[str, Any], cfg: dict[str, Any], layer: int, n_layers: int) -> dict[str, float]:
        """Each parent's weight at `layer`, as the configuration writes it (the pooled weight where it has none)."""
        return {p["model"]: layer_value((m.get("parameters") or {}).get("weight", p["weight"]), layer, n_layers)
                for p, m in zip(verdict["parents"], cfg["models"], strict=True)}
