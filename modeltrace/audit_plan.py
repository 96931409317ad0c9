"""The audit's plan: which rows of which slots the streaming pass compares, and with which candidate parts.

Data flow: `audit._stream` walks the suspect's slots and, per candidate, asks `_transform` for the part it is compared
with (the same slot, the layer the layer map found, an alignment's transform, or a dense MLP for an upcycled expert);
`_plan_item` turns those transforms into a `_PlanItem` (the suspect rows compared: all, a shared vocabulary prefix, or
the tokens every vocabulary map covers). `_choose_refined` marks the slots whose rounding-aware weight fit runs,
`_row_plan` / `_rows_read` give each item's row ranges (all in chunks, or a spread sample), and `_ReadAhead` announces
those ranges to remote sources in plan order, so their reads are in flight before the slots are compared
(audit_slot.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from modeltrace.align.disguise import Alignment
from modeltrace.align.transform import WHOLE_BYTES, SlotTransform
from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot, is_structured

__all__ = ["READ_AHEAD", "ROUNDING_SLOTS"]


def _row_plan(rows: int, cols: int, sample: float | None, chunk_bytes: int, elem_bytes: int = 8
              ) -> list[tuple[int, int]]:
    """Row ranges to read: everything in chunks, or with --sample an evenly spread fraction in contiguous blocks.
    `elem_bytes` is the memory one element costs while a chunk is processed (float32 copy plus float64 stack)."""
    per_chunk = max(1, chunk_bytes // max(1, cols * elem_bytes))
    want = rows if not sample or sample >= 1 else max(1, int(round(rows * sample)))
    if want >= rows:
        return [(a, min(a + per_chunk, rows)) for a in range(0, rows, per_chunk)]
    nblocks = min(want, 16)
    size = max(1, want // nblocks)
    starts = np.linspace(0, rows - size, nblocks).astype(int)
    plan, last = [], -1
    for st in starts:
        a = max(int(st), last)
        e = min(a + size, rows)
        if e > a:
            plan.append((a, e))
            last = e
    return plan


def _aligned_slot(views: list[ModelView], i: int, slot: Slot, layer_source: dict[tuple[int, int], int]) -> Slot:
    """The candidate slot that a suspect slot is compared with: same slot, or the layer the layer map found."""
    if slot.layer >= 0 and (i, slot.layer) in layer_source:
        return Slot(slot.role, layer_source[(i, slot.layer)], slot.expert)
    return slot


@dataclass
class _PlanItem:
    slot: Slot
    cands: list[int]
    tfs: dict[int, SlotTransform]
    rows: int  # suspect rows compared (len(srows) when srows is given)
    srows: np.ndarray | None = None  # the suspect rows compared, when not a prefix (re-mapped vocabularies)
    ranges: list[tuple[int, int]] | None = None  # the row ranges read, when a sampling design chose them
    refine: bool = True  # whether the rounding-aware weight fit runs on this slot (see ROUNDING_SLOTS)


#: Slots on which the rounding-aware merge-weight fit runs (detectors/rounding.py, ~80 ms a slot with three
#: candidates): evenly spread over the plan. One slot's fit resolves a weight to ~1e-4 (rounding.MAX_ELEMENTS), so
#: pooled over 128 tensors its weights reach the 1e-5 resolution floor of rounded storage (rounding.RESOLUTION); on a
#: 400B MoE's 3,000 compared tensors the other fits added a minute and no precision. The other slots keep their
#: least-squares weights for the per-layer table and drop out of the pooled weights (their bias over rounded storage
#: is what the refined fit removes).
ROUNDING_SLOTS = 128


def _choose_refined(plan: list[_PlanItem]) -> None:
    if len(plan) <= ROUNDING_SLOTS:
        return
    keep = set(np.linspace(0, len(plan) - 1, ROUNDING_SLOTS).round().astype(int).tolist())
    for k, item in enumerate(plan):
        item.refine = k in keep


def _transform(views: list[ModelView], i: int, slot: Slot, layer_source: dict[tuple[int, int], int],
               alignments: list[Alignment | None]) -> SlotTransform | None:
    al = alignments[i - 1] if i - 1 < len(alignments) else None
    if al is not None:
        return al.transform(slot, views[i])
    cs = _aligned_slot(views, i, slot, layer_source)
    if cs in views[i].parts:
        return SlotTransform(cs)
    dense = _upcycle_source(views, i, slot, cs)
    return SlotTransform(dense) if dense is not None else None


def _upcycle_source(views: list[ModelView], i: int, slot: Slot, cs: Slot) -> Slot | None:
    """For an expert of the suspect with no expert counterpart in a dense candidate: that candidate's dense MLP
    part of the same layer and shape (MoE upcycling copies the dense MLP into every expert)."""
    if not slot.role.startswith("expert_") or any(s.role.startswith("expert_") for s in views[i].parts):
        return None
    dense = Slot("mlp_" + slot.role.removeprefix("expert_"), cs.layer, -1)
    part = views[i].parts.get(dense)
    mine = views[0].parts[slot]
    return dense if part is not None and (part.rows, part.cols) == (mine.rows, mine.cols) else None


def _plan_item(views: list[ModelView], slot: Slot, tfs: dict[int, SlotTransform]) -> _PlanItem:
    """Rows of the suspect compared: all, the shared prefix of differing vocabularies, or the tokens that every
    candidate's vocabulary map covers."""
    part = views[0].parts[slot]
    cands = sorted(tfs)
    if not any(tfs[i].rows is not None and slot.role in ("embed", "lm_head") for i in cands):
        rows = min([part.rows] + [tfs[i].shape(views[i])[0] for i in cands])
        return _PlanItem(slot, cands, tfs, rows)
    ok: np.ndarray = np.ones(part.rows, dtype=bool)
    for i in cands:
        tf = tfs[i]
        if tf.rows is None:
            ok &= np.arange(part.rows) < views[i].parts[tf.slot].rows
        else:
            m: np.ndarray = np.full(part.rows, -1, dtype=np.int64)
            n = min(part.rows, len(tf.rows))
            m[:n] = tf.rows[:n]
            ok &= m >= 0
            tf.rows = np.where(m >= 0, m, 0)
    srows = np.nonzero(ok)[0]
    return _PlanItem(slot, cands, tfs, len(srows), srows)


