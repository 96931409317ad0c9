"""Run independent work items in local processes or as Ray tasks, with the same results either way.

A work item is `fn(item)` for a module-level `fn` (so it pickles by reference): it must be a pure function of its
item. Failures stay per item: the library's one-line errors come back as `Outcome.error`, other exceptions as an
"internal error" line, so one bad model does not end a scan of thousands. Results stream back in input order with a
bounded number in flight, so memory stays bounded however many items there are.

Ray (`pip install 'ray==2.60.0'`) is imported only when asked for. `address=None` or "local" starts a private local
instance (or reuses one this process already started); "auto" joins the cluster this machine belongs to;
"ray://HOST:10001" connects through the Ray client to a remote head. Every node needs modeltrace installed (same
version) and must be able to open the items (shared storage or hf:// specs).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from modeltrace.errors import InputError, ModelTraceError

RAY_PIN = "ray==2.60.0"


@dataclass
class Outcome:
    index: int
    item: Any
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


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


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def run(fn: Callable[[Any], Any], items: Iterable[Any], workers: int | None = None, ray: bool = False,
        address: str | None = None) -> Iterator[Outcome]:
    """Yield an Outcome per item, in input order."""
    items = list(items)
    if ray:
        yield from _run_ray(fn, items, workers, address)
        return
    n = workers or default_workers()
    if n <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            value, error = call(fn, item)
            yield Outcome(i, item, value, error)
        return
    # spawn, not fork: the parent may hold threads (HTTP pools) that a forked child would inherit mid-lock
    with ProcessPoolExecutor(max_workers=min(n, len(items)), mp_context=get_context("spawn")) as pool:
        pending: deque[tuple[int, Future | None]] = deque()
        todo = iter(enumerate(items))

        def submit(i: int, item: Any) -> None:
            try:
                pending.append((i, pool.submit(call, fn, item)))
            except BrokenProcessPool:
                pending.append((i, None))

        for i, item in todo:
            submit(i, item)
            if len(pending) >= 2 * n:
                break
        while pending:
            i, fut = pending.popleft()
            try:
                if fut is None:
                    raise BrokenProcessPool
                value, error = fut.result()
            except BrokenProcessPool:  # a worker died (killed, out of memory): its items fail, not the run
                value, error = None, "a worker process died while reading this model"
            yield Outcome(i, items[i], value, error)
            nxt = next(todo, None)
            if nxt is not None:
                submit(*nxt)


def _run_ray(fn: Callable[[Any], Any], items: list[Any], workers: int | None, address: str | None
             ) -> Iterator[Outcome]:
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray: pip install '{RAY_PIN}'") from None
    started = False
    if not ray.is_initialized():
        target = None if address in (None, "", "local") else address
        try:
            ray.init(address=target, log_to_driver=False, include_dashboard=False, logging_level=logging.ERROR,
                     **({"num_cpus": workers} if target is None and workers else {}))
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"cannot start or reach Ray at {address or 'a local instance'}: {first}") from None
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(call)
        limit = 2 * max(1, workers or int(ray.cluster_resources().get("CPU", 1)))
        pending: deque[tuple[int, Any]] = deque()
        todo = iter(enumerate(items))
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
        if started:
            ray.shutdown()
