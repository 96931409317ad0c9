"""`modeltrace audit`: stream the suspect and its candidates once, slot by slot, and fit recipes.

Flow: open every source -> layer map from sampled rows (stacks, copies) -> for a candidate whose same-index rows do
not correlate, alignment discovery (`align.disguise`: permuted units, heads, experts, layers, vocabulary, residual
stream) -> one streaming pass over aligned slots accumulating Gram sums (candidate chunks read through the
alignment: row gathers, column permutations) -> per-slot recipe fits and independence z-scores -> `verdict.decide`.
Peak extra memory is about (models + 1) x chunk_bytes x 2 (float32 chunk plus its float64 stack), 256 MB by default
with three models, whatever the checkpoint size.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from modeltrace.align.disguise import Alignment, discover
from modeltrace.align.layers import map_layers
from modeltrace.align.transform import AlignedReader, SlotTransform, gather
from modeltrace.align.view import ModelView, open_view
from modeltrace.architectures import Slot, is_structured
from modeltrace.detectors.accumulate import SlotAccumulator, SlotStats
from modeltrace.detectors.fits import SlotFit, fit_slot
from modeltrace.errors import InputError
from modeltrace.stats import fisher_z, z_from_log10p

DEFAULT_AUDIT_CHUNK = 4 * 1024 * 1024


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


@dataclass
class AuditRun:
    views: list[ModelView]  # 0 = suspect, 1.. = candidates
    base: int | None
    slots: list[SlotResult]
    layer_matches: list
    warnings: list[str]
    bytes_read: int
    elapsed: float
    sample: float | None
    alignments: list[Alignment | None] = field(default_factory=list)  # per candidate (views[1:])


ProgressFn = Callable[[int, int], None]


def _row_plan(rows: int, cols: int, sample: float | None, chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges to read: everything in chunks, or with --sample an evenly spread fraction in contiguous blocks."""
    per_chunk = max(1, chunk_bytes // max(1, cols * 8))
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


def _dedupe(views: list[ModelView], warnings: list[str]) -> list[ModelView]:
    out: list[ModelView] = []
    seen: dict[str, str] = {}
    for v in views:
        key = v.source.location
        if key in seen:
            warnings.append(f"candidate {v.label} is the same model as {seen[key]}; ignoring the duplicate")
            v.close()
            continue
        seen[key] = v.label
        out.append(v)
    return out


def run_audit(
    suspect: str,
    candidates: list[str],
    base: str | None = None,
    sample: float | None = None,
    chunk_bytes: int = DEFAULT_AUDIT_CHUNK,
    progress: ProgressFn | None = None,
    allow_pickle: bool = False,
) -> AuditRun:
    if not candidates:
        raise InputError("audit needs at least one --candidate to compare the suspect with")
    if sample is not None and not 0 < sample <= 1:
        raise InputError("--sample must be a fraction in (0, 1]")
    t0 = time.perf_counter()
    warnings: list[str] = []
    views: list[ModelView] = []
    try:
        views.append(open_view(suspect, allow_pickle=allow_pickle))
        cand_views = [open_view(c, allow_pickle=allow_pickle) for c in candidates]
        cand_views = _dedupe(cand_views, warnings)
        base_idx = None
        if base is not None:
            bview = open_view(base, allow_pickle=allow_pickle)
            match = [i for i, v in enumerate(cand_views) if v.source.location == bview.source.location]
            if match:
                bview.close()
                base_idx = match[0] + 1
            else:
                cand_views.append(bview)
                base_idx = len(cand_views)
        views.extend(cand_views)
        if views[0].source.location in {v.source.location for v in cand_views}:
            warnings.append("the suspect is also listed as a candidate; it will match itself exactly")
        layer_matches = map_layers(views[0], views[1:])
        alignments = discover(views, layer_matches, warnings)
        slots = _stream(views, base_idx, sample, chunk_bytes, progress, warnings, layer_matches, alignments)
        bytes_read = sum(v.source.stats.bytes_read for v in views)
    except BaseException:
        for v in views:
            v.close()
        raise
    for v in views:
        v.close()
    return AuditRun(views, base_idx, slots, layer_matches, warnings, bytes_read, time.perf_counter() - t0, sample,
                    alignments)


def _aligned_slot(views: list[ModelView], i: int, slot: Slot, layer_source: dict[tuple[int, int], int]) -> Slot:
    """The candidate slot that a suspect slot is compared with: same slot, or the layer the layer map found."""
    if slot.layer >= 0 and (i, slot.layer) in layer_source:
        return Slot(slot.role, layer_source[(i, slot.layer)], slot.expert)
    return slot


def _threads(views: list[ModelView]) -> int:
    """Worker threads for the slot loop: numpy releases the GIL in reads, decoding and BLAS, so two threads use
    both cores of a laptop. Readers that are not thread-safe (zip members of pickles) run single-threaded."""
    env = os.environ.get("MODELTRACE_THREADS")
    n = int(env) if env and env.isdigit() else min(4, os.cpu_count() or 1)
    if any(v.source.format == "pytorch" for v in views):
        return 1
    return max(1, n)


@dataclass
class _PlanItem:
    slot: Slot
    cands: list[int]
    tfs: dict[int, SlotTransform]
    rows: int  # suspect rows compared (len(srows) when srows is given)
    srows: np.ndarray | None = None  # the suspect rows compared, when not a prefix (re-mapped vocabularies)


def _process_slot(views: list[ModelView], item: _PlanItem, base: int | None, sample: float | None, chunk_bytes: int,
                  tick: Callable[[int], None], alignments: list[Alignment | None]) -> SlotResult:
    s = views[0]
    slot, cands, rows, srows = item.slot, item.cands, item.rows, item.srows
    part = s.parts[slot]
    structured = is_structured(slot, part)
    idx_base = cands.index(base) + 1 if base in cands else None
    acc = SlotAccumulator(1 + len(cands), part.cols, idx_base, s.dtype(slot), total_rows=rows,
                          cand_dtypes=[views[i].dtype(item.tfs[i].slot) for i in cands])
    ranges = _row_plan(rows, part.cols, sample if not structured else None, chunk_bytes)
    note = ""
    if rows < part.rows or any(item.tfs[i].shape(views[i])[0] != rows and item.tfs[i].rows is None for i in cands):
        note = f"vocabularies differ: compared the {rows} shared rows"
    readers = {i: AlignedReader(views[i], item.tfs[i]) for i in cands}
    for a, b in ranges:
        sx = s.read(slot, a, b) if srows is None else gather(s, slot, srows[a:b])
        chunks = [sx] + [readers[i].read(a, b, srows) for i in cands]
        acc.update(chunks)
        tick((b - a) * part.cols)
    st = acc.finish()
    local = list(range(1, len(cands) + 1))
    fit = _to_global(fit_slot(st, local, idx_base), cands)
    res = SlotResult(slot, cands, st, fit, structured, rows_compared=st.rows, rows_total=part.rows, note=note)
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


def _to_global(fit: SlotFit, cands: list[int]) -> SlotFit:
    fit.weights = {cands[k - 1]: v for k, v in fit.weights.items()}
    fit.free_weights = {cands[k - 1]: v for k, v in fit.free_weights.items()}
    return fit


def _transform(views: list[ModelView], i: int, slot: Slot, layer_source: dict[tuple[int, int], int],
               alignments: list[Alignment | None]) -> SlotTransform | None:
    al = alignments[i - 1] if i - 1 < len(alignments) else None
    if al is not None:
        return al.transform(slot, views[i])
    cs = _aligned_slot(views, i, slot, layer_source)
    return SlotTransform(cs) if cs in views[i].parts else None


def _plan_item(views: list[ModelView], slot: Slot, tfs: dict[int, SlotTransform]) -> _PlanItem:
    """Rows of the suspect compared: all, the shared prefix of differing vocabularies, or the tokens that every
    candidate's vocabulary map covers."""
    part = views[0].parts[slot]
    cands = sorted(tfs)
    if not any(tfs[i].rows is not None and slot.role in ("embed", "lm_head") for i in cands):
        rows = min([part.rows] + [tfs[i].shape(views[i])[0] for i in cands])
        return _PlanItem(slot, cands, tfs, rows)
    ok = np.ones(part.rows, dtype=bool)
    for i in cands:
        tf = tfs[i]
        if tf.rows is None:
            ok &= np.arange(part.rows) < views[i].parts[tf.slot].rows
        else:
            m = np.full(part.rows, -1, dtype=np.int64)
            n = min(part.rows, len(tf.rows))
            m[:n] = tf.rows[:n]
            ok &= m >= 0
            tf.rows = np.where(m >= 0, m, 0)
    srows = np.nonzero(ok)[0]
    return _PlanItem(slot, cands, tfs, len(srows), srows)


def _stream(views: list[ModelView], base: int | None, sample: float | None, chunk_bytes: int,
            progress: ProgressFn | None, warnings: list[str], layer_matches: list,
            alignments: list[Alignment | None] | None = None) -> list[SlotResult]:
    s = views[0]
    alignments = alignments or []
    # Layers of the suspect that are exact copies of another layer of a candidate are compared with that layer.
    layer_source = {(m.candidate + 1, m.layer): m.source_layer for m in layer_matches
                    if m.exact and m.source_layer != m.layer}
    plan: list[_PlanItem] = []
    skipped_shape: dict[int, int] = {}
    for slot, part in sorted(s.parts.items()):
        if slot.role == "buffer":
            continue
        tfs: dict[int, SlotTransform] = {}
        for i in range(1, len(views)):
            al = alignments[i - 1] if i - 1 < len(alignments) else None
            if al is not None and al.skip(slot):
                continue
            tf = _transform(views, i, slot, layer_source, alignments)
            shape = tf.shape(views[i]) if tf is not None else None
            vocab_rows = slot.role in ("embed", "lm_head")
            if shape is None or shape[1] != part.cols or (shape[0] != part.rows and not vocab_rows):
                skipped_shape[i] = skipped_shape.get(i, 0) + 1
                continue
            tfs[i] = tf
        if tfs:
            item = _plan_item(views, slot, tfs)
            if item.rows > 0:
                plan.append(item)
    for i, n in skipped_shape.items():
        warnings.append(f"{views[i].label}: {n} suspect tensors have no same-shape counterpart; compared the rest")
    if not plan:
        raise InputError("no tensor of the suspect has a same-shape counterpart in any candidate: different "
                         "architectures cannot be compared weight by weight")
    total = sum(item.rows * s.parts[item.slot].cols for item in plan)
    done = [0]
    lock = threading.Lock()

    def tick(n: int) -> None:
        with lock:
            done[0] += n
            if progress:
                progress(done[0], total)

    def work(item: _PlanItem) -> SlotResult:
        return _process_slot(views, item, base, sample, chunk_bytes, tick, alignments)

    workers = _threads(views)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(work, plan))
    else:
        results = [work(item) for item in plan]
    for res in results:
        bad = int(res.stats.nonfinite[0])
        if bad:
            warnings.append(f"suspect tensor {s.parts[res.slot].name} has {bad} NaN/Inf values "
                            "(treated as 0 for the comparison)")
    if progress:
        progress(total, total)
    return results
