"""Numbers behind the report's plots, computed from the audit's per-tensor fits (`AuditRun.slots`).

The verdict keeps per-layer means only; a plot of merge weights needs their spread (an interval per layer and
parent) and the similarity heat-map needs every (layer, role) pair. Both come straight from the per-slot results the
audit already holds, so nothing is re-read and verdict.py stays as it is.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from modeltrace.audit import AuditRun
from modeltrace.report.model import AuditDetail, LayerWeights, SimilarityGrid, WeightPoint
from modeltrace.stats import mean_interval

#: the order roles appear in on the heat-map's axis (others follow alphabetically)
ROLE_ORDER = ("embed", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_gate", "mlp_up", "mlp_down",
              "shared_gate", "shared_up", "shared_down", "expert_gate", "expert_up", "expert_down", "router",
              "lm_head")


def _r(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


def audit_detail(run: AuditRun, verdict: dict) -> AuditDetail:
    names = {i: v.label for i, v in enumerate(run.views)}
    matrix = [r for r in run.slots if not r.structured] or list(run.slots)
    layer_method = {e["layer"]: e["method"] for e in verdict.get("layers", [])}
    weights: list[LayerWeights] = []
    if verdict.get("relation") in ("merge", "partial", "finetune"):
        by_layer: dict[int, list] = defaultdict(list)
        for r in matrix:
            if r.fit.method == layer_method.get(r.slot.layer):
                by_layer[r.slot.layer].append(r)
        parents = [p["model"] for p in verdict.get("parents", [])]
        for c in sorted({c for r in matrix for c in r.fit.weights}):
            if names[c] not in parents:
                continue
            points = []
            for layer in sorted(by_layer):
                vals = [r.fit.weights[c] for r in by_layer[layer] if c in r.fit.weights]
                if not vals:
                    continue
                m, lo, hi = mean_interval(vals)
                points.append(WeightPoint(layer=layer, weight=_r(m), interval=[_r(lo), _r(hi)], tensors=len(vals)))
            weights.append(LayerWeights(model=names[c], points=points))
    sims = []
    for c in range(1, len(run.views)):
        cells: dict[tuple[int, str], list[float]] = defaultdict(list)
        for r in matrix:
            if c in r.corr:
                cells[(r.slot.layer, r.slot.role)].append(r.corr[c])
        if not cells:
            continue
        layers = sorted({k[0] for k in cells})
        present = {k[1] for k in cells}
        roles = [x for x in ROLE_ORDER if x in present] + sorted(present - set(ROLE_ORDER))
        values = [[_r(float(np.mean(cells[(layer, role)]))) if (layer, role) in cells else None for role in roles]
                  for layer in layers]
        sims.append(SimilarityGrid(candidate=names[c], layers=layers, roles=roles, values=values))
    return AuditDetail(weights=weights, similarity=sims)
