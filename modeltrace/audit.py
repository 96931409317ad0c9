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

The plan (audit_plan.py), one slot's reading and fit (audit_slot.py) and the pass run in other processes or on Ray
(audit_dispatch.py) are modules of their own; this one opens the models and runs the pass (`run_audit`, `run_views`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from modeltrace.align.coverage import no_overlap_message, skip_warnings
from modeltrace.align.disguise import Alignment, discover
from modeltrace.align.layers import map_layers
from modeltrace.align.transform import SlotTransform
from modeltrace.align.view import ModelView, open_view
from modeltrace.architectures import Slot
from modeltrace.audit_design import Coverage, default_budget, design, is_remote, limit_read_ahead
from modeltrace.audit_dispatch import Dispatch, _stream_elsewhere
from modeltrace.audit_dispatch import _work_groups as _work_groups
from modeltrace.audit_plan import READ_AHEAD, _choose_refined, _plan_item, _PlanItem, _ReadAhead, _rows_read, _transform
from modeltrace.audit_plan import ROUNDING_SLOTS as ROUNDING_SLOTS
from modeltrace.audit_slot import SlotResult, _process_slot
from modeltrace.errors import InputError

__all__ = ["DEFAULT_AUDIT_CHUNK", "AuditRun", "Dispatch", "SlotResult", "run_audit", "run_views"]

DEFAULT_AUDIT_CHUNK = 4 * 1024 * 1024


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


def _threads(views: list[ModelView]) -> int:
    """Worker threads for the slot loop: numpy releases the GIL in reads, decoding and BLAS, so two threads use
    both cores of a laptop. Readers that are not thread-safe (zip members of pickles) run single-threaded."""
    env = os.environ.get("MODELTRACE_THREADS")
    n = int(env) if env and env.isdigit() else min(4, os.cpu_count() or 1)
    if any(v.source.format == "pytorch" for v in views):
        return 1
    return max(1, n)


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
            if tf is None or shape is None or shape[1] != part.cols or (shape[0] != part.rows and not vocab_rows):
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
