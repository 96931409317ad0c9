"""The one reader interface every checkpoint location and format implements.

A tensor is seen as a 2-D matrix of `rows x cols`, where `cols` is its last dimension and `rows` the product of
the others (a 1-D tensor is `n x 1`). Every read is a range of rows, so callers stream any tensor, however large, in
chunks of bounded size, and a remote source fetches exactly the byte range of those rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from modeltrace.errors import InputError

#: Default chunk budget for streamed reads, in bytes of float32 output.
DEFAULT_CHUNK_BYTES = 1024 * 1024  # small chunks stay in cache and reuse allocations (measured fastest)

#: Text files larger than this are not read (config, tokenizer and card files are far smaller).
MAX_TEXT_BYTES = 64 * 1024 * 1024


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _prefetch_pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="modeltrace-read")
        return _POOL


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where a tensor lives and what it holds; enough to plan reads without touching the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int = 0  # absolute byte offset of the tensor's data in `file` (formats that have one)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def cols(self) -> int:
        return self.shape[-1] if len(self.shape) >= 2 else 1

    @property
    def rows(self) -> int:
        return self.numel // self.cols if self.cols else 0


@dataclass
class FileInfo:
    name: str
    size: int


#: > 0 while a command collects evidence (see `recording_remote_ranges`). A plain counter, not a context variable:
#: the audit reads from worker threads, which do not inherit context variables.
_REMOTE_DIGESTS = 0
_REMOTE_DIGESTS_LOCK = threading.Lock()


@contextmanager
def recording_remote_ranges() -> Iterator[None]:
    """While active, remote byte stores record every range they serve with its SHA-256 (`ReadStats.digests`), so a
    report can name exactly which bytes a conclusion rests on. Hashing costs ~1 ms per MB, far below network time."""
    global _REMOTE_DIGESTS
    with _REMOTE_DIGESTS_LOCK:
        _REMOTE_DIGESTS += 1
    try:
        yield
    finally:
        with _REMOTE_DIGESTS_LOCK:
            _REMOTE_DIGESTS -= 1


@dataclass
class ReadStats:
    """Bytes fetched from storage (local or remote) since the source was opened."""

    bytes_read: int = 0
    requests: int = 0
    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    keep_ranges: bool = False
    #: (file, offset, length, sha256) of remote reads, kept while `recording_remote_ranges` is active
    digests: list[tuple[str, int, int, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, file: str, offset: int, length: int) -> None:
        with self._lock:  # readers may be shared by the audit's worker threads
            self.bytes_read += length
            self.requests += 1
            if self.keep_ranges:
                self.ranges.append((file, offset, length))

    def digest(self, file: str, offset: int, data: bytes | memoryview) -> None:
        """Record a remote range and its hash (also for ranges served from the local range cache)."""
        if not _REMOTE_DIGESTS:
            return
        h = hashlib.sha256(data).hexdigest()
        with self._lock:
            self.digests.append((file, offset, len(data), h))


class Source(ABC):
    """A checkpoint opened for reading: tensors, metadata files and hashes, read lazily."""

    #: human-readable location, e.g. a path or hf://owner/name@rev
    location: str
    #: short format name: safetensors, gguf, pytorch
    format: str
    #: whether reads may run on several threads at once
    thread_safe: bool = True

    def __init__(self) -> None:
        self.stats = ReadStats()

    # ---- tensors -------------------------------------------------------------------------------------------
    @abstractmethod
    def tensors(self) -> Mapping[str, TensorInfo]:
        """All tensors by their name in this checkpoint (format-native names mapped to Hugging Face names)."""

    @abstractmethod
    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor as float32 of shape (stop - start, cols). Bounds already checked."""

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> bytes:
        """Stored bytes of rows [start, stop), for hashing; formats without a byte layout may refuse."""
        raise InputError(f"{self.location}: raw bytes are not available for {self.format} tensors")

    @property
    def can_map(self) -> bool:
        """Whether `mapped_rows` gives stored bytes in place (local safetensors) instead of None."""
        return False

    @contextmanager
    def mapped_rows(self, name: str, start: int, stop: int) -> Iterator[np.ndarray | None]:
        """Stored bytes of rows [start, stop) as a read-only uint8 array without a copy, valid inside the block;
        None where the storage cannot be mapped (remote, pickles, GGUF): callers then use `read_rows`."""
        yield None

    def prefetch(self, reads: Iterable[tuple[str, int, int]]) -> None:  # noqa: B027 - optional hook
        """Announce row ranges (tensor name, start, stop) that will be read soon with `read_rows`. Remote sources
        fetch them now, nearby rows coalesced into few large requests, many in flight, and serve the later reads
        from memory (bounded); local sources ignore the hint. Unknown names and empty ranges are ignored."""

    def planned(self, reads: Iterable[tuple[str, int, int]]) -> Iterator[tuple[TensorInfo, int, int]]:
        """The announced reads a `prefetch` acts on: (tensor, start, stop) with `stop` clamped to the tensor's rows;
        unknown names and empty ranges left out."""
        tensors = self.tensors()
        for name, start, stop in reads:
            info = tensors.get(name)
            if info is None:
                continue
            stop = min(stop, info.rows)
            if 0 <= start < stop:
                yield info, start, stop

    def read_many(self, reads: list[tuple[str, int, int]]) -> list[np.ndarray]:
        """Several row ranges at once (tensor name, start, stop), in order: one batch of requests for remote
        sources instead of one request per range, one after another."""
        self.prefetch(reads)
        return [self.read_rows(n, a, b) for n, a, b in reads]

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors()[name]
        except KeyError:
            raise InputError(f"{self.location}: no tensor named {name!r}") from None

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor as a float32 (rows, cols) matrix. `stop` is clamped to the end."""
        info = self.info(name)
        stop = info.rows if stop is None else min(stop, info.rows)
        if start < 0 or start > stop:
            raise InputError(f"{self.location}: bad row range [{start}, {stop}) for {name}")
        if start == stop:
            return np.zeros((0, info.cols), dtype=np.float32)
        return self._read_rows(info, start, stop)

    def read(self, name: str) -> np.ndarray:
        """A whole tensor in its own shape, as float32. Only for tensors known to be small."""
        info = self.info(name)
        return self.read_rows(name).reshape(info.shape)

    def iter_rows(
        self, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, row_step: int = 1, prefetch: int = 2
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Stream a tensor as (first_row, float32 chunk) pairs, each at most `chunk_bytes` of output.

        Up to `prefetch` chunks are read and decoded ahead on worker threads (reads and numpy release the GIL), so
        decoding overlaps I/O; memory stays bounded by (prefetch + 1) chunks. With `row_step > 1` only every
        `row_step`-th row is read (sampling).
        """
        info = self.info(name)
        if row_step > 1:
            ranges = [(a, a + 1) for a in range(0, info.rows, row_step)]
        else:
            per_chunk = max(1, chunk_bytes // max(1, info.cols * 4))
            ranges = [(a, min(a + per_chunk, info.rows)) for a in range(0, info.rows, per_chunk)]
        if prefetch <= 0 or not self.thread_safe or len(ranges) < 3:
            for a, b in ranges:
                yield a, self.read_rows(name, a, b)
            return
        pool = _prefetch_pool()
        pending: deque[tuple[int, Future]] = deque()
        todo = iter(ranges)
        for a, b in itertools.islice(todo, prefetch):
            pending.append((a, pool.submit(self.read_rows, name, a, b)))
        while pending:
            a, fut = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(self.read_rows, name, *nxt)))
            yield a, fut.result()

    # ---- files ---------------------------------------------------------------------------------------------
    @abstractmethod
    def files(self) -> list[FileInfo]:
        """Files that make up the checkpoint (weights, config, tokenizer, card)."""

    @abstractmethod
    def read_file(self, name: str, limit: int = MAX_TEXT_BYTES) -> bytes | None:
        """Contents of a small metadata file, or None when absent."""

    def text_file(self, name: str) -> str | None:
        data = self.read_file(name)
        return None if data is None else data.decode("utf-8", errors="replace")

    def json_file(self, name: str) -> dict | None:
        text = self.text_file(name)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.location}: {name} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return value if isinstance(value, dict) else None

    def config(self) -> dict | None:
        """The model's config.json (or the format's equivalent)."""
        return self.json_file("config.json")

    def native_tokenizer(self) -> dict | None:
        """Tokenizer summary held inside the weights file itself (GGUF); None means: read tokenizer files."""
        return None

    def card_text(self) -> str | None:
        """The model card (README.md with YAML front matter), if the checkpoint has one."""
        return self.text_file("README.md")

    @abstractmethod
    def file_sha256(self, name: str) -> str:
        """SHA-256 of one file, streamed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_stream(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()
