"""The fingerprint of a sharded checkpoint, made by several work items: the same bytes as `make_fingerprint`.

1. `plan_fingerprint(spec)` opens the model and reads everything but the sampled blocks (headers, config, token rows
   and gains of the robust section, card). A model whose sampled tensors sit in one file is finished right there
   and comes back as a `Fingerprint`; otherwise a `ShardedFingerprint` comes back, holding one `ShardWork` per
   weight file that holds sampled tensors.
2. `read_shard(work)`, anywhere (a local process, a Ray task on another node), opens only that shard (its header;
   hf:// specs are pinned to the commit the plan read) and reads the sampled row blocks stored in it.
3. `assemble(plan, blocks)` feeds every block, in plan order, into the content hash, the robust section and the
   samples exactly as `make_fingerprint` does (fingerprint/core.py: `begin_fingerprint`, `add_block`,
   `finish_fingerprint` are shared), so `to_bytes()` and `content_hash` are identical; bytes read and requests are
   the plan's plus each shard's block reads (a shard's own header read is not counted twice).

Blocks travel as float32 (the content hash covers them as read), halved when their low 16 bits are all zero (bf16
and fp8 weights): for a 397B-class MoE about 105 MB per model, the bytes a single process would read anyway.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modeltrace.architectures import Family, Slot
from modeltrace.errors import InputError
from modeltrace.fingerprint.core import (
    Fingerprint,
    FingerprintJob,
    SlotSample,
    _window_map,
    add_block,
    begin_fingerprint,
    fingerprint_view,
    finish_fingerprint,
    normalize_spec,
)
from modeltrace.fingerprint.sampling import SlotPlan, plan
from modeltrace.sources.base import ReadStats, TensorInfo

if TYPE_CHECKING:
    from modeltrace.align.view import ModelView
    from modeltrace.sources.safetensors_source import SafetensorsSource


@dataclass
class ShardWork:
    """One work item: the sampled slots stored in one weight file of a model."""

    spec: str  # where to open the model: a local folder, or hf://owner/name@commit
    shard: str  # the weight file, relative to the model
    family: Family
    plans: list[SlotPlan]
    #: the plan's header entries of the tensors read, checked against the shard when it is opened again
    infos: dict[str, TensorInfo]
    threads: int | None = None


@dataclass
class ShardBlocks:
    """What a shard's work item returns: its blocks in work order, packed (see `_pack`), and the bytes it read."""

    shard: str
    blocks: list[tuple[tuple[int, int], bool, bytes]]
    bytes_read: int
    requests: int
    elapsed: float


@dataclass
class ShardedFingerprint:
    """A fingerprint waiting for its blocks: the begun job (all other reads done) and one work item per shard.
    It pickles (it travels from the work item that planned it to the process that assembles it): the robust
    collector goes without its open view, and its locks are made anew on arrival."""

    job: FingerprintJob
    works: list[ShardWork]
    bytes_read: int
    requests: int
    elapsed: float

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        robust = self.job.robust
        data = {k: v for k, v in vars(robust).items() if k != "view" and not isinstance(v, _LOCKS)}
        locks = [k for k, v in vars(robust).items() if isinstance(v, _LOCKS)]
        state["job"] = replace(self.job, robust=None)
        state["robust"] = (type(robust), data, locks)
        return state

    def __setstate__(self, state: dict) -> None:
        cls, data, locks = state.pop("robust")
        robust = cls.__new__(cls)
        robust.__dict__.update(data, view=None)
        for k in locks:
            setattr(robust, k, threading.Lock())
        state["job"] = replace(state["job"], robust=robust)
        self.__dict__.update(state)


_LOCKS = (type(threading.Lock()), type(threading.RLock()))


def _shard_spec(view: ModelView) -> str | None:
    """Where a work item can open one shard of this model, or None when the model is not split that way
    (one file, GGUF, pickles, a source handed in)."""
    from modeltrace.sources.bytestore import LocalStore
    from modeltrace.sources.safetensors_source import SafetensorsSource

    src = view.source
    if not isinstance(src, SafetensorsSource) or src.single_file or len(src.weight_files) < 2:
        return None
    store = src.store
    if isinstance(store, LocalStore) and not store.only:
        return str(Path(store.root).resolve())
    repo, sha = getattr(store, "repo_id", None), getattr(store, "sha", None)
    if repo and view.spec.startswith("hf://"):
        return f"hf://{repo}@{sha or store.revision}"  # type: ignore[attr-defined]
    return None


def plan_fingerprint(spec: str, label: str | None = None, allow_pickle: bool = False, threads: int | None = None,
                     ) -> Fingerprint | ShardedFingerprint:
    """The fingerprint itself when one work item is all it takes, else its plan with one work item per shard."""
    from modeltrace.align.view import label_for, open_view

    t0 = time.perf_counter()
    spec = normalize_spec(spec)
    view = open_view(spec, label or label_for(spec), allow_pickle=allow_pickle)
    try:
        where = _shard_spec(view)
        tensors = view.source.tensors()
        if where is not None:
            dtypes = {slot: tensors[p.name].dtype for slot, p in view.parts.items()}
            files = {tensors[p.part.name].file for p in plan(view.parts, dtypes)}
            if len(files) < 2:
                where = None
        if where is None:
            return fingerprint_view(view, spec, threads, t0)
        job = begin_fingerprint(view, spec)
        groups: dict[str, list[SlotPlan]] = {}
        for p in job.plans:
            groups.setdefault(tensors[p.part.name].file, []).append(p)
        works = [ShardWork(where, f, view.family, ps, {p.part.name: tensors[p.part.name] for p in ps}, threads)
                 for f, ps in sorted(groups.items())]
        stats = view.source.stats
        return ShardedFingerprint(job, works, stats.bytes_read, stats.requests, time.perf_counter() - t0)
    finally:
        view.close()


