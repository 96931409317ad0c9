"""One slot of the audit's streaming pass: read the suspect's and the candidates' rows, accumulate, fit.

Data flow: `_process_slot(views, item, ...)` takes one `_PlanItem` (audit_plan.py), reads its row ranges from every
model (candidates through their `AlignedReader`: gathers, permutations, re-mapped vocabulary rows) into a
`SlotAccumulator` - or, when every model stores the slot in one kernel dtype in local files and no alignment is needed
(`_raw_dtype`), maps the stored bytes straight into the fused kernel (`_update_mapped`) - then fits the recipe
(`detectors.fits.fit_slot`), maps the fit's candidate indices back to the views' (`_to_global`), and returns a
`SlotResult` with per-candidate correlations and independence z-scores (an alignment's match test for candidates
compared through a selected transform).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from modeltrace.align.disguise import Alignment
from modeltrace.align.transform import AlignedReader, gather
from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot, is_structured
from modeltrace.audit_plan import _PlanItem, _row_plan
from modeltrace.detectors import kernels
from modeltrace.detectors.accumulate import SlotAccumulator, SlotStats
from modeltrace.detectors.fits import SlotFit, fit_slot
from modeltrace.methods import fitting_order
from modeltrace.stats import fisher_z, z_from_log10p

__all__ = ["RAW_WINDOW_FACTOR", "SlotResult"]


@dataclass
class SlotResult:
    slot: Slot
    cands: list[int]  # candidate indices (1-based, as in the views list) compared on this slot
    stats: SlotStats
    fit: SlotFit
    structured: bool
    z: dict[int, float] = field(default_factory=dict)
    corr: dict[int, float] = field(default_factory=dict)
    rows_compared: int = 0
    rows_total: int = 0
    note: str = ""
    #: candidates compared through an alignment chosen by matching: their z is the match test's, not the
    #: elementwise correlation's (a correlation maximised by the alignment is no longer a valid null)
    selected: set[int] = field(default_factory=set)
    #: candidates compared through a part of another role (an expert against a dense MLP: upcycling)
    cross: dict[int, str] = field(default_factory=dict)


#: The fused kernel holds no float copies, only mapped stored bytes: its windows are this many times larger (fewer
#: map/unmap calls; 16 MB per model with the default chunk), still bounded whatever the checkpoint size.
RAW_WINDOW_FACTOR = 4


def _process_slot(views: list[ModelView], item: _PlanItem, base: int | None, sample: float | None, chunk_bytes: int,
                  tick: Callable[[int], None], alignments: list[Alignment | None]) -> SlotResult:
    s = views[0]
    slot, cands, rows, srows = item.slot, item.cands, item.rows, item.srows
    part = s.parts[slot]
    structured = is_structured(slot, part)
    idx_base = cands.index(base) + 1 if base in cands else None
    raw_dtype = _raw_dtype(views, item)
    if item.ranges is not None:
        ranges = item.ranges
    elif raw_dtype is None:
        ranges = _row_plan(rows, part.cols, sample if not structured else None, chunk_bytes)
    else:
        ranges = _row_plan(rows, part.cols, sample if not structured else None, chunk_bytes * RAW_WINDOW_FACTOR,
                           kernels.itemsize(raw_dtype))
    acc = SlotAccumulator(1 + len(cands), part.cols, idx_base, s.dtype(slot), total_rows=rows,
                          cand_dtypes=[views[i].dtype(item.tfs[i].slot) for i in cands], grid_cells=s.stored_rows)
    note = ""
    if rows < part.rows or any(item.tfs[i].shape(views[i])[0] != rows and item.tfs[i].rows is None for i in cands):
        note = f"vocabularies differ: compared the {rows} shared rows"
    readers = {i: AlignedReader(views[i], item.tfs[i]) for i in cands}
    for a, b in ranges:
        if raw_dtype is not None and _update_mapped(acc, views, item, raw_dtype, a, b):
            tick((b - a) * part.cols)
            continue
        sx = s.read(slot, a, b) if srows is None else gather(s, slot, srows[a:b])
        chunks = [sx] + [readers[i].read(a, b, srows) for i in cands]
        acc.update(chunks)
        tick((b - a) * part.cols)
    st = acc.finish()
    local = list(range(1, len(cands) + 1))
    fit = _to_global(fit_slot(st, local, idx_base, fitting_order(), refine=item.refine), cands)
    # the element sample serves the weight fit only: a 3,000-tensor audit kept ~250 MB of them to the end
    st.sample = st.cells = None
    res = SlotResult(slot, cands, st, fit, structured, rows_compared=st.rows, rows_total=part.rows, note=note,
                     cross={i: item.tfs[i].slot.role for i in cands if item.tfs[i].slot.role != slot.role})
    for li, ci in zip(local, cands, strict=True):
        r = st.corr(li)
        res.corr[ci] = r
        res.z[ci] = fisher_z(r, st.dof)
        al = alignments[ci - 1] if ci - 1 < len(alignments) else None
        if al is not None and item.tfs[ci].selected:
            lz = al.layer_z(slot.layer) if slot.layer >= 0 else None
            res.z[ci] = lz if lz is not None else z_from_log10p(al.log10p)
            res.selected.add(ci)
    return res


def _raw_dtype(views: list[ModelView], item: _PlanItem) -> str | None:
    """The storage dtype when the fused kernel can read this slot's stored bytes directly: every model stores it
    in the same kernel dtype, in local files that can be mapped, and every candidate is read through the identity
    (no gathers, permutations, rotations or re-mapped vocabulary rows)."""
    if not kernels.available() or item.srows is not None:
        return None
    if not views[0].source.can_map or not all(views[i].source.can_map for i in item.cands):
        return None
    dtypes = {views[0].dtype(item.slot)} | {views[i].dtype(item.tfs[i].slot) for i in item.cands}
    if len(dtypes) != 1 or not all(item.tfs[i].identity for i in item.cands):
        return None
    dtype = dtypes.pop()
    return dtype if dtype in kernels.RAW else None


def _update_mapped(acc: SlotAccumulator, views: list[ModelView], item: _PlanItem, dtype: str, a: int, b: int
                   ) -> bool:
    """Rows [a, b) of every model straight from the page cache into the fused kernel; False (nothing added) if a
    window could not be mapped after all, and the caller reads the chunk the ordinary way."""
    slots = [item.slot] + [item.tfs[i].slot for i in item.cands]
    models = [views[0]] + [views[i] for i in item.cands]
    with ExitStack() as stack:
        arrs = [stack.enter_context(v.mapped(sl, a, b)) for v, sl in zip(models, slots, strict=True)]
        mapped = [x for x in arrs if x is not None]
        if len(mapped) != len(arrs):
            return False
        acc.update_raw(tuple(mapped), dtype, b - a)
        del arrs, mapped
    return True


def _to_global(fit: SlotFit, cands: list[int]) -> SlotFit:
    fit.weights = {cands[k - 1]: v for k, v in fit.weights.items()}
    fit.free_weights = {cands[k - 1]: v for k, v in fit.free_weights.items()}
    return fit
