"""A recovered recipe as mergekit YAML, and `--verify`: replay it with modeltrace's own merge code and measure.

The replay streams the suspect and the parents slot by slot, computes what the recipe would produce (per layer
parameters as recovered), and reports the relative error per tensor. Linear, task arithmetic, model stock and SLERP
are deterministic and must match to storage precision; TIES is replayed for tensors small enough to rank in memory;
DARE drops at random, so only its expected value can be compared (reported as such).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import yaml

from modeltrace.align.view import ModelView, open_view
from modeltrace.architectures import Slot, is_structured

TIES_REPLAY_MAX_ELEMENTS = 16 * 1024 * 1024


def _ref(spec: str) -> str:
    return spec[5:] if spec.startswith("hf://") else spec


def _per_layer(verdict: dict, key: str, model: str | None = None) -> list[float] | float | None:
    """Per-layer values (a mergekit gradient) when they vary across layers, else one number."""
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
        return None if model is not None else round(float(np.mean(vals)), 4)  # a parent: its pooled weight
    return [round(v, 4) for v in vals]


#: mergekit's name for the suspect's storage dtype (what the recipe must write to reproduce the bytes)
MERGEKIT_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def to_mergekit(verdict: dict, specs: dict[str, str]) -> dict[str, Any] | None:
    """mergekit config (as a dict) that reproduces the suspect, or None when there is no recipe to write."""
    rel, method = verdict["relation"], verdict.get("method")
    if rel == "stack":
        slices = []
        for run in _runs(verdict["layer_map"]):
            slices.append({"sources": [{"model": _ref(specs[run[0]]), "layer_range": [run[1], run[2] + 1]}]})
        return {"merge_method": "passthrough", "slices": slices,
                "dtype": MERGEKIT_DTYPE.get(verdict.get("suspect_dtype", ""), "bfloat16")}
    if rel != "merge" or not method:
        return None
    parents = [p["model"] for p in verdict["parents"]]
    cfg: dict[str, Any] = {"merge_method": method,
                           "dtype": MERGEKIT_DTYPE.get(verdict.get("suspect_dtype", ""), "bfloat16")}
    models = []
    for p in verdict["parents"]:
        params: dict[str, Any] = {}
        if method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della"):
            params["weight"] = _per_layer(verdict, "weights", p["model"]) or p["weight"]
        if method in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "della"):
            dens = verdict.get("parameters", {}).get("density", {}).get("value")
            if dens is not None:
                params["density"] = round(float(dens), 3)
        models.append({"model": _ref(specs[p["model"]]), **({"parameters": params} if params else {})})
    if method == "slerp":
        cfg["base_model"] = _ref(specs[parents[0]])
        cfg["models"] = [{"model": _ref(specs[m])} for m in parents]
        cfg["parameters"] = {"t": _per_layer(verdict, "t")}
    else:
        cfg["models"] = models
        if verdict.get("base"):
            cfg["base_model"] = _ref(specs[verdict["base"]])
            if verdict["base"] not in parents and method == "model_stock":
                pass
        if method == "linear":
            s = verdict.get("parameters", {}).get("sum_weights", {}).get("value", 1.0)
            cfg["parameters"] = {"normalize": bool(abs(s - 1) < 0.01)}
    return cfg


def _runs(layer_map: list[dict]) -> list[tuple[str, int, int]]:
    runs: list[tuple[str, int, int]] = []
    for e in layer_map:
        if runs and runs[-1][0] == e["model"] and runs[-1][2] + 1 == e["source_layer"]:
            runs[-1] = (runs[-1][0], runs[-1][1], e["source_layer"])
        else:
            runs.append((e["model"], e["source_layer"], e["source_layer"]))
    return runs


def to_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


# ---- replay ----------------------------------------------------------------------------------------------------
def _layer_value(value: Any, layer: int, n_layers: int) -> float:
    if isinstance(value, list):
        if len(value) == 1 or n_layers <= 1:
            return float(value[0])
        pos = layer / (n_layers - 1) * (len(value) - 1) if layer >= 0 else 0
        return float(np.interp(pos, np.arange(len(value)), value))
    return float(value)


def _slerp_rows(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    from modeltrace.detectors.fits import SLERP_DOT_THRESHOLD

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
    return ca * a + cb * b


def _ties(base: np.ndarray, parents: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
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
    return base + (mixed / div).reshape(base.shape)


def replay(verdict: dict, specs: dict[str, str], cfg: dict[str, Any]) -> dict[str, Any]:
    """Re-run the recipe with modeltrace's own implementation and compare with the suspect, tensor by tensor."""
    method = cfg["merge_method"]
    if method in ("dare_linear", "dare_ties", "della", "breadcrumbs"):
        return {"method": method, "replayed": False,
                "reason": f"{method} drops entries at random (or by a rule that needs the whole-model ranking); "
                          "its exact output cannot be replayed, only its statistics (see the audit's parameters)"}
    undone = [n for a in (verdict.get("alignment") or {}).values() for n in a.get("undone", [])]
    if undone:  # the replay reads parents in stored order; a disguised suspect only matches them through the alignment
        return {"method": method, "replayed": False,
                "reason": "the suspect is disguised (" + "; ".join(dict.fromkeys(undone)) + "): the recipe was fitted "
                          "through the recovered alignment, and a replay in stored order would not match"}
    views: dict[str, ModelView] = {}
    try:
        suspect = open_view(specs[verdict["suspect"]])
        names = [p["model"] for p in verdict["parents"]]
        if verdict.get("base") and verdict["base"] not in names:
            names.append(verdict["base"])
        for n in names:
            views[n] = open_view(specs[n])
        n_layers = suspect.n_layers
        errors: list[float] = []
        skipped = 0
        worst = ("", 0.0)
        for slot in sorted(suspect.parts):
            if slot.role == "buffer" or any(slot not in v.parts for v in views.values()):
                skipped += 1
                continue
            part = suspect.parts[slot]
            if any(v.parts[slot].rows != part.rows or v.parts[slot].cols != part.cols for v in views.values()):
                skipped += 1
                continue
            err = _replay_slot(method, verdict, cfg, suspect, views, slot, n_layers)
            if err is None:
                skipped += 1
                continue
            if not is_structured(slot, part):
                errors.append(err)
                if err > worst[1]:
                    worst = (slot.key, err)
        return {
            "method": method,
            "replayed": True,
            "tensors": len(errors),
            "skipped": skipped,
            "median_rel_error": float(np.median(errors)) if errors else None,
            "max_rel_error": float(max(errors)) if errors else None,
            "worst_tensor": worst[0] or None,
        }
    finally:
        for v in views.values():
            v.close()