def _open_shard(spec: str, shard: str) -> SafetensorsSource:
    from modeltrace.sources.bytestore import LocalStore
    from modeltrace.sources.safetensors_source import SafetensorsSource

    if spec.startswith("hf://"):
        from modeltrace.sources.hub import HubStore, parse_spec

        repo, revision = parse_spec(spec)
        return SafetensorsSource(HubStore(repo, revision), single_file=shard)
    return SafetensorsSource(LocalStore(Path(spec), ReadStats(), only=shard), single_file=shard)


def _pack(block: np.ndarray) -> tuple[tuple[int, int], bool, bytes]:
    """A float32 block as bytes, losslessly: only the high halves when every low half is zero (bf16, fp8)."""
    b = np.ascontiguousarray(block, dtype=np.float32)
    u = b.view(np.uint32)
    if not (u & np.uint32(0xFFFF)).any():
        return b.shape, True, (u >> np.uint32(16)).astype("<u2").tobytes()  # type: ignore[return-value]
    return b.shape, False, b.astype("<f4").tobytes()  # type: ignore[return-value]


def _unpack(packed: tuple[tuple[int, int], bool, bytes]) -> np.ndarray:
    shape, half, data = packed
    if half:
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(shape)


def read_shard(work: ShardWork) -> ShardBlocks:
    """Read one shard's sampled blocks (what a work item runs)."""
    from modeltrace.align.view import ModelView

    t0 = time.perf_counter()
    src = _open_shard(work.spec, work.shard)
    try:
        got = src.tensors()
        for name, info in work.infos.items():
            if got.get(name) != info:
                raise InputError(f"{work.spec}: {work.shard} changed while the model was being fingerprinted "
                                 f"({name} is not where its header said)")
        b0, r0 = src.stats.bytes_read, src.stats.requests  # this shard's header is counted by the plan
        parts = {p.slot: p.part for p in work.plans}
        view = ModelView(work.shard, work.spec, src, work.family, parts, {})
        n_threads = work.threads or (8 if work.spec.startswith("hf://") else 2)

        def read(p: SlotPlan) -> np.ndarray:
            return view.read(p.slot, p.row0, p.row0 + p.nrows)

        blocks = [_pack(b) for b in _window_map(read, work.plans, n_threads)]
        return ShardBlocks(work.shard, blocks, src.stats.bytes_read - b0, src.stats.requests - r0,
                           time.perf_counter() - t0)
    finally:
        src.close()


def assemble(sharded: ShardedFingerprint, results: Iterable[ShardBlocks]) -> Fingerprint:
    """The fingerprint from its plan and every shard's blocks (any order): identical to `make_fingerprint`'s."""
    by_shard = {r.shard: r for r in results}
    missing = [w.shard for w in sharded.works if w.shard not in by_shard]
    if missing:
        raise InputError(f"{sharded.job.spec}: no blocks from shard {missing[0]}")
    blocks: dict[Slot, tuple[tuple[int, int], bool, bytes]] = {}
    for w in sharded.works:
        r = by_shard[w.shard]
        if len(r.blocks) != len(w.plans):
            raise InputError(f"{sharded.job.spec}: shard {w.shard} gave {len(r.blocks)} of {len(w.plans)} blocks")
        blocks.update(zip((p.slot for p in w.plans), r.blocks, strict=True))
    job = sharded.job
    h = hashlib.sha256(job.prefix)
    slots: dict[Slot, SlotSample] = {}
    for p in job.plans:
        add_block(job, h, slots, p, _unpack(blocks.pop(p.slot)))
    bytes_read = sharded.bytes_read + sum(by_shard[w.shard].bytes_read for w in sharded.works)
    requests = sharded.requests + sum(by_shard[w.shard].requests for w in sharded.works)
    elapsed = sharded.elapsed + sum(by_shard[w.shard].elapsed for w in sharded.works)
    return finish_fingerprint(job, h, slots, bytes_read, requests, elapsed)


def make_fingerprint_sharded(spec: str, allow_pickle: bool = False, workers: int | None = None, ray: bool = False,
                             address: str | None = None) -> Fingerprint:
    """`make_fingerprint` with each shard read by its own work item (local processes, or Ray tasks)."""
    from modeltrace import engine

    got = plan_fingerprint(spec, allow_pickle=allow_pickle)
    if isinstance(got, Fingerprint):
        return got
    with engine.Runner(workers, ray, address) as runner:
        results = []
        for o in runner.map(read_shard, got.works):
            if not o.ok:
                raise engine.WorkError(o.error or "")
            results.append(o.value)
    return assemble(got, results)
