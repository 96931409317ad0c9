"""The audit's streaming pass run elsewhere: in local processes or as Ray tasks (`Dispatch`), with the results of one
process.

Data flow: `audit._stream` hands its plan to `_stream_elsewhere`, which groups it by the suspect's weight file
(`_work_groups`; a file with more than its share of the work split in plan order), makes one `SlotWork` per group
(the models' specs, pinned hf:// commits included (`_reopen_spec`), the plan items and slim alignments) and runs them
through `engine.Runner`. Each worker (`run_slot_work`) opens the models again, runs `audit_slot._process_slot` on its
items and returns a `SlotWorkDone`: the slot results and the bytes, requests and remote-range digests it read, which
are added to the caller's read statistics, so verdict and report equal a single-process audit's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from modeltrace.align.disguise import Alignment
from modeltrace.align.view import ModelView, open_view
from modeltrace.audit_plan import _PlanItem
from modeltrace.audit_slot import SlotResult, _process_slot
from modeltrace.errors import InputError

__all__ = ["Dispatch", "SlotWork", "SlotWorkDone", "run_slot_work"]


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
        stack.callback(_close_all, views)
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


def _close_all(views: list[ModelView]) -> None:
    for v in views:
        v.close()
