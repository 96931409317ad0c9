"""One pinned, checked, time-boxed HTTP Range read, and the per-run limits every remote read shares.

Data flow: HubStore (hub.py) or the read planner (planner.py) asks `PinnedFiles.fetch(name, offset, length)` ->
the run's limits are checked (time left, bytes left) -> at most `connections` requests are in flight per process
-> one `GET` with `Range` on the commit-pinned URL -> every answer is compared with what the listing promised
(`X-Repo-Commit`, the file's ETag: the LFS SHA-256 or git blob id, its total size from `Content-Range`) -> the body
is read under a deadline that covers the whole request, so a server that trickles bytes cannot stretch it ->
retries with exponential back-off on connection errors, timeouts and 408/429/5xx, never past the run's deadline.

A file that answers with another ETag, commit or size than the listing gave changed while being read: that is a
one-line RemoteError naming the file, never data.

Limits (CLI options set them for a command through `configure`, which also passes them to worker processes through
the environment):
    --timeout / MODELTRACE_TIMEOUT          seconds for the whole run's remote reading (default: none)
    --connections / MODELTRACE_CONNECTIONS  requests in flight per process (default 16)
    --budget / MODELTRACE_BUDGET            bytes a run may fetch per process (default: none)
    MODELTRACE_HTTP_TIMEOUT                 `READ` or `CONNECT,READ` seconds (default 10,30): the longest silence
                                            accepted; a whole request must end within READ + 1 s per MiB asked
    MODELTRACE_HTTP_RETRIES                 attempts per request (default 3)
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx2
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import get_session

from modeltrace.errors import InputError, RemoteError
from modeltrace.sources.base import ReadStats

__all__ = ["RemoteSettings", "PinnedFiles", "configure", "settings", "spent_bytes", "reset_run", "status_error",
           "describe_exc", "sleep_before_retry", "run_deadline_left", "parse_bytes", "read_counts", "RETRY_STATUS",
           "RETRY_EXCEPTIONS"]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_TRIES = 3
DEFAULT_CONNECTIONS = 16
#: Every request may take READ timeout + its length at this rate (1 MiB/s: a crawling link, not a trickle).
MIN_RATE = 1024 * 1024
#: First back-off wait in seconds; doubles after each failed attempt (capped at MAX_BACKOFF).
BACKOFF_BASE = 0.5
MAX_BACKOFF = 8.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_EXCEPTIONS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
#: A server that answers a Range request with the whole file (200) is read only up to this many bytes.
MAX_UNRANGED_PREFIX = 8 * 1024 * 1024
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class RemoteSettings:
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    tries: int = DEFAULT_TRIES
    connections: int = DEFAULT_CONNECTIONS
    timeout: float | None = None  # the run's time budget in seconds (for messages)
    deadline: float | None = None  # wall-clock time (time.time()) by which remote reading must be done
    budget: int | None = None  # bytes

    def request_limit(self, length: int) -> float:
        """Seconds one request of `length` bytes may take in all."""
        return self.read_timeout + length / MIN_RATE


_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """`4G`, `500MB`, `1.5GiB`, `4e9` or `123` -> bytes; InputError otherwise."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text or "")
    unit = m.group(2).upper() if m else ""
    try:
        value = float(m.group(1)) * _UNITS[unit] if m else -1.0
    except (KeyError, ValueError):
        value = -1.0
    if not value >= 1:
        raise InputError(f"--budget {text!r}: expected a number of bytes, e.g. 4G, 500MB or 4e9")
    return int(value)


def _env_float(var: str, what: str) -> float | None:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"{var}={raw!r}: expected {what}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise InputError(f"{var}={raw!r}: expected {what}")
    return value


