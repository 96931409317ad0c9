"""The audit's sampling design for remote models (issue 12): which routed experts, tensors and rows the streaming
pass reads, so that a 400B-class MoE is audited within a byte budget and a request target.

Data flow: `audit._stream` builds its plan (every slot the suspect shares with a candidate) and, for a sampled or
budgeted audit of a remote model, hands it to `design(views, plan, ...)`:
  1. experts: in every layer with routed experts, a seeded subset of them (seed: the layer and its expert count, so
     the same experts in every model), as many as the request target leaves after every non-expert tensor (one
     request per tensor and model, before coalescing); the other experts' items are dropped;
  2. rows: every kept item gets one contiguous block of round(F x rows) rows (at least one) at a place seeded by its
     slot and shape (the same rows in every model); structured tensors up to `SMALL_WHOLE` bytes (norms, gates,
     biases) are read whole. F is `--sample`, or with a byte budget the largest fraction whose planned bytes (every
     model, kept items) fit in `BUDGET_SHARE` of what the budget has left (the rest covers coalescing gaps); when
     even one row of each kept tensor does not fit, fewer experts are kept, then it is an error;
  3. the kept items are returned in the suspect's file order (neighbouring tensors' blocks coalesce into one
     request) with their row ranges set, and a `Coverage` that states what was and was not read: it becomes a
     warning of the run and the verdict's `coverage`.
Intervals: per-tensor fits use the rows read; pooled weights (random effects over tensors) are intervals for the
tensors read. Experts are chosen independently of their values, so the tensors read are a random sample of each
layer's experts (docs/remote.md says what that does and does not cover).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from modeltrace.architectures import is_expert_role, is_structured
from modeltrace.errors import InputError
from modeltrace.fingerprint.sampling import seeded

if TYPE_CHECKING:
    from modeltrace.align.view import ModelView
    from modeltrace.audit_plan import _PlanItem

__all__ = ["BUDGET_SHARE", "Coverage", "DEFAULT_MAX_REQUESTS", "DEFAULT_REMOTE_SHARE", "REMOTE_FULL_BYTES",
           "READ_AHEAD_BYTES", "SMALL_WHOLE", "chosen_experts", "default_budget", "design", "is_remote",
           "limit_read_ahead"]

#: Streaming-pass requests planned for all models together (one per tensor and model, before coalescing). With
#: the headers (about 2 per shard) and the layer map (one per non-expert matrix) of four Rio-sized models this
#: stays under 20,000.
DEFAULT_MAX_REQUESTS = 12_000
#: Structured tensors (norms, gates, biases) up to this size are read whole; adjacent ones share a request.
SMALL_WHOLE = 1 << 20
#: Share of the byte budget left after headers and the layer map that the planned row blocks may use.
BUDGET_SHARE = 0.5
#: Routed experts kept per layer at least, however tight the request target.
MIN_EXPERTS = 2
#: Bytes each remote model fetches ahead of the comparison in a designed pass (the planner's default is 256 MB): row
#: blocks are small, so this keeps the link busy while bounding memory with many models open.
READ_AHEAD_BYTES = 32 * 1024 * 1024
#: Without --sample or --budget, remote models larger than this (all together) are audited by this design ...
REMOTE_FULL_BYTES = 16 * 10**9
#: ... with row blocks planned to about this share of every model's bytes.
DEFAULT_REMOTE_SHARE = 0.002


@dataclass(frozen=True)
class Coverage:
    """What a designed (sampled) streaming pass reads."""

    fraction: float  # rows read per sampled tensor (structured tensors up to SMALL_WHOLE whole)
    tensors_read: int  # suspect slots compared
    tensors_shared: int  # suspect slots shared with a candidate (the plan before the design)
    moe_layers: int  # layers with routed experts
    experts_total: int  # routed experts per MoE layer (the most in any layer)
    experts_read: int  # routed experts compared per MoE layer (the most in any layer)
    experts: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> routed experts compared
    bytes_planned: int = 0  # row blocks of every model, before coalescing
    requests_planned: int = 0  # one per tensor and model, before coalescing
    max_requests: int = DEFAULT_MAX_REQUESTS
    budget: int | None = None  # the byte budget F was fitted to (None: --sample alone)

    def as_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "tensors_read": self.tensors_read, "tensors_shared": self.tensors_shared,
                "moe_layers": self.moe_layers, "experts_total": self.experts_total,
                "experts_read": self.experts_read, "experts": {str(k): list(v) for k, v in self.experts.items()},
                "bytes_planned": self.bytes_planned, "requests_planned": self.requests_planned,
                "max_requests": self.max_requests, "budget": self.budget}

    def warning(self) -> str:
        rows = f"{100 * self.fraction:.3g}% of the rows" if self.fraction < 1 else "every row"
        text = (f"sampled remote audit: compared {self.tensors_read:,} of the {self.tensors_shared:,} tensors shared "
                f"with the candidates, {rows} of each (one seeded block; small norms and gates whole)")
        if self.moe_layers and self.experts_read < self.experts_total:
            text += (f"; routed experts: {self.experts_read} of {self.experts_total} in each of {self.moe_layers} "
                     "MoE layers (seeded by layer and expert count, the same in every model), the others not read")
        return text + ". Recipe weights and their intervals cover the tensors read (see docs/remote.md)."


def is_remote(views: list[ModelView]) -> bool:
    return any(str(getattr(v, "spec", "")).startswith("hf://") for v in views)


def _model_bytes(view: ModelView) -> int:
    return sum(t.nbytes for t in view.source.tensors().values())


def default_budget(views: list[ModelView]) -> int | None:
    """The byte budget a remote audit without --sample or --budget is planned to: None (read everything) unless
    the remote models together exceed REMOTE_FULL_BYTES."""
    remote = [v for v in views if str(getattr(v, "spec", "")).startswith("hf://")]
    total = sum(_model_bytes(v) for v in remote)
    if not remote or total <= REMOTE_FULL_BYTES:
        return None
    return int(DEFAULT_REMOTE_SHARE * sum(_model_bytes(v) for v in views) / BUDGET_SHARE)


def limit_read_ahead(views: list[ModelView], cap: int = READ_AHEAD_BYTES) -> None:
    """Bound what each remote model's read planner holds fetched ahead for a designed pass."""
    for v in views:
        planner = getattr(getattr(v.source, "store", None), "prefetcher", None)
        if planner is not None:
            planner.cap = min(planner.cap, cap)


