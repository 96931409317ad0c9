"""Checkpoints stored as safetensors: one file, a folder, or shards with an index, on any ByteStore."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

import modeltrace.sources.safetensors_format as fmt
from modeltrace.errors import InputError
from modeltrace.sources.base import MAX_TEXT_BYTES, FileInfo, Source, TensorInfo
from modeltrace.sources.bytestore import ByteStore

INDEX_NAME = "model.safetensors.index.json"


class SafetensorsSource(Source):
    format = "safetensors"

    def __init__(self, store: ByteStore, single_file: str | None = None) -> None:
        super().__init__()
        self.store = store
        store.stats = self.stats
        self.location = store.location
        self.single_file = single_file
        self._files = store.list_files() if single_file is None else [FileInfo(single_file, store.size(single_file))]
        self._tensors: dict[str, TensorInfo] | None = None
        self.metadata: dict[str, dict] = {}
        self._weight_map: dict[str, str] | None = None
        self.weight_files = self._weight_files()

    def _weight_files(self) -> list[str]:
        if self.single_file:
            return [self.single_file]
        names = {f.name for f in self._files}
        if INDEX_NAME in names:
            index = self.json_file(INDEX_NAME) or {}
            wmap = index.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise InputError(f"{self.location}: {INDEX_NAME} has no weight_map")
            shards = sorted({str(v) for v in wmap.values()})
            for s in shards:
                if not isinstance(s, str) or s.startswith("/") or ".." in s.split("/"):
                    raise InputError(f"{self.location}: {INDEX_NAME} points outside the model folder ({s!r})")
            missing = [s for s in shards if s not in names]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise InputError(f"{self.location}: missing shard {missing[0]}{more} named in {INDEX_NAME}")
            self._weight_map = {str(k): str(v) for k, v in wmap.items()}
            return shards
        self._weight_map = None
        top = sorted(f.name for f in self._files if f.name.endswith(".safetensors") and "/" not in f.name)
        if not top:
            raise InputError(f"{self.location}: no .safetensors weights found")
        return top

    def tensors(self) -> Mapping[str, TensorInfo]:
        if self._tensors is None:
            sizes = {f.name: f.size for f in self._files}
            out: dict[str, TensorInfo] = {}
            for wf, (ts, meta) in zip(self.weight_files, self._headers(sizes), strict=True):
                self.metadata[wf] = meta
                for name, info in ts.items():
                    if name in out:
                        raise InputError(f"{self.location}: tensor {name} appears in both {out[name].file} and {wf}")
                    out[name] = info
            if self._weight_map is not None:
                for name, shard in self._weight_map.items():
                    got = out.get(name)
                    if got is None:
                        raise InputError(f"{self.location}: {INDEX_NAME} lists {name} in {shard} but it is not there")
                    if got.file != shard:
                        raise InputError(f"{self.location}: {INDEX_NAME} lists {name} in {shard}, found in {got.file}")
                self._weight_map = {}  # checked: its 93k names need not stay in memory (the tensors hold them)
            self._tensors = out
        return self._tensors

    def _headers(self, sizes: dict[str, int]) -> list[tuple[dict[str, TensorInfo], dict]]:
        """Every shard's header; all at once on stores that read in parallel (remote), in order otherwise."""
        n = min(self.store.parallel, len(self.weight_files))
        if n <= 1:
            return [fmt.parse_header(self.store, wf, sizes.get(wf)) for wf in self.weight_files]
        names: dict[str, list[str]] = {}
        for tname, shard in (self._weight_map or {}).items():
            names.setdefault(shard, []).append(tname)
        ahead = {wf: fmt.header_estimate(names[wf]) if wf in names else fmt.HEADER_AHEAD for wf in self.weight_files}
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="modeltrace-headers") as pool:
            out = list(pool.map(lambda wf: fmt.parse_header(self.store, wf, sizes.get(wf), ahead[wf]),
                                self.weight_files))
        _trim()
        return out

    def prefetch(self, reads: Iterable[tuple[str, int, int]]) -> None:
        if self.store.parallel <= 1:
            return
        self.store.prefetch([(info.file, *fmt.row_span(info, start, stop))
                             for info, start, stop in self.planned(reads)])

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        return fmt.read_rows(self.store, info, start, stop)

    @property
    def can_map(self) -> bool:
        return self.store.can_map

    @contextmanager
    def mapped_rows(self, name: str, start: int, stop: int) -> Iterator[np.ndarray | None]:
        info = self.info(name)
        stop = min(stop, info.rows)
        if not 0 <= start < stop:
            yield None
            return
        off, length = fmt.row_span(info, start, stop)
        with self.store.mapped(info.file, off, length) as mv:
            if mv is None:
                yield None
                return
            arr = np.frombuffer(mv, dtype=np.uint8)
            try:
                yield arr
            finally:
                del arr

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> bytes:
        info = self.info(name)
        stop = info.rows if stop is None else min(stop, info.rows)
        off, length = fmt.row_span(info, start, stop)
        return bytes(self.store.read(info.file, off, length))

    def files(self) -> list[FileInfo]:
        return list(self._files)

    def read_file(self, name: str, limit: int = MAX_TEXT_BYTES) -> bytes | None:
        if self.single_file is not None and name != self.single_file:
            return None
        if not any(f.name == name for f in self._files):
            return None
        size = self.store.size(name)
        if size > limit:
            raise InputError(f"{self.location}: {name} is {size} bytes, larger than the {limit}-byte limit")
        return bytes(self.store.read(name, 0, size))

    def config(self) -> dict | None:
        if self.single_file is not None:
            return None
        return super().config()

    def file_sha256(self, name: str) -> str:
        return self.store.sha256(name)

    def close(self) -> None:
        self.store.close()


def _trim() -> None:
    """Hand the C allocator's free pages back to the system: parsing many headers on many threads leaves them in
    glibc's per-thread arenas (~15 MB for a 93k-tensor model). A no-op where malloc_trim does not exist."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def dumps_index(weight_map: dict[str, str]) -> str:
    return json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
