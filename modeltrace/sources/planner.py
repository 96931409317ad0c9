"""The read planner for remote stores: byte spans a caller will read soon, coalesced into few large requests that
are fetched many at a time, then served from memory.

Data flow: `Prefetcher.add(spans)` (from `Source.prefetch`: the layer map's sampled rows, a slot's row blocks in
the audit) -> spans already planned are dropped, the rest sorted per file and merged while the gap between two spans
is at most `gap` bytes and a merged request stays under `max_request` -> each merged block is handed to a thread
pool (requests in flight are bounded by the transport's connection gate) while the bytes held stay under `cap`;
blocks past the cap wait in a queue -> `take(file, offset, length)` (from `ByteStore.read`) waits for the block
that covers the span, slices it, and drops the block once every span planned into it was taken, which frees room
for queued blocks. A read nobody planned returns None and goes to the network as before. Memory: at most `cap`
bytes fetched ahead per store, plus a block that a read asked for directly.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["coalesce", "Prefetcher", "Block", "DEFAULT_GAP", "DEFAULT_MAX_REQUEST", "DEFAULT_CAP"]

#: Two spans closer than this are read in one request: at 100 MB/s and 20 ms a request, 1 MiB of gap costs half
#: a request's latency.
DEFAULT_GAP = 1024 * 1024
#: Merged requests stop growing here, so that many run in parallel and one retry repeats little.
DEFAULT_MAX_REQUEST = 16 * 1024 * 1024
#: Bytes fetched ahead and not yet read, per store.
DEFAULT_CAP = 256 * 1024 * 1024

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:  # grows with --connections, never shrinks
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="modeltrace-fetch")
        return _POOL


def coalesce(spans: Iterable[tuple[str, int, int]], gap: int = DEFAULT_GAP, max_request: int = DEFAULT_MAX_REQUEST
             ) -> list[tuple[str, int, int, int]]:
    """(file, offset, length, spans merged) requests covering every (file, offset, length) span, in file order.
    Spans are merged when the gap between them is at most `gap`, and no larger than the bytes wanted so far plus
    the next span (so at most about half of what is fetched is unwanted), and the merged request stays within
    `max_request` (a single span longer than that is one request of its own)."""
    by_file: dict[str, list[tuple[int, int]]] = {}
    for f, off, n in spans:
        if n > 0:
            by_file.setdefault(f, []).append((off, off + n))
    out: list[tuple[str, int, int, int]] = []
    for f, items in by_file.items():
        items.sort()
        start, end = items[0]
        count, useful = 1, end - start
        for a, b in items[1:]:
            hole = a - end
            if hole <= gap and hole <= useful + (b - a) and max(end, b) - start <= max_request:
                useful += max(0, b - max(a, end))
                end = max(end, b)
                count += 1
            else:
                out.append((f, start, end - start, count))
                start, end, count, useful = a, b, 1, b - a
        out.append((f, start, end - start, count))
    return out


@dataclass(eq=False)
class Block:
    file: str
    start: int
    end: int
    refs: int  # planned spans not yet taken
    future: Future | None = None  # None while queued behind the cap
    taken: int = field(default=0)

    @property
    def length(self) -> int:
        return self.end - self.start


class Prefetcher:
    """Blocks of one store fetched ahead (see the module docstring). Thread-safe."""

    def __init__(self, fetch: Callable[[str, int, int], bytes], workers: int, cap: int = DEFAULT_CAP,
                 gap: int = DEFAULT_GAP, max_request: int = DEFAULT_MAX_REQUEST) -> None:
        self._fetch = fetch
        self.workers = max(1, workers)
        self.cap, self.gap, self.max_request = cap, gap, max_request
        self._blocks: dict[str, list[Block]] = {}  # per file, sorted by start
        self._starts: dict[str, list[int]] = {}
        self._queue: deque[Block] = deque()
        self._held = 0  # bytes of submitted blocks not yet dropped
        self._lock = threading.Lock()
        self.planned_requests = 0

    # ---- planning ------------------------------------------------------------------------------------------
    def add(self, spans: Iterable[tuple[str, int, int]]) -> None:
        """Plan these spans; fetching starts at once for as many blocks as the cap allows. Never blocks."""
        with self._lock:
            fresh = []
            for f, off, n in spans:
                blk = self._covering(f, off, n)
                if blk is not None:
                    blk.refs += 1
                elif n > 0:
                    fresh.append((f, off, n))
            for f, off, n, count in coalesce(fresh, self.gap, self.max_request):
                blk = Block(f, off, off + n, count)
                i = bisect.bisect_right(self._starts.setdefault(f, []), off)
                self._starts[f].insert(i, off)
                self._blocks.setdefault(f, []).insert(i, blk)
                self._queue.append(blk)
                self.planned_requests += 1
            self._pump()

    def _covering(self, f: str, off: int, n: int) -> Block | None:
        starts = self._starts.get(f)
        if not starts:
            return None
        blocks = self._blocks[f]
        i = bisect.bisect_right(starts, off) - 1
        # blocks may overlap (a span planned later next to an earlier block): look back a little
        for j in range(i, max(-1, i - 8), -1):
            b = blocks[j]
            if b.start <= off and off + n <= b.end:
                return b
        return None

    def _pump(self) -> None:
        """Submit queued blocks while the bytes held stay under the cap (at least one block always runs)."""
        while self._queue and (self._held == 0 or self._held + self._queue[0].length <= self.cap):
            self._submit(self._queue.popleft())

    def _submit(self, blk: Block) -> None:
        self._held += blk.length
        blk.future = _pool(self.workers).submit(self._fetch, blk.file, blk.start, blk.length)

    # ---- reading -------------------------------------------------------------------------------------------
    def take(self, f: str, off: int, n: int) -> bytes | None:
        """The planned bytes [off, off + n) of `f` (waiting for their block), or None when no block covers them."""
        with self._lock:
            blk = self._covering(f, off, n)
            if blk is None:
                return None
            if blk.future is None:  # still queued: the reader needs it now
                self._queue.remove(blk)
                self._submit(blk)
            fut = blk.future
            assert fut is not None
        try:
            data = fut.result()
        except BaseException:
            self._drop(blk)
            raise
        out = data[off - blk.start:off - blk.start + n]
        with self._lock:
            blk.taken += 1
            if blk.refs > 0:
                blk.refs -= 1
            done = blk.refs == 0
        if done:
            self._drop(blk)
        return out

    def _drop(self, blk: Block) -> None:
        with self._lock:
            blocks = self._blocks.get(blk.file, [])
            for i, b in enumerate(blocks):
                if b is blk:
                    del blocks[i]
                    del self._starts[blk.file][i]
                    if blk.future is not None:
                        self._held -= blk.length
                    break
            self._pump()

    @property
    def held(self) -> int:
        return self._held

    def clear(self) -> None:
        """Forget every block (queued ones are never fetched; running ones finish and are dropped)."""
        with self._lock:
            self._queue.clear()
            self._blocks.clear()
            self._starts.clear()
            self._held = 0