def settings() -> RemoteSettings:
    """The limits in force now, from the environment (which `configure` fills)."""
    raw = os.environ.get("MODELTRACE_HTTP_TIMEOUT", "").strip()
    connect, read = DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT
    if raw:
        try:
            parts = [float(p) for p in raw.split(",")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2) or any(not p > 0 for p in parts):
            raise InputError(f"MODELTRACE_HTTP_TIMEOUT={raw!r}: expected seconds, e.g. 30 or 10,30")
        connect, read = (min(parts[0], DEFAULT_CONNECT_TIMEOUT), parts[0]) if len(parts) == 1 else parts
    raw = os.environ.get("MODELTRACE_HTTP_RETRIES", "").strip()
    tries = DEFAULT_TRIES
    if raw:
        try:
            tries = max(1, int(raw))
        except ValueError:
            raise InputError(f"MODELTRACE_HTTP_RETRIES={raw!r}: expected a whole number of attempts") from None
    conns = _env_float("MODELTRACE_CONNECTIONS", "a whole number of connections, e.g. 16")
    if conns is not None and conns != int(conns):
        raw = os.environ.get("MODELTRACE_CONNECTIONS", "").strip()
        raise InputError(f"MODELTRACE_CONNECTIONS={raw!r}: expected a whole number of connections, e.g. 16")
    budget = _env_float("MODELTRACE_BUDGET", "a number of bytes, e.g. 4e9")
    timeout = _env_float("MODELTRACE_TIMEOUT", "seconds, e.g. 600")
    deadline = _env_float("MODELTRACE_DEADLINE", "a time")
    if timeout is not None and deadline is None:
        deadline = _start_time() + timeout
    return RemoteSettings(connect, read, tries, int(conns or DEFAULT_CONNECTIONS), timeout, deadline,
                          None if budget is None else int(budget))


_START: float | None = None
_LOCK = threading.Lock()
_SPENT = [0]  # bytes fetched by this process in this run
_READS = [0, 0]  # ranged requests answered and their bytes, in this process since it started (progress displays)
_GATE: tuple[int, threading.BoundedSemaphore] | None = None


def _start_time() -> float:
    global _START
    with _LOCK:
        if _START is None:
            _START = time.time()
        return _START


def configure(timeout: float | None = None, connections: int | None = None, budget: int | None = None) -> None:
    """Set a command's limits: its time budget starts now. Written to the environment, so worker processes started
    by this one (local or Ray tasks started from here) keep the same deadline, connections and budget."""
    if timeout is not None:
        if not timeout > 0:
            raise InputError("--timeout must be a positive number of seconds")
        os.environ["MODELTRACE_TIMEOUT"] = repr(float(timeout))
    if connections is not None:
        if connections < 1:
            raise InputError("--connections must be at least 1")
        os.environ["MODELTRACE_CONNECTIONS"] = str(int(connections))
    if budget is not None:
        if budget < 1:
            raise InputError("--budget must be a positive number of bytes")
        os.environ["MODELTRACE_BUDGET"] = str(int(budget))
    reset_run()
    limit = _env_float("MODELTRACE_TIMEOUT", "seconds, e.g. 600")
    if limit is not None:
        os.environ["MODELTRACE_DEADLINE"] = repr(time.time() + limit)
    settings()  # bad values in the environment fail here, before any work


def reset_run() -> None:
    """Start a new run: no bytes spent, the time budget (if any) counted from now (tests; `configure`)."""
    global _START
    with _LOCK:
        _START = None
        _SPENT[0] = 0
    os.environ.pop("MODELTRACE_DEADLINE", None)


def spent_bytes() -> int:
    return _SPENT[0]


def read_counts() -> tuple[int, int]:
    """(requests, bytes) of remote reads answered in this process so far, for progress displays."""
    return _READS[0], _READS[1]


def run_deadline_left(cfg: RemoteSettings) -> float | None:
    return None if cfg.deadline is None else cfg.deadline - time.time()


def _gate(n: int) -> threading.BoundedSemaphore:
    """One semaphore per process bounds the requests in flight, across every open remote model."""
    global _GATE
    with _LOCK:
        if _GATE is None or _GATE[0] != n:
            _GATE = (n, threading.BoundedSemaphore(n))
        return _GATE[1]


def describe_exc(exc: BaseException) -> str:
    if isinstance(exc, httpx2.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, httpx2.TimeoutException):
        return "no answer before the timeout"
    if isinstance(exc, httpx2.ConnectError):
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        if "name" in text or "resolve" in text or "nodename" in text:
            return "host name not found"
        return "cannot connect"
    if isinstance(exc, httpx2.RemoteProtocolError):
        return "server closed the connection or spoke invalid HTTP"
    if isinstance(exc, httpx2.NetworkError):
        return "network error"
    return type(exc).__name__


class _TooSlow(Exception):
    """A request ran past its own deadline (retried like a timeout)."""