def _replay_slot(method: str, verdict: dict, cfg: dict[str, Any], suspect: ModelView, views: dict[str, ModelView],
                 slot: Slot, n_layers: int) -> float | None:
    parents = [p["model"] for p in verdict["parents"]]
    layer = slot.layer
    part = suspect.parts[slot]
    num = den = 0.0
    step = max(1, (8 * 1024 * 1024) // max(1, part.cols * 4))
    if method == "ties":
        if part.numel > TIES_REPLAY_MAX_ELEMENTS:
            return None
        base = views[verdict["base"]].read(slot)
        ps = [views[p].read(slot) for p in parents]
        ws = [_layer_value(m["parameters"]["weight"], layer, n_layers) for m in cfg["models"]]
        dens = float(cfg["models"][0]["parameters"].get("density", 1.0))
        pred = _ties(base, ps, ws, dens)
        s = suspect.read(slot)
        return float(np.linalg.norm(s - pred) / max(np.linalg.norm(s), 1e-30))
    for a in range(0, part.rows, step):
        b = min(a + step, part.rows)
        s = suspect.read(slot, a, b).astype(np.float64)
        chunks = {n: v.read(slot, a, b).astype(np.float64) for n, v in views.items()}
        if method == "slerp":
            t = _layer_value(cfg["parameters"]["t"], layer, n_layers)
            pred = _slerp_rows(chunks[parents[0]], chunks[parents[1]], t)
        elif method == "linear":
            ws = {p["model"]: _layer_value(m["parameters"]["weight"], layer, n_layers)
                  for p, m in zip(verdict["parents"], cfg["models"], strict=True)}
            pred = sum(w * chunks[n] for n, w in ws.items())
            if cfg.get("parameters", {}).get("normalize"):
                pred = pred / sum(ws.values())
        elif method in ("task_arithmetic", "model_stock"):
            base = chunks[verdict["base"]]
            ws = {p["model"]: _layer_value(m["parameters"].get("weight", p["weight"]) if "parameters" in m
                                           else p["weight"], layer, n_layers)
                  for p, m in zip(verdict["parents"], cfg["models"], strict=True)}
            pred = base + sum(w * (chunks[n] - base) for n, w in ws.items())
        else:
            return None
        num += float(((s - pred) ** 2).sum())
        den += float((s**2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0