def chosen_experts(ids: list[int], k: int, layer: int) -> tuple[int, ...]:
    """k of a layer's routed experts, seeded by the layer and the expert count (the same in every model)."""
    ids = sorted(ids)
    if k >= len(ids):
        return tuple(ids)
    order = seeded("audit-experts", layer, len(ids)).permutation(len(ids))[:k]
    return tuple(sorted(ids[int(i)] for i in order))


def _row_bytes(view: ModelView, slot) -> int:
    """Stored bytes of one row of a canonical part (a row of the stored tensor, as TensorInfo.rows counts them)."""
    info = view.source.tensors()[view.parts[slot].name]
    return max(1, info.nbytes // max(1, info.rows))


class _Costs:
    """Per plan item: bytes of one row in each model read, and whether it is read whole."""

    def __init__(self, views: list[ModelView], item: _PlanItem) -> None:
        s = views[0]
        part = s.parts[item.slot]
        self.rows = item.rows
        self.models = 1 + len(item.cands)
        self.row_bytes = _row_bytes(s, item.slot) + sum(_row_bytes(views[i], item.tfs[i].slot) for i in item.cands)
        self.whole = is_structured(item.slot, part) and item.rows * _row_bytes(s, item.slot) <= SMALL_WHOLE

    def rows_read(self, frac: float) -> int:
        if self.whole or frac >= 1:
            return self.rows
        return min(self.rows, max(1, round(frac * self.rows)))

    def nbytes(self, frac: float) -> int:
        return self.rows_read(frac) * self.row_bytes


def _block(item: _PlanItem, n: int, cols: int, chunk_rows: int) -> list[tuple[int, int]]:
    """One block of n rows at a place seeded by the slot and its shape, cut into chunks of at most chunk_rows."""
    rows, slot = item.rows, item.slot
    start = 0 if n >= rows else int(seeded("audit-rows", slot.role, slot.layer, slot.expert, rows, cols)
                                     .integers(0, rows - n + 1))
    return [(a, min(a + chunk_rows, start + n)) for a in range(start, start + n, chunk_rows)]


def _fit_fraction(costs: list[_Costs], room: int) -> float | None:
    """The largest F in (0, 1] whose planned bytes fit in `room`; None when one row each does not fit."""
    def total(f: float) -> int:
        return sum(c.nbytes(f) for c in costs)

    if total(1.0) <= room:
        return 1.0
    if total(0.0) > room:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= room else (lo, mid)
    return max(lo, 1e-9)


def design(views: list[ModelView], plan: list[_PlanItem], sample: float | None, budget: int | None = None,
           spent: int = 0, max_requests: int | None = None, chunk_bytes: int = 4 << 20
           ) -> tuple[list[_PlanItem], Coverage]:
    """The kept plan items (file order, `ranges` set) and what they cover. `budget`: bytes the run may read in
    all, of which `spent` are spent; `sample`: the row fraction (the smaller of the two wins when both are given)."""
    target = max_requests or DEFAULT_MAX_REQUESTS
    s = views[0]
    per_layer: dict[int, set[int]] = {}
    for item in plan:
        if is_expert_role(item.slot.role) and item.slot.expert >= 0:
            per_layer.setdefault(item.slot.layer, set()).add(item.slot.expert)
    experts = [it for it in plan if it.slot.layer in per_layer and it.slot.expert >= 0
               and is_expert_role(it.slot.role)]
    fixed = [it for it in plan if not (it.slot.layer in per_layer and it.slot.expert >= 0
                                       and is_expert_role(it.slot.role))]
    n_pairs = sum(len(v) for v in per_layer.values())  # (layer, expert) pairs
    most = max((len(v) for v in per_layer.values()), default=0)
    if n_pairs:
        per_expert = sum(1 + len(it.cands) for it in experts) / n_pairs  # requests of one expert of one layer
        room = target - sum(1 + len(it.cands) for it in fixed)
        k = min(most, max(MIN_EXPERTS, int(room // (per_expert * len(per_layer)))))
    else:
        k = 0
    while True:
        keep_e = {layer: set(chosen_experts(list(ids), k, layer)) for layer, ids in per_layer.items()}
        kept = fixed + [it for it in experts if it.slot.expert in keep_e[it.slot.layer]]
        costs = [_Costs(views, it) for it in kept]
        frac = 1.0 if sample is None else min(1.0, sample)
        if budget is None:
            break
        byte_room = int(max(0, budget - spent) * BUDGET_SHARE)
        fitted = _fit_fraction(costs, byte_room)
        if fitted is not None:
            frac = min(frac, fitted)
            break
        if k > 1:
            k = max(1, k // 2)
            continue
        least = sum(c.nbytes(0.0) for c in costs)
        raise InputError(f"--budget {budget} bytes cannot hold one row of each of the {len(kept)} tensors the "
                         f"audit compares ({least} bytes at least, within {BUDGET_SHARE:.0%} of the "
                         f"{max(0, budget - spent)} bytes left after headers and the layer map); raise it")
    tensors = s.source.tensors()

    def file_pos(item: _PlanItem) -> tuple[str, int, int]:
        p = s.parts[item.slot]
        info = tensors[p.name]
        return (info.file, info.offset, p.row_start)

    out = []
    for item, cost in sorted(zip(kept, costs, strict=True), key=lambda ic: file_pos(ic[0])):
        cols = s.parts[item.slot].cols
        chunk_rows = max(1, chunk_bytes // max(1, cols * 8))
        out.append(replace(item, ranges=_block(item, cost.rows_read(frac), cols, chunk_rows)))
    cov = Coverage(
        fraction=frac, tensors_read=len(out), tensors_shared=len(plan), moe_layers=len(per_layer),
        experts_total=most, experts_read=max((len(v) for v in keep_e.values()), default=0),
        experts={layer: tuple(sorted(v)) for layer, v in sorted(keep_e.items())},
        bytes_planned=sum(c.nbytes(frac) for c in costs),
        requests_planned=sum(c.models for c in costs), max_requests=target, budget=budget)
    return out, cov