def sleep_before_retry(attempt: int, retry_after: str | None, cfg: RemoteSettings, fail: Callable[[], Exception]
                       ) -> None:
    """Back off before the next attempt; raise `fail()` instead when the wait would run past the run's deadline."""
    wait = min(MAX_BACKOFF, BACKOFF_BASE * (2**attempt))
    if retry_after:
        try:
            wait = min(MAX_BACKOFF * 4, max(wait, float(retry_after)))
        except ValueError:
            pass
    left = run_deadline_left(cfg)
    if left is not None and wait >= left:
        raise fail()
    time.sleep(wait)


def status_error(location: str, endpoint: str, revision: str, status: int, error_code: str | None, what: str
                 ) -> RemoteError:
    at = f"({status}) at {endpoint}"
    if error_code == "RepoNotFound":
        return RemoteError(f"{location}: repository not found {at}")
    if error_code == "RevisionNotFound":
        return RemoteError(f"{location}: revision {revision!r} not found {at}")
    if error_code == "EntryNotFound" or status == 404:
        return RemoteError(f"{location}: {what}: not found {at}")
    if error_code == "GatedRepo":
        return RemoteError(f"{location}: gated repository; accept its terms and set HF_TOKEN {at}")
    if status in (401, 403):
        return RemoteError(f"{location}: {what}: access denied {at}; if the repository is private, set HF_TOKEN")
    if status == 429:
        return RemoteError(f"{location}: {what}: rate limited {at}; retry later or set HF_TOKEN")
    return RemoteError(f"{location}: {what}: HTTP error {at}")


def _etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


