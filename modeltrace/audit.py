"""`modeltrace audit`: stream the suspect and its candidates once, slot by slot, and fit recipes.

Flow: open every source -> layer map from sampled rows (stacks, copies) -> for a candidate whose same-index rows do
not correlate, alignment discovery (`align.disguise`: permuted units, heads, experts, layers, vocabulary, residual
stream) -> one streaming pass over aligned slots accumulating Gram sums (candidate chunks read through the
alignment: row gathers, column permutations) -> per-slot recipe fits and independence z-scores -> `verdict.decide`.
Hot path: when every model stores a slot as bf16 or f32 in local safetensors and the candidates need no alignment,
the stored bytes are mapped in place window by window and a fused numba kernel takes every statistic in one pass
(`detectors.kernels`); otherwise chunks are decoded to float32 and the numpy accumulator does the same sums.
Peak extra memory is about (models + 1) x chunk_bytes x 2 on the numpy path (float32 chunk plus its float64 stack),
and models x 4 x chunk_bytes of mapped page cache per worker thread on the kernel path: about 256 MB and 96 MB by
default with three models, whatever the checkpoint size.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from modeltrace.align.coverage import no_overlap_message, skip_warnings
from modeltrace.align.disguise import Alignment, discover
from modeltrace.align.layers import map_layers
from modeltrace.align.transform import WHOLE_BYTES, AlignedReader, SlotTransform, gather
from modeltrace.align.view import ModelView, open_view
from modeltrace.architectures import Slot, is_structured
from modeltrace.audit_design import Coverage, default_budget, design, is_remote, limit_read_ahead
from modeltrace.detectors import kernels
from modeltrace.detectors.accumulate import SlotAccumulator, SlotStats
from modeltrace.detectors.fits import SlotFit, fit_slot
from modeltrace.errors import InputError
from modeltrace.methods import fitting_order
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
    #: candidates compared through a part of another role (an expert against a dense MLP: upcycling)
    cross: dict[int, str] = field(default_factory=dict)


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
    base_inferred: bool = False  # the base was not named but found as the candidate the others meet at
    coverage: Coverage | None = None  # what a designed (sampled remote) streaming pass read (audit_design)


ProgressFn = Callable[[int, int], None]


#: The fused kernel holds no float copies, only mapped stored bytes: its windows are this many times larger (fewer
#: map/unmap calls; 16 MB per model with the default chunk), still bounded whatever the checkpoint size.
RAW_WINDOW_FACTOR = 4


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
    workers: int | None = None,
    ray: bool = False,
    address: str | None = None,
    budget: int | None = None,
    max_requests: int | None = None,
) -> AuditRun:
    """Audit `suspect` against `candidates`. The streaming pass runs on this process's threads, or with
    `workers` > 1 in that many local processes, or with `ray` as Ray tasks (`address` as in engine.py); the results
    are the same (see `Dispatch`). When a model is remote and `sample` or `budget` (bytes the run may read) is
    given, or the remote models are huge, the streaming pass follows the sampling design of `audit_design` (a
    seeded subset of routed experts within `max_requests`, one row block per tensor within the budget)."""
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
        inferred = False
        if base_idx is None and len(views) >= 4:  # three candidates or more: one may be the others' base
            base_idx = _infer_base(views)
            inferred = base_idx is not None
        alignments = discover(views, layer_matches, warnings)
        dispatch = Dispatch(workers, ray, address, allow_pickle) if ray or (workers or 0) > 1 else None
        plan_design = None
        if is_remote(views):
            if budget is None and sample is None:
                budget = default_budget(views)
            if budget is not None or sample is not None:
                spent = sum(v.source.stats.bytes_read for v in views if v.spec.startswith("hf://"))
                plan_design = _Design(budget, spent, max_requests)
                limit_read_ahead(views)
        slots, coverage = _stream(views, base_idx, sample, chunk_bytes, progress, warnings, layer_matches,
                                  alignments, dispatch=dispatch, plan_design=plan_design)
        if coverage is not None:
            sample = coverage.fraction
        bytes_read = sum(v.source.stats.bytes_read for v in views)
    except BaseException:
        for v in views:
            v.close()
        raise
    for v in views:
        v.close()
    return AuditRun(views, base_idx, slots, layer_matches, warnings, bytes_read, time.perf_counter() - t0, sample,
                    alignments, inferred, coverage)


@dataclass(frozen=True)
class _Design:
    """Run the streaming pass by `audit_design.design`: the run's byte budget (None: --sample alone), the
    remote bytes already spent, and the request target."""

    budget: int | None
    spent: int
    max_requests: int | None


def _infer_base(views: list[ModelView]) -> int | None:
    """The candidate the other candidates are fine-tunes of (relatives.infer_base over a fixed sample of rows), so
    that task-vector methods are named without --base."""
    from modeltrace.relatives import infer_base, sample_distances

    D, norms = sample_distances(views)
    return infer_base(D, norms, list(range(1, len(views))))


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
        if any(x is None for x in arrs):
            return False
        acc.update_raw(tuple(arrs), dtype, b - a)
        del arrs
    return True


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
            alignments: list[Alignment | None] | None = None, dispatch: Dispatch | None = None,
            plan_design: _Design | None = None) -> tuple[list[SlotResult], Coverage | None]:
    s = views[0]
    alignments = alignments or []
    # Layers of the suspect that are exact copies of another layer of a candidate are compared with that layer.
    layer_source = {(m.candidate + 1, m.layer): m.source_layer for m in layer_matches
                    if m.exact and m.source_layer != m.layer}
    plan: list[_PlanItem] = []
    missing: dict[int, list[Slot]] = {}  # no counterpart slot in candidate i
    misshapen: dict[int, list[Slot]] = {}  # a counterpart of another shape
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
                (missing if shape is None else misshapen).setdefault(i, []).append(slot)
                continue
            tfs[i] = tf
        if tfs:
            item = _plan_item(views, slot, tfs)
            if item.rows > 0:
                plan.append(item)
    for i in sorted(set(missing) | set(misshapen)):
        warnings.extend(skip_warnings(s, views[i], missing.get(i, []), misshapen.get(i, [])))
    if not plan:
        raise InputError(no_overlap_message(s, views[1:]))
    coverage = None
    if plan_design is not None:
        plan, coverage = design(views, plan, sample, plan_design.budget, plan_design.spent,
                                plan_design.max_requests, chunk_bytes)
        warnings.append(coverage.warning())
        sample = coverage.fraction
    _choose_refined(plan)
    total = sum(_rows_read(views, item, sample, chunk_bytes) * s.parts[item.slot].cols for item in plan)
    done = [0]
    lock = threading.Lock()

    def tick(n: int) -> None:
        with lock:
            done[0] += n
            if progress:
                progress(done[0], total)

    ahead = _ReadAhead(views, plan, sample, chunk_bytes)

    def work(k: int) -> SlotResult:
        ahead.upto(k + READ_AHEAD)
        return _process_slot(views, plan[k], base, sample, chunk_bytes, tick, alignments)

    workers = _threads(views)
    if dispatch is not None:
        results = _stream_elsewhere(views, plan, base, sample, chunk_bytes, alignments, dispatch, tick)
    elif workers > 1:
        # the worker threads use the cores: BLAS threads on top spin-wait around every small product and fit
        # (measured on 2 busy cores: a corpus MoE audit 20 s with them, 5 s without)
        with _one_blas_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(work, range(len(plan))))
    else:
        results = [work(k) for k in range(len(plan))]
    for res in results:
        bad = int(res.stats.nonfinite[0])
        if bad:
            warnings.append(f"suspect tensor {s.parts[res.slot].name} has {bad} NaN/Inf values "
                            "(treated as 0 for the comparison)")
    if progress:
        progress(total, total)
    results.sort(key=lambda r: r.slot)  # the slots' order, whatever order they were read in
    return results, coverage


def _one_blas_thread() -> contextlib.AbstractContextManager:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


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


# ---- the streaming pass over views already open, and elsewhere (local processes, Ray) ---------------------------
def run_views(views: list[ModelView], base: int | None = None, sample: float | None = None,
              chunk_bytes: int = DEFAULT_AUDIT_CHUNK, progress: ProgressFn | None = None,
              layer_matches: list | None = None, alignments: list[Alignment | None] | None = None,
              warnings: list[str] | None = None, dispatch: Dispatch | None = None) -> AuditRun:
    """The audit's streaming pass over views that are already open (suspect first, then candidates; `base` indexes
    them): model views, or any object that reads like one (identify's fingerprint views). The layer map is made
    unless given; alignments (`align.disguise.discover`) are followed when given. Returns the AuditRun that
    `verdict.decide` reads; the views stay open. `dispatch` runs the pass in local processes or on Ray, which
    needs model views (they are opened again there from their specs)."""
    t0 = time.perf_counter()
    warnings = [] if warnings is None else warnings
    matches = map_layers(views[0], views[1:]) if layer_matches is None else layer_matches
    slots, _ = _stream(views, base, sample, chunk_bytes, progress, warnings, matches, alignments, dispatch=dispatch)
    bytes_read = sum(v.source.stats.bytes_read for v in views)
    return AuditRun(views, base, slots, matches, warnings, bytes_read, time.perf_counter() - t0, sample,
                    list(alignments or []))


@dataclass(frozen=True)
class Dispatch:
    """Run the streaming pass as work items through `engine`: `workers` local processes, or Ray tasks (`ray`,
    `address`). Items are the plan grouped by the suspect's weight file (a file with more than its share of the work
    split in plan order), so each work item opens every model again from its spec (`allow_pickle` as given) and
    streams its slots with `_process_slot`; results are merged back in plan order, and the bytes each model
    streamed are added to its read statistics, so verdict and report equal a single-process audit's."""

    workers: int | None = None
    ray: bool = False
    address: str | None = None
    allow_pickle: bool = False


