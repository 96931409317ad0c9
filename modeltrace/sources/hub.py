"""Hugging Face Hub repositories (`hf://owner/name[@revision]`) read lazily with HTTP Range requests.

Only the bytes asked for are fetched: the file listing comes from the Hub API (one request), safetensors headers from
one ranged read per weight file (length prefix and header together, all shards at once; `read_ahead`), GGUF headers
by gguf_remote.py, and tensor rows from ranged reads. Header reads and
small metadata files are cached on disk per commit, so a second open of the same revision makes no header requests.
The revision is resolved once, by the listing, to a commit; every read is pinned to it and every answer is checked
against the listing (commit, ETag = LFS SHA-256 or git blob id, size) by `remote.PinnedFiles`, which also holds the
per-request deadline, the run's time and byte budgets and the retry policy. Reads a caller announces with
`prefetch` are coalesced and fetched many at a time (`planner.Prefetcher`). A server that ignores `Range` is never
read whole.

huggingface_hub supplies the endpoint, token, offline switch, resolve URLs and its HTTP session, so `HF_ENDPOINT`,
`HF_TOKEN` and `HF_HUB_OFFLINE` behave as they do for the library. `HF_ENDPOINT` and `HF_HUB_OFFLINE` are also read
at call time (the library reads them once, at import).

Environment: the limits in remote.py, and
    MODELTRACE_CACHE         cache root (default ~/.cache/modeltrace); headers live under `headers/`

Addresses, endpoint, offline switch and cache location are hub_spec.py's; this module is the store that reads.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session

import modeltrace.sources.remote as remote
from modeltrace.errors import InputError, RemoteError
from modeltrace.sources.base import FileInfo, ReadStats, Source
from modeltrace.sources.bytestore import ByteStore
from modeltrace.sources.hub_spec import (
    DEFAULT_REVISION,
    _endpoint,
    _offline,
    _version,
    _write_atomic,
    cache_root,
    parse_spec_file,
)
from modeltrace.sources.hub_spec import parse_spec as parse_spec
from modeltrace.sources.planner import Prefetcher
from modeltrace.sources.remote import RETRY_EXCEPTIONS, RETRY_STATUS, describe_exc, status_error

__all__ = ["HubStore", "open_hub", "parse_spec", "parse_spec_file", "cache_root", "sample_for_budget"]

#: Cached on disk per commit: safetensors header reads (the 8-byte length prefix at offset 0, the JSON header at
#: offset 8) and whole small metadata files (config, tokenizer, card, index), all read from offset 0. Weight data,
#: including the 8 MB chunks `file_sha256` streams from offset 0, is never cached.
MAX_CACHED_READ = 100 * 1024 * 1024
MAX_CACHED_PREFIX = 64 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx")

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_HEX_RE = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
T = TypeVar("T")


def _time_boxed(fn: Callable[[], T], limit: float, on_timeout: Callable[[], Exception]) -> T:
    """Run `fn` on a daemon thread and give up after `limit` seconds (a listing a server trickles cannot hang the
    run; the abandoned thread ends with its read timeout and never blocks the exit)."""
    box: list = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box.append((False, exc))

    t = threading.Thread(target=run, daemon=True, name="modeltrace-listing")
    t.start()
    t.join(limit)
    if not box:
        raise on_timeout()
    ok, value = box[0]
    if not ok:
        raise value
    return value


class HubStore(ByteStore):
    """The files of one Hub repository at one commit, read with checked HTTP Range requests."""

    def __init__(self, repo_id: str, revision: str = DEFAULT_REVISION, stats: ReadStats | None = None) -> None:
        super().__init__(stats or ReadStats())
        self.repo_id = repo_id
        self.revision = revision
        self.endpoint = _endpoint()
        self.location = f"hf://{repo_id}" + ("" if revision == DEFAULT_REVISION else f"@{revision}")
        self.cfg = remote.settings()
        self.parallel = self.cfg.connections
        self.cache_hits = 0
        if _offline():
            raise RemoteError(f"{self.location}: HF_HUB_OFFLINE is set; cannot read a Hub repository offline")
        # Built once; holds the token (if any). Never logged or put into messages.
        self._headers = build_hf_headers(library_name="modeltrace", library_version=_version())
        self.sha: str | None = None
        self._files: dict[str, int | None] = {}
        self.lfs_sha256: dict[str, str] = {}
        self._blob_ids: dict[str, str] = {}
        self._list()
        etags = {**self._blob_ids, **self.lfs_sha256}
        self.pinned = remote.PinnedFiles(self.location, self.endpoint, revision, self.sha or "", self.url,
                                         self._headers, self._files, etags, self.stats)
        self.prefetcher = Prefetcher(self._fetch, self.cfg.connections)
        self._ahead: dict[tuple[str, int], bytes] = {}  # (file, offset) -> bytes read ahead by `read_ahead`
        self._ahead_lock = threading.Lock()

    @property  # type: ignore[override]
    def stats(self) -> ReadStats:
        return self._stats

    @stats.setter
    def stats(self, value: ReadStats) -> None:  # SafetensorsSource hands its own ReadStats to the store
        self._stats = value
        if getattr(self, "pinned", None) is not None:
            self.pinned.stats = value

    # ---- listing -------------------------------------------------------------------------------------------
    def _list(self) -> None:
        api = HfApi(endpoint=self.endpoint)
        cfg = self.cfg
        info = None

        def out_of_time() -> RemoteError:
            return RemoteError(f"{self.location}: the run's time budget ({cfg.timeout:g} s, --timeout) ran out "
                               "while listing files")

        for attempt in range(cfg.tries):
            left = remote.run_deadline_left(cfg)
            if left is not None and left <= 0:
                raise out_of_time()
            limit = cfg.request_limit(1 << 20) if left is None else min(cfg.request_limit(1 << 20), left)
            timeout = httpx2.Timeout(min(cfg.read_timeout, limit), connect=min(cfg.connect_timeout, limit))

            def slow() -> Exception:
                return httpx2.ReadTimeout("listing took too long")

            try:
                info = _time_boxed(lambda t=timeout: api.model_info(  # type: ignore[misc]
                    self.repo_id, revision=self.revision, files_metadata=True, timeout=t), limit, slow)
                break
            except OfflineModeIsEnabled:
                raise RemoteError(
                    f"{self.location}: HF_HUB_OFFLINE is set; cannot read a Hub repository offline"
                ) from None
            except (RevisionNotFoundError, GatedRepoError, RepositoryNotFoundError, DisabledRepoError) as exc:
                raise self._api_error(exc) from None
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status not in RETRY_STATUS or attempt + 1 >= cfg.tries:
                    raise self._status_error(status, None, "listing files") from None
                resp = exc.response
                remote.sleep_before_retry(attempt, resp.headers.get("Retry-After") if resp is not None else None,
                                          cfg, out_of_time)
            except RETRY_EXCEPTIONS as exc:
                if attempt + 1 >= cfg.tries:
                    raise self._network_error(exc) from None
                remote.sleep_before_retry(attempt, None, cfg, out_of_time)
            except (httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
                raise RemoteError(
                    f"{self.location}: unexpected answer from {self.endpoint} while listing files "
                    f"({type(exc).__name__})"
                ) from None
        assert info is not None
        self.sha = info.sha if isinstance(info.sha, str) and _SHA_RE.match(info.sha) else None
        if self.sha is None:
            if not _SHA_RE.match(self.revision):
                raise RemoteError(f"{self.location}: {self.endpoint} did not resolve revision {self.revision!r} to "
                                  "a commit; refusing to read files that could change under us")
            self.sha = self.revision
        for s in info.siblings or []:
            self._files[s.rfilename] = s.size if isinstance(s.size, int) and s.size >= 0 else None
            lfs = getattr(s, "lfs", None)
            lfs_sha = getattr(lfs, "sha256", None)
            if isinstance(lfs_sha, str) and re.fullmatch(r"[0-9a-f]{64}", lfs_sha):
                self.lfs_sha256[s.rfilename] = lfs_sha  # the Hub's own content hash: file evidence for free
                lfs_size = getattr(lfs, "size", None)
                if isinstance(lfs_size, int) and lfs_size >= 0:
                    self._files[s.rfilename] = lfs_size
            blob = getattr(s, "blob_id", None)
            if isinstance(blob, str) and _HEX_RE.match(blob):
                self._blob_ids[s.rfilename] = blob

    def _api_error(self, exc: HfHubHTTPError) -> RemoteError:
        status = exc.response.status_code if exc.response is not None else 0
        at = f"({status}) at {self.endpoint}"
        if isinstance(exc, RevisionNotFoundError):
            return RemoteError(f"{self.location}: revision {self.revision!r} not found {at}")
        if isinstance(exc, GatedRepoError):
            return RemoteError(f"{self.location}: gated repository; accept its terms and set HF_TOKEN {at}")
        if isinstance(exc, DisabledRepoError):
            return RemoteError(f"{self.location}: repository is disabled {at}")
        if status == 401 or status == 403:
            return RemoteError(
                f"{self.location}: repository not found or not accessible ({status}) at {self.endpoint}; "
                "if it is private or gated, set HF_TOKEN"
            )
        return RemoteError(f"{self.location}: repository not found {at}")

    def _status_error(self, status: int, error_code: str | None, what: str) -> RemoteError:
        return status_error(self.location, self.endpoint, self.revision, status, error_code, what)

    def _network_error(self, exc: BaseException) -> RemoteError:
        return RemoteError(f"{self.location}: cannot reach {self.endpoint} ({describe_exc(exc)})")

    def list_files(self) -> list[FileInfo]:
        return [FileInfo(name, self.size(name)) for name in sorted(self._files)]

    def exists(self, name: str) -> bool:
        return name in self._files

    def size(self, name: str) -> int:
        if name not in self._files:
            raise InputError(f"{self.location}: missing file {name}")
        size = self._files[name]
        if size is None:
            size = self._head_size(name)
            self._files[name] = size
        return size

    def url(self, name: str) -> str:
        return hf_hub_url(self.repo_id, name, revision=self.sha or self.revision, endpoint=self.endpoint)

    def _head_size(self, name: str) -> int:
        """File size when the listing did not give one (servers without `blobs=True` metadata)."""
        headers = {**self._headers, "Accept-Encoding": "identity"}
        cfg = self.cfg

        def out_of_time() -> RemoteError:
            return RemoteError(f"{self.location}: the run's time budget ({cfg.timeout:g} s, --timeout) ran out "
                               f"while asking the size of {name}")

        for attempt in range(cfg.tries):
            left = remote.run_deadline_left(cfg)
            if left is not None and left <= 0:
                raise out_of_time()
            limit = cfg.read_timeout if left is None else min(cfg.read_timeout, left)
            timeout = httpx2.Timeout(limit, connect=min(cfg.connect_timeout, limit))
            try:
                r = get_session().head(self.url(name), headers=headers, timeout=timeout, follow_redirects=False)
            except OfflineModeIsEnabled:
                raise RemoteError(f"{self.location}: HF_HUB_OFFLINE is set") from None
            except RETRY_EXCEPTIONS as exc:
                if attempt + 1 >= cfg.tries:
                    raise self._network_error(exc) from None
                remote.sleep_before_retry(attempt, None, cfg, out_of_time)
                continue
            if r.status_code in RETRY_STATUS and attempt + 1 < cfg.tries:
                remote.sleep_before_retry(attempt, r.headers.get("Retry-After"), cfg, out_of_time)
                continue
            if r.status_code >= 400:
                raise self._status_error(r.status_code, r.headers.get("X-Error-Code"), name)
            commit = r.headers.get("X-Repo-Commit")
            if commit and self.sha and commit.strip() != self.sha:
                raise RemoteError(f"{self.location}: {name} changed while being read (served from commit "
                                  f"{commit.strip()[:12]}, pinned {self.sha[:12]}); re-run")
            for key in ("X-Linked-Size", "Content-Length"):
                value = r.headers.get(key)
                if value and value.isdigit():
                    return int(value)
            break
        raise RemoteError(f"{self.location}: {name}: the server gave no file size")

    # ---- reads ---------------------------------------------------------------------------------------------
    def read(self, name: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InputError(f"{self.location}: bad byte range {offset}+{length} in {name}")
        if length == 0:
            return b""
        size = self._files.get(name)
        if size is not None and offset + length > size:
            raise InputError(f"{self.location}: {name} is truncated (wanted bytes up to {offset + length})")
        planned = self.prefetcher.take(name, offset, length)
        if planned is not None:
            return planned
        cache = self._cache_path(name, offset, length)
        if cache is not None:
            try:
                data = cache.read_bytes()
            except OSError:
                data = None
            if data is not None and len(data) == length:
                self.cache_hits += 1
                self.stats.digest(name, offset, data)
                return data
        with self._ahead_lock:
            ahead = self._ahead.pop((name, offset), None)
        if ahead:  # the start came with an earlier request: fetch only what it lacks
            data = ahead[:length] if len(ahead) >= length else \
                ahead + self._fetch(name, offset + len(ahead), length - len(ahead))
        else:
            data = self._fetch(name, offset, length)
        if cache is not None:
            _write_atomic(cache, data)
        return data

    def read_ahead(self, name: str, offset: int, length: int, ahead: int) -> bytes:
        """`read`, and when the bytes come from the network, up to `ahead` more that follow them in the same
        request: the next `read` starting where this one ends is served from memory, once (a safetensors header
        and its length prefix in one request instead of two). Under a byte budget nothing is read on speculation."""
        cache = self._cache_path(name, offset, length)
        if ahead <= 0 or self.cfg.budget is not None or (cache is not None and cache.is_file()):
            return self.read(name, offset, length)
        total = min(length + ahead, self.size(name) - offset)
        if total <= length:
            return self.read(name, offset, length)
        data = self._fetch(name, offset, total)
        with self._ahead_lock:
            self._ahead[(name, offset + length)] = data[length:]
        if cache is not None:
            _write_atomic(cache, data[:length])
        return data[:length]

    def prefetch(self, spans: Iterable[tuple[str, int, int]]) -> None:
        """Fetch these (file, offset, length) spans ahead, coalesced, many at a time; `read` serves them."""
        ok = []
        for name, off, n in spans:
            size = self._files.get(name)
            if n > 0 and off >= 0 and name in self._files and (size is None or off + n <= size):
                ok.append((name, off, n))
        if ok:
            self.prefetcher.add(ok)

    def _fetch(self, name: str, offset: int, length: int) -> bytes:
        return self.pinned.fetch(name, offset, length)

    def _cache_path(self, name: str, offset: int, length: int) -> Path | None:
        if length > MAX_CACHED_READ:
            return None
        if offset == 0:
            if length > MAX_CACHED_PREFIX and name.lower().endswith(WEIGHT_SUFFIXES):
                return None
        elif offset != 8:
            return None
        # Pinned content only: a branch name moves, a commit id does not.
        commit = self.sha
        if commit is None:
            return None
        key = "\n".join([self.endpoint, self.repo_id, commit, name, str(offset), str(length)])
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return cache_root() / "headers" / digest[:2] / digest

    def close(self) -> None:
        self.prefetcher.clear()
        self._ahead.clear()


def sample_for_budget(specs: list[str], budget: int, share: float = 0.5) -> float | None:
    """The fraction of rows (`--sample`) that keeps an audit of `specs` within `budget` remote bytes: the sampled
    rows of every matrix (at least one row each) and every vector in full fit in `share` of the budget; the rest
    is left for headers, the layer map and the gaps that coalesced requests carry. None when nothing is remote or
    everything fits. The headers read here are cached on disk, so the audit does not read them again."""
    shapes: list[tuple[int, int]] = []  # (rows, bytes per row) of every remote tensor; vectors as one row
    for spec in [s for s in specs if str(s).startswith("hf://")]:
        src = open_hub(spec)
        try:
            for t in src.tensors().values():
                rows = t.rows if len(t.shape) >= 2 else 1
                shapes.append((rows, t.nbytes // max(1, rows)))
        finally:
            src.close()
    total = sum(r * b for r, b in shapes)
    if total == 0 or total <= budget * share:
        return None

    def cost(frac: float) -> int:
        return sum(b * (r if r == 1 else max(1, round(r * frac))) for r, b in shapes)

    if cost(1e-9) > budget * share:
        raise InputError(f"--budget {budget} bytes cannot hold one row of every remote tensor "
                         f"({cost(1e-9)} bytes at least, within half the budget); raise it")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget * share else (lo, mid)
    return max(lo, 1e-9)


def open_hub(spec: str) -> Source:
    """Open `hf://owner/name[@revision]` (safetensors, or the repository's one GGUF file or split set) or
    `hf://owner/name[@revision]/FILE.gguf` for lazy reading over HTTP Range requests."""
    from modeltrace.sources.safetensors_source import SafetensorsSource

    repo_id, revision, file = parse_spec_file(spec)
    endpoint = _endpoint()
    if urlsplit(endpoint).scheme not in ("http", "https"):
        raise InputError(f"HF_ENDPOINT={endpoint!r}: expected an http:// or https:// address")
    store = HubStore(repo_id, revision)
    names = sorted(store._files)
    if file is None and any(n.endswith(".safetensors") for n in names):
        return SafetensorsSource(store)
    from modeltrace.sources.gguf_remote import open_gguf_repo

    if file is not None or any(n.lower().endswith(".gguf") for n in names):
        return open_gguf_repo(store, names, file)
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        raise InputError(f"{store.location}: has only PyTorch pickle weights; modeltrace reads safetensors "
                         "and GGUF from the Hub")
    return SafetensorsSource(store)