class PinnedFiles:
    """The files of one repository at one commit, read by Range with every answer checked against the listing."""

    def __init__(self, location: str, endpoint: str, revision: str, commit: str, url: Callable[[str], str],
                 headers: Mapping[str, str], sizes: Mapping[str, int | None], etags: Mapping[str, str],
                 stats: ReadStats) -> None:
        self.location = location
        self.endpoint = endpoint
        self.revision = revision
        self.commit = commit
        self.url = url
        self.headers = dict(headers)  # holds the token (if any): never logged or put into messages
        self.sizes = sizes
        self._etags = dict(etags)  # file -> the ETag every answer must carry (LFS SHA-256 or git blob id)
        self._seen: dict[str, str] = {}  # files the listing gave no ETag for: the first answer's
        self._lock = threading.Lock()
        self.stats = stats

    # ---- checks --------------------------------------------------------------------------------------------
    def _changed(self, name: str, why: str) -> RemoteError:
        return RemoteError(f"{self.location}: {name} changed while being read ({why}); re-run")

    def check(self, name: str, r: httpx2.Response) -> None:
        """Compare one answer with the listing: commit, ETag, total size. Redirects: the Hub's own answer (the
        first hop) carries the commit and `X-Linked-Etag`; a CDN's ETag after a redirect is its own and is skipped."""
        hops = [*r.history, r]
        hub = hops[0]
        commit = hub.headers.get("X-Repo-Commit")
        if commit and commit.strip() != self.commit:
            raise self._changed(name, f"served from commit {commit.strip()[:12]}, pinned {self.commit[:12]}")
        tag = None
        for h in hops:
            tag = tag or _etag(h.headers.get("X-Linked-Etag"))
        if tag is None and len(hops) == 1:
            tag = _etag(hub.headers.get("ETag"))
        if tag is not None:
            with self._lock:
                want = self._etags.get(name) or self._seen.setdefault(name, tag)
            if tag != want:
                raise self._changed(name, f"ETag {tag[:16]}, expected {want[:16]}")
        size = self.sizes.get(name)
        cr = _CONTENT_RANGE_RE.match(r.headers.get("Content-Range", "").strip())
        total = cr.group(3) if cr else None
        if r.status_code == 200:
            total = r.headers.get("Content-Length")
            total = total.strip() if total and total.strip().isdigit() else None
        if size is not None and total not in (None, "*") and int(total) != size:
            raise self._changed(name, f"{total} bytes, the listing said {size}")

    # ---- one read ------------------------------------------------------------------------------------------
    def fetch(self, name: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes of `name` at `offset`, checked; RemoteError/InputError in one line otherwise."""
        cfg = settings()
        end = offset + length - 1
        what = f"{name} bytes {offset}-{end}"
        if cfg.budget is not None:
            with _LOCK:
                if _SPENT[0] + length > cfg.budget:
                    raise RemoteError(f"{self.location}: reading {what} would pass the byte budget of {cfg.budget} "
                                      f"(--budget; {_SPENT[0]} read so far); raise it or read less (--sample)")
                _SPENT[0] += length
        headers = {**self.headers, "Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}

        def out_of_time() -> RemoteError:
            return RemoteError(f"{self.location}: the run's time budget ({cfg.timeout:g} s, --timeout) ran out "
                               f"while reading {what}")

        gate = _gate(cfg.connections)
        for attempt in range(cfg.tries):
            retry_after: str | None = None
            left = run_deadline_left(cfg)
            if left is not None and left <= 0:
                raise out_of_time()
            limit = cfg.request_limit(length) if left is None else min(cfg.request_limit(length), left)
            if not gate.acquire(timeout=left if left is not None else None):
                raise out_of_time()
            t0 = time.monotonic()
            try:
                timeout = httpx2.Timeout(min(cfg.read_timeout, limit), connect=min(cfg.connect_timeout, limit))
                with get_session().stream("GET", self.url(name), headers=headers, timeout=timeout) as r:
                    if r.status_code in RETRY_STATUS and attempt + 1 < cfg.tries:
                        retry_after = r.headers.get("Retry-After")
                    elif r.status_code in (200, 206):
                        self.check(name, r)
                        data = self._body(r, name, offset, length, t0 + limit)
                        self.stats.add(name, offset, length)
                        with _LOCK:
                            _READS[0] += 1
                            _READS[1] += length
                        self.stats.digest(name, offset, data)
                        return data
                    elif r.status_code == 416:
                        raise InputError(f"{self.location}: {name} is truncated (wanted bytes up to {end + 1})")
                    else:
                        raise status_error(self.location, self.endpoint, self.revision, r.status_code,
                                           r.headers.get("X-Error-Code"), name)
            except OfflineModeIsEnabled:
                raise RemoteError(f"{self.location}: HF_HUB_OFFLINE is set; cannot read {name}") from None
            except (*RETRY_EXCEPTIONS, _TooSlow) as exc:
                if run_deadline_left(cfg) is not None and run_deadline_left(cfg) <= 0:  # type: ignore[operator]
                    raise out_of_time() from None
                if attempt + 1 >= cfg.tries:
                    if isinstance(exc, _TooSlow):
                        raise RemoteError(f"{self.location}: reading {what}: {self.endpoint} sent too slowly (no "
                                          f"complete answer within {limit:.3g} s, {cfg.tries} attempts)") from None
                    raise RemoteError(f"{self.location}: reading {what}: cannot reach {self.endpoint} "
                                      f"({describe_exc(exc)})") from None
            except httpx2.HTTPError as exc:
                raise RemoteError(f"{self.location}: reading {what}: {type(exc).__name__}") from None
            finally:
                gate.release()
            sleep_before_retry(attempt, retry_after, cfg, out_of_time)
        raise RemoteError(f"{self.location}: reading {what}: no answer after {cfg.tries} attempts")

    def _body(self, r: httpx2.Response, name: str, offset: int, length: int, deadline: float) -> bytes:
        end = offset + length - 1
        skip = 0
        if r.status_code == 206:
            cr = _CONTENT_RANGE_RE.match(r.headers.get("Content-Range", "").strip())
            if cr is None:
                raise RemoteError(f"{self.location}: {name}: 206 answer without a valid Content-Range from "
                                  f"{self.endpoint}")
            got_start, got_end = int(cr.group(1)), int(cr.group(2))
            if got_start != offset or got_end > end:
                raise RemoteError(f"{self.location}: {name}: asked for bytes {offset}-{end}, server sent "
                                  f"{got_start}-{got_end}")
            if got_end < end:
                raise InputError(f"{self.location}: {name} is truncated (wanted bytes up to {end + 1})")
        else:  # 200: the server ignored Range and sends the whole file; read only a small prefix
            if end + 1 > MAX_UNRANGED_PREFIX:
                raise RemoteError(f"{self.location}: {self.endpoint} ignored the Range request for {name} (HTTP 200, "
                                  "whole file); refusing to download the whole file")
            skip = offset
        want = skip + length
        buf = bytearray()
        for chunk in r.iter_bytes():  # each piece as it arrives, so the deadline is checked even for a trickle
            buf += chunk[:want - len(buf)]
            if len(buf) >= want:
                break  # leaving the `with` closes the connection; the rest is never read
            if time.monotonic() > deadline:
                raise _TooSlow()
        if len(buf) < want:
            raise RemoteError(f"{self.location}: {name}: the server sent {max(0, len(buf) - skip)} of {length} bytes")
        return bytes(buf[skip:want])