def _rows_read(views: list[ModelView], item: _PlanItem, sample: float | None, chunk_bytes: int) -> int:
    if item.ranges is not None:
        return sum(b - a for a, b in item.ranges)
    part = views[0].parts[item.slot]
    return sum(b - a for a, b in _row_plan(item.rows, part.cols, None if is_structured(item.slot, part) else sample,
                                           chunk_bytes))


#: Slots whose reads are announced ahead of the one being compared (remote sources fetch them meanwhile, bounded
#: in bytes by their read planner; local sources ignore announcements).
READ_AHEAD = 64


class _ReadAhead:
    """Announces each plan item's row blocks (suspect, and candidates read by plain row ranges) to the sources in
    plan order, so remote reads are coalesced and in flight while earlier slots are compared. Items are announced
    in batches of READ_AHEAD, so that neighbouring tensors' blocks (a designed plan is in file order) share
    requests."""

    def __init__(self, views: list[ModelView], plan: list[_PlanItem], sample: float | None, chunk_bytes: int):
        self.views, self.plan, self.sample, self.chunk_bytes = views, plan, sample, chunk_bytes
        self.active = any(getattr(getattr(v.source, "store", None), "parallel", 1) > 1 for v in views)
        self.done = 0
        self.lock = threading.Lock()

    def upto(self, n: int) -> None:
        if not self.active:
            return
        with self.lock:
            if n <= self.done:
                return
            end = min(len(self.plan), n + READ_AHEAD)
            items = self.plan[self.done:end]
            self.done = max(self.done, end)
        reads: dict[int, list[tuple[str, int, int]]] = {}
        for item in items:
            if item.srows is not None:
                continue
            part = self.views[0].parts[item.slot]
            ranges = item.ranges
            if ranges is None:
                ranges = _row_plan(item.rows, part.cols, None if is_structured(item.slot, part) else self.sample,
                                   self.chunk_bytes)
            reads.setdefault(0, []).extend((part.name, part.row_start + a, part.row_start + b) for a, b in ranges)
            for i in item.cands:
                tf, view = item.tfs[i], self.views[i]
                if tf.rows is None and tf.row_mat is None and (tf.identity or view.parts[tf.slot].numel * 4
                                                               > WHOLE_BYTES):
                    cp = view.parts[tf.slot]
                    reads.setdefault(i, []).extend((cp.name, cp.row_start + a, cp.row_start + b) for a, b in ranges)
        for i, spans in reads.items():
            self.views[i].source.prefetch(spans)
