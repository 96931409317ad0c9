"""A recovered recipe as mergekit YAML, and `--verify`: replay it with modeltrace's own merge code and measure.

Both are the merge method's own (modeltrace/methods: each method writes its mergekit configuration and combines
parents' rows); this module streams the models. The replay reads the suspect and the parents slot by slot, asks the
method what the recipe would produce (per-layer parameters as recovered), and reports the relative error per tensor.
Linear, task arithmetic, model stock and SLERP are deterministic and must match to storage precision; TIES is
replayed for tensors small enough to rank in memory; DARE drops at random, so only its expected value can be
compared (reported as such).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import yaml

from modeltrace.align.view import ModelView, open_view
from modeltrace.architectures import Slot, is_structured
from modeltrace.methods import MergeMethod, merge_method
from modeltrace.methods.base import MERGEKIT_DTYPE
from modeltrace.methods.builtin import TIES_REPLAY_MAX_ELEMENTS

__all__ = ["MERGEKIT_DTYPE", "TIES_REPLAY_MAX_ELEMENTS", "replay", "to_mergekit", "to_yaml"]

#: the replay's row chunks (float64 copies of every model's rows)
REPLAY_CHUNK_BYTES = 8 * 1024 * 1024


def to_mergekit(verdict: dict, specs: dict[str, str]) -> dict[str, Any] | None:
    """mergekit config (as a dict) that reproduces the suspect, or None when there is no recipe to write."""
    if verdict["relation"] not in ("merge", "stack"):
        return None
    method = merge_method(verdict.get("method"))
    return None if method is None else method.to_mergekit(verdict, specs)


def to_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


# ---- replay ----------------------------------------------------------------------------------------------------
def replay(verdict: dict, specs: dict[str, str], cfg: dict[str, Any]) -> dict[str, Any]:
    """Re-run the recipe with modeltrace's own implementation and compare with the suspect, tensor by tensor."""
    name = cfg["merge_method"]
    method = merge_method(name)
    if method is None:
        return {"method": name, "replayed": False, "reason": f"{name} is not a merge method modeltrace knows"}
    if method.not_replayable:
        return {"method": name, "replayed": False, "reason": f"{name} {method.not_replayable}"}
    undone = [n for a in (verdict.get("alignment") or {}).values() for n in a.get("undone", [])]
    if undone:  # the replay reads parents in stored order; a disguised suspect only matches them through the alignment
        return {"method": name, "replayed": False,
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
            "method": name,
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


def _replay_slot(method: MergeMethod, verdict: dict, cfg: dict[str, Any], suspect: ModelView,
                 views: dict[str, ModelView], slot: Slot, n_layers: int) -> float | None:
    """Relative error of the recipe on one tensor: whole tensors for methods that rank them (TIES, within
    TIES_REPLAY_MAX_ELEMENTS), else row chunks in float64."""
    layer = slot.layer
    part = suspect.parts[slot]
    if method.whole_tensor:
        if part.numel > TIES_REPLAY_MAX_ELEMENTS:
            return None
        pred = method.combine({n: v.read(slot) for n, v in views.items()}, verdict, cfg, layer, n_layers)
        if pred is None:
            return None
        s = suspect.read(slot)
        return float(np.linalg.norm(s - pred) / np.maximum(np.linalg.norm(s), 1e-30))
    num = den = 0.0
    step = max(1, REPLAY_CHUNK_BYTES // max(1, part.cols * 4))
    for a in range(0, part.rows, step):
        b = min(a + step, part.rows)
        s = suspect.read(slot, a, b).astype(np.float64)
        chunks: dict[str, np.ndarray] = {n: v.read(slot, a, b).astype(np.float64) for n, v in views.items()}
        pred = method.combine(chunks, verdict, cfg, layer, n_layers)
        if pred is None:
            return None
        num += float(((s - pred) ** 2).sum())
        den += float((s**2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0
