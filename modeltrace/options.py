"""How a library call reads models: one frozen options object per kind of call, instead of parameter chains.

`ReadOptions` (inspect, identify, index): the restricted pickle reader and the limits on remote reads.
`AuditOptions` (audit): those plus sampling, chunk size, where the streaming pass runs, the byte budget, full hashes
and the recipe replay. `ProbeOptions` (probes): how a local model or an OpenAI-compatible endpoint is asked.
The command line fills the same objects from its flags (modeltrace/cli.py), so a flag and an option mean one thing.

Remote limits apply to one call only (`remote_limits`): they are set for its duration, including in the worker
processes it starts, and the previous settings are restored after it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from modeltrace.errors import InputError

__all__ = ["DEFAULT_AUDIT_CHUNK", "AuditOptions", "ProbeOptions", "ReadOptions", "remote_limits"]

#: Bytes of each model held per streaming step of the audit (modeltrace/audit.py's default, repeated here so that
#: building options imports nothing heavy; tests/test_api.py checks they agree).
DEFAULT_AUDIT_CHUNK = 4 * 1024 * 1024

_LIMIT_ENV = ("MODELTRACE_TIMEOUT", "MODELTRACE_CONNECTIONS", "MODELTRACE_BUDGET", "MODELTRACE_DEADLINE")


@dataclass(frozen=True)
class ReadOptions:
    """How models are opened and read.

    allow_pickle: read PyTorch .bin pickles with the restricted loader that never runs code (refused otherwise).
    timeout: seconds the call may spend reading remote (hf://) models (default: $MODELTRACE_TIMEOUT, else none).
    connections: remote requests in flight at once (default: $MODELTRACE_CONNECTIONS, else 16).
    """

    allow_pickle: bool = False
    timeout: float | None = None
    connections: int | None = None


@dataclass(frozen=True)
class AuditOptions(ReadOptions):
    """How an audit streams the weights (every field has the meaning of the `modeltrace audit` flag of that name).

    sample: read only this fraction of rows per tensor (0 < sample <= 1; None: every row).
    chunk_bytes: bytes of each model held per streaming step.
    workers: stream in this many local processes (None or 1: threads in this process).
    ray: stream as Ray tasks; address: the Ray cluster (None: a private local instance, "auto", "ray://HOST:PORT").
    budget: bytes the audit may fetch from remote models (an int or "4G"); without `sample`, the fraction of rows
      read is chosen to fit.
    hashes: evidence hashes every local weight file in full (default: the suspect in full, the others sampled).
    verify: replay the recovered recipe with modeltrace's own merge code and measure how closely it reproduces the
      suspect (`AuditResult.replay`).
    """

    sample: float | None = None
    chunk_bytes: int = DEFAULT_AUDIT_CHUNK
    workers: int | None = None
    ray: bool = False
    address: str | None = None
    budget: int | str | None = None
    hashes: bool = False
    verify: bool = False

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise InputError("chunk_bytes must be a positive number of bytes")
        if self.workers is not None and self.workers < 1:
            raise InputError("--workers must be at least 1")
        if self.address is not None and not self.ray:
            raise InputError("a Ray address goes with ray=True (--ray)")

    def budget_bytes(self) -> int | None:
        """The byte budget as a number (a string like "4G" parsed; a bad one is one InputError)."""
        if self.budget is None or isinstance(self.budget, int):
            return self.budget
        from modeltrace.sources.remote import parse_bytes

        return parse_bytes(self.budget)


@dataclass(frozen=True)
class ProbeOptions:
    """How a probe asks a model: a local folder (transformers, on `device`) or a model served at `endpoint`
    (OpenAI-compatible; its key read from the environment variable `api_key_env`, never stored).

    concurrency, timeout, retries, budget: endpoint requests in flight, seconds per response, retries per request
    and the most HTTP requests in all (None: twice the planned requests). max_tokens, temperature, top_p, seed:
    sampling (temperature and top_p None: the model's own settings).
    """

    endpoint: str | None = None
    api_key_env: str | None = None
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 4
    budget: int | None = None
    device: str = "auto"
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0


@contextmanager
def remote_limits(options: ReadOptions, budget: int | None = None) -> Iterator[None]:
    """Apply `options`' remote limits (and a byte budget) for the duration of one call, then restore the previous
    settings. The limits live in the environment so that worker processes started meanwhile share them."""
    saved = {k: os.environ.get(k) for k in _LIMIT_ENV}
    if (options.timeout is None and options.connections is None and budget is None
            and not any(saved.values()) and "modeltrace.sources.remote" not in sys.modules):
        yield  # nothing to set, and no remote read has run in this process: no state to reset either
        return
    from modeltrace.sources.remote import configure

    try:
        configure(timeout=options.timeout, connections=options.connections, budget=budget)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