@dataclass
class SlotWork:
    """One work item of a dispatched streaming pass (it pickles: specs, plan items, slim alignments)."""

    specs: list[str]  # suspect first, as the views list; hf:// pinned to the commit the audit read
    labels: list[str]
    allow_pickle: bool
    items: list[_PlanItem]
    base: int | None
    sample: float | None
    chunk_bytes: int
    alignments: list[Alignment | None]
    record_ranges: bool = False  # record remote ranges with their hashes, as the caller does (report evidence)


@dataclass
class SlotWorkDone:
    results: list[SlotResult]  # one per item, in order
    reads: list[tuple[int, int, list]]  # per model: bytes, requests and remote-range digests of the streaming


def run_slot_work(work: SlotWork) -> SlotWorkDone:
    """What a worker runs: open the models from their specs, `_process_slot` each item, and report the reads made
    after opening (the headers were read, and counted, by the caller)."""
    from modeltrace.sources.base import recording_remote_ranges

    with ExitStack() as stack:
        if work.record_ranges:
            stack.enter_context(recording_remote_ranges())
        views: list[ModelView] = []
        stack.callback(lambda: [v.close() for v in views])
        for spec, label in zip(work.specs, work.labels, strict=True):
            views.append(open_view(spec, label, allow_pickle=work.allow_pickle))
        marks = [(v.source.stats.bytes_read, v.source.stats.requests, len(v.source.stats.digests)) for v in views]
        results = [_process_slot(views, item, work.base, work.sample, work.chunk_bytes, _no_tick, work.alignments)
                   for item in work.items]
        reads = [(v.source.stats.bytes_read - b, v.source.stats.requests - r, list(v.source.stats.digests[d:]))
                 for v, (b, r, d) in zip(views, marks, strict=True)]
    return SlotWorkDone(results, reads)


