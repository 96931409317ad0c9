"""Run independent work items in local processes or as Ray tasks, with the same results either way.

A work item is `fn(item)` for a module-level `fn` (so it pickles by reference): it must be a pure function of its
item. Failures stay per item: the library's one-line errors come back as `Outcome.error`, other exceptions as an
"internal error" line, so one bad model does not end a scan of thousands. Results stream back in input order with a
bounded number in flight, so memory stays bounded however many items there are.

A `Runner` holds the workers (a process pool, or a Ray connection) for several maps: a scan maps one planning task
per model and, for a sharded model, one task per shard on the same workers while later models are still planned;
`run` is one map on a runner of its own.

Local worker processes end with their parent: each watches the process that started it and exits at once when that
process is gone (killed with SIGKILL included), so no orphan keeps reading weights.

Ray (`pip install 'ray==2.60.0'`) is imported only when asked for. `address=None` or "local" starts a private local
instance (or reuses one this process already started); "auto" joins the cluster this machine belongs to;
"ray://HOST:10001" connects through the Ray client to a remote head. Every node needs modeltrace installed (same
version) and must be able to open the items (shared storage or hf:// specs).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from modeltrace.errors import InputError, ModelTraceError

RAY_PIN = "ray==2.60.0"
#: What --ray's optional ADDRESS means, for every command that takes it.
RAY_ADDRESS_HELP = ("with no ADDRESS a private local instance; `auto` the cluster this machine is part of; "
                    "`ray://HEAD:10001` a remote cluster through the Ray client. Every node needs modeltrace (same "
                    "version) and must see the models (shared storage or hf://).")
#: Lines that mean a bug or a lost worker rather than bad input (see `WorkError`).
_INTERNAL = ("internal error", "Ray task failed")


@dataclass
class Outcome:
    index: int
    item: Any
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class WorkError(ModelTraceError):
    """A work item of a job that cannot go on without it (an audit's slots) failed; carries the item's one line.
    Exit code 70 when that line is a bug or a lost worker, else 2 like any bad input."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.exit_code = 70 if line.startswith(_INTERNAL) else 2


def call(fn: Callable[[Any], Any], item: Any) -> tuple[Any, str | None]:
    """Run one item, turning failures into one line (this is what runs inside a worker or Ray task)."""
    try:
        return fn(item), None
    except ModelTraceError as exc:
        return None, str(exc)
    except MemoryError:
        return None, "out of memory"
    except Exception as exc:  # noqa: BLE001 - one item's bug must not end the whole run
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"internal error: {type(exc).__name__}: {msg}"


#: how often a worker process checks that its parent is still alive (seconds)
PARENT_POLL_S = 0.2


def _watch_parent(parent: int) -> None:
    """Worker initializer: exit as soon as `parent` is gone. A thread that polls the parent id survives what a
    signal-based hook would not (PR_SET_PDEATHSIG fires when the parent's spawning *thread* ends, not the process)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:  # re-parented: the parent died
                os._exit(1)
            time.sleep(PARENT_POLL_S)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="modeltrace-parent-watch", daemon=True).start()


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def split_address(args: list[str], ray: bool, usage: str) -> tuple[str | None, str]:
    """(Ray address, the other positional argument) from the CLI's `[ADDRESS] X` arguments. The address is the one
    that looks like an address (auto, local, ray://..., host:port) and is not an existing path, else the first, so
    `--ray auto X` and `X --ray auto` both work. InputError(usage) for anything but X, or ADDRESS X with --ray."""
    if not args or len(args) > 2 or (len(args) == 2 and not ray):
        raise InputError(usage)
    if len(args) == 1:
        return None, args[0]

    def looks(a: str) -> bool:
        return (a in ("auto", "local") or a.startswith("ray://") or bool(re.fullmatch(r"[\w.\-]+:\d+", a))) \
            and not os.path.exists(a)

    first, second = args
    if looks(second) and not looks(first):
        return second, first
    return first, second


class Runner:
    """Workers for one or more maps: `workers` local processes (1: this process, inline), or Ray tasks.

    Use as a context manager; maps may nest (a map started while another is being consumed shares the workers).
    """

    def __init__(self, workers: int | None = None, ray: bool = False, address: str | None = None) -> None:
        self.workers = workers
        self.use_ray = ray
        self.address = address
        self._pool: ProcessPoolExecutor | None = None
        self._ray: Any = None
        self._task: Any = None
        self._started_ray = False

    # ---- lifetime ------------------------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        if self.use_ray:
            self._start_ray()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False

    @property
    def parallel(self) -> int:
        """How many items run at once."""
        if self.use_ray:
            if self._ray is None:
                self._start_ray()
            return max(1, self.workers or int(self._ray.cluster_resources().get("CPU", 1)))
        return max(1, self.workers or default_workers())

    def _start_ray(self) -> None:
        if self._ray is not None:
            return
        try:
            import ray
        except ImportError:
            raise InputError(f"--ray needs Ray: pip install '{RAY_PIN}'") from None
        if not ray.is_initialized():
            target = None if self.address in (None, "", "local") else self.address
            try:
                ray.init(address=target, log_to_driver=False, include_dashboard=False, logging_level=logging.ERROR,
                         **({"num_cpus": self.workers} if target is None and self.workers else {}))
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise InputError(f"cannot start or reach Ray at {self.address or 'a local instance'}: {first}"
                                 ) from None
            self._started_ray = True
        self._ray = ray
        self._task = ray.remote(num_cpus=1, max_retries=2)(call)

    # ---- maps ----------------------------------------------------------------------------------------------
    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Outcome]:
        """Yield an Outcome per item, in input order. Items still queued when the consumer stops are cancelled."""
        items = list(items)
        if self.use_ray:
            return self._map_ray(fn, items)
        n = self.parallel
        if n <= 1 or len(items) <= 1:
            return self._map_inline(fn, items)
        return self._map_pool(fn, items, n)

    @staticmethod
    def _map_inline(fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Outcome]:
        for i, item in enumerate(items):
            value, error = call(fn, item)
            yield Outcome(i, item, value, error)

    def _submit(self, fn: Callable[[Any], Any], item: Any, n: int) -> Future | None:
        for _attempt in range(2):
            if self._pool is None:
                # spawn, not fork: the parent may hold threads (HTTP pools) that a forked child would inherit
                # mid-lock
                self._pool = ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn"),
                                                 initializer=_watch_parent, initargs=(os.getpid(),))
            try:
                return self._pool.submit(call, fn, item)
            except BrokenProcessPool:  # a worker died earlier: later items get a fresh pool
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        return None

    def _map_pool(self, fn: Callable[[Any], Any], items: list[Any], n: int) -> Iterator[Outcome]:
        pending: deque[tuple[int, Future | None]] = deque()
        todo = iter(enumerate(items))
        try:
            for i, item in todo:
                pending.append((i, self._submit(fn, item, n)))
                if len(pending) >= 2 * n:
                    break
            while pending:
                i, fut = pending.popleft()
                try:
                    if fut is None:
                        raise BrokenProcessPool
                    value, error = fut.result()
                except BrokenProcessPool:  # a worker died (killed, out of memory): its items fail, not the run
                    value, error = None, "a worker process died while working on this item"
                yield Outcome(i, items[i], value, error)
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt[0], self._submit(fn, nxt[1], n)))
        finally:
            for _i, fut in pending:
                if fut is not None:
                    fut.cancel()

    def _map_ray(self, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Outcome]:
        self._start_ray()
        ray, task = self._ray, self._task
        limit = 2 * self.parallel
        pending: deque[tuple[int, Any]] = deque()
        todo = iter(enumerate(items))
        try:
            for i, item in todo:
                pending.append((i, task.remote(fn, item)))
                if len(pending) >= limit:
                    break
            while pending:
                i, ref = pending.popleft()
                try:
                    value, error = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a lost worker or node: report it for this item only
                    value, error = None, f"Ray task failed: {type(exc).__name__}"
                yield Outcome(i, items[i], value, error)
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt[0], task.remote(fn, nxt[1])))
        finally:
            for _i, ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001,S110 - best effort: a finished task cannot be cancelled
                    pass


def run(fn: Callable[[Any], Any], items: Iterable[Any], workers: int | None = None, ray: bool = False,
        address: str | None = None) -> Iterator[Outcome]:
    """Yield an Outcome per item, in input order (one map on a Runner of its own)."""
    with Runner(workers, ray, address) as runner:
        yield from runner.map(fn, items)