def _no_tick(n: int) -> None:
    pass


def _reopen_spec(view: ModelView) -> str:
    """Where another process opens the same model: an absolute path, or hf:// pinned to the commit read here."""
    from modeltrace.fingerprint.core import normalize_spec

    store = getattr(view.source, "store", None)
    repo, sha = getattr(store, "repo_id", None), getattr(store, "sha", None)
    if view.spec.startswith("hf://") and repo and sha:
        picked = getattr(view.source, "selected_file", None)  # a GGUF file of the repository
        return f"hf://{repo}@{sha}" + (f"/{picked}" if picked else "")
    return normalize_spec(view.spec)


def _work_groups(views: list[ModelView], plan: list[_PlanItem], want: int) -> list[list[int]]:
    """Plan indices grouped by the suspect's weight file; a group above 1/want of the work is split in plan order."""
    s = views[0]
    tensors = s.source.tensors()
    by_file: dict[str, list[int]] = {}
    for i, item in enumerate(plan):
        by_file.setdefault(tensors[s.parts[item.slot].name].file, []).append(i)
    cost = [max(1, item.rows * s.parts[item.slot].cols) for item in plan]
    cap = -(-sum(cost) // max(1, want))
    groups: list[list[int]] = []
    for idx in by_file.values():
        cur: list[int] = []
        acc = 0
        for i in idx:
            if cur and acc + cost[i] > cap:
                groups.append(cur)
                cur, acc = [], 0
            cur.append(i)
            acc += cost[i]
        groups.append(cur)
    return groups


def _stream_elsewhere(views: list[ModelView], plan: list[_PlanItem], base: int | None, sample: float | None,
                      chunk_bytes: int, alignments: list[Alignment | None], dispatch: Dispatch,
                      tick: Callable[[int], None]) -> list[SlotResult]:
    from modeltrace import engine
    from modeltrace.sources import base as sources_base

    if not all(isinstance(v, ModelView) for v in views):
        raise InputError("the streaming pass runs in other processes only on models opened from their specs")
    specs = [_reopen_spec(v) for v in views]
    labels = [v.label for v in views]
    # _process_slot reads an alignment's match tests only (a selected transform's z); the maps travel in the items
    slim = [None if al is None else Alignment(al.candidate, tests=list(al.tests)) for al in alignments]
    record = sources_base._REMOTE_DIGESTS > 0
    s = views[0]
    results: list[SlotResult | None] = [None] * len(plan)
    with engine.Runner(dispatch.workers, dispatch.ray, dispatch.address) as runner:
        groups = _work_groups(views, plan, 2 * runner.parallel)
        works = [SlotWork(specs, labels, dispatch.allow_pickle, [plan[i] for i in g], base, sample, chunk_bytes,
                          slim, record) for g in groups]
        for o in runner.map(run_slot_work, works):
            if not o.ok:
                raise engine.WorkError(o.error or "a work item failed")
            done: SlotWorkDone = o.value
            for i, res in zip(groups[o.index], done.results, strict=True):
                results[i] = res
            for v, (nbytes, nreq, digests) in zip(views, done.reads, strict=True):
                st = v.source.stats
                st.bytes_read += nbytes
                st.requests += nreq
                st.digests.extend(digests)
            tick(sum(plan[i].rows * s.parts[plan[i].slot].cols for i in groups[o.index]))
    return [r for r in results if r is not None]
