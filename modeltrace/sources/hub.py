"""Hugging Face Hub repositories (`hf://owner/name[@revision]`) read lazily with HTTP Range requests.

Only the bytes asked for are fetched: the file listing comes from the Hub API (one request), safetensors headers from
two small ranged reads per weight file, and tensor rows from one ranged read each. Header reads and small metadata
files are cached on disk per commit, so a second open of the same revision makes no header requests. Reads are
pinned to the commit sha the listing returned. A server that ignores `Range` is never read whole.

huggingface_hub supplies the endpoint, token, offline switch, resolve URLs and its HTTP session, so `HF_ENDPOINT`,
`HF_TOKEN` and `HF_HUB_OFFLINE` behave as they do for the library. `HF_ENDPOINT` and `HF_HUB_OFFLINE` are also read
at call time (the library reads them once, at import).

Environment:
    MODELTRACE_HTTP_TIMEOUT  seconds: `READ` or `CONNECT,READ` (default 10,30)
    MODELTRACE_HTTP_RETRIES  attempts per request on connection errors, timeouts, 408/429/5xx (default 3)
    MODELTRACE_CACHE         cache root (default ~/.cache/modeltrace); headers live under `headers/`
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session

from modeltrace.errors import InputError, RemoteError
from modeltrace.sources.base import FileInfo, ReadStats, Source
from modeltrace.sources.bytestore import ByteStore

DEFAULT_REVISION = "main"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_TRIES = 3
#: First back-off wait in seconds; doubles after each failed attempt (capped at MAX_BACKOFF).
BACKOFF_BASE = 0.5
MAX_BACKOFF = 8.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_EXCEPTIONS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)

#: Cached on disk per commit: safetensors header reads (the 8-byte length prefix at offset 0, the JSON header at
#: offset 8) and whole small metadata files (config, tokenizer, card, index), all read from offset 0. Weight data,
#: including the 8 MB chunks `file_sha256` streams from offset 0, is never cached.
MAX_CACHED_READ = 100 * 1024 * 1024
MAX_CACHED_PREFIX = 64 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx")
#: A server that answers a Range request with the whole file (200) is read only up to this many bytes.
MAX_UNRANGED_PREFIX = 8 * 1024 * 1024
STREAM_CHUNK = 1024 * 1024

_SEGMENT = r"[A-Za-z0-9_.\-]{1,96}"
_REPO_RE = re.compile(rf"^(?:{_SEGMENT}/)?{_SEGMENT}$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def parse_spec(spec: str) -> tuple[str, str]:
    """`hf://owner/name[@revision]` -> (repo_id, revision); InputError on anything else."""
    usage = f"{spec}: expected hf://owner/name or hf://owner/name@revision"
    if not spec.startswith("hf://"):
        raise InputError(usage)
    body = spec[len("hf://"):].strip().rstrip("/")
    repo_id, sep, revision = body.partition("@")
    if sep and not revision:
        raise InputError(f"{spec}: empty revision after '@'")
    revision = revision or DEFAULT_REVISION
    if not _REPO_RE.match(repo_id) or any(
        p.startswith(("-", ".")) or p.endswith(("-", ".")) or "--" in p or ".." in p for p in repo_id.split("/")
    ):
        raise InputError(usage)
    if any(c.isspace() or ord(c) < 32 for c in revision) or ".." in revision or revision.startswith("/"):
        raise InputError(f"{spec}: invalid revision {revision!r}")
    return repo_id, revision


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return constants.is_offline_mode()


def _timeout() -> httpx2.Timeout:
    raw = os.environ.get("MODELTRACE_HTTP_TIMEOUT", "").strip()
    connect, read = DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT
    if raw:
        try:
            parts = [float(p) for p in raw.split(",")]
        except ValueError:
            raise InputError(f"MODELTRACE_HTTP_TIMEOUT={raw!r}: expected seconds, e.g. 30 or 10,30") from None
        if len(parts) not in (1, 2) or any(p <= 0 for p in parts):
            raise InputError(f"MODELTRACE_HTTP_TIMEOUT={raw!r}: expected seconds, e.g. 30 or 10,30")
        connect, read = (min(parts[0], DEFAULT_CONNECT_TIMEOUT), parts[0]) if len(parts) == 1 else parts
    return httpx2.Timeout(read, connect=connect)


def _tries() -> int:
    raw = os.environ.get("MODELTRACE_HTTP_RETRIES", "").strip()
    if not raw:
        return DEFAULT_TRIES
    try:
        n = int(raw)
    except ValueError:
        raise InputError(f"MODELTRACE_HTTP_RETRIES={raw!r}: expected a whole number of attempts") from None
    return max(1, n)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("modeltrace")
    except Exception:
        return "unknown"


def cache_root() -> Path:
    raw = os.environ.get("MODELTRACE_CACHE")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "modeltrace"


def _describe_exc(exc: BaseException) -> str:
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


def _sleep_before_retry(attempt: int, retry_after: str | None) -> None:
    wait = min(MAX_BACKOFF, BACKOFF_BASE * (2**attempt))
    if retry_after:
        try:
            wait = min(MAX_BACKOFF * 4, max(wait, float(retry_after)))
        except ValueError:
            pass
    time.sleep(wait)


class HubStore(ByteStore):
    """The files of one Hub repository at one revision, read with HTTP Range requests."""

    def __init__(self, repo_id: str, revision: str = DEFAULT_REVISION, stats: ReadStats | None = None) -> None:
        super().__init__(stats or ReadStats())
        self.repo_id = repo_id
        self.revision = revision
        self.endpoint = _endpoint()
        self.location = f"hf://{repo_id}" + ("" if revision == DEFAULT_REVISION else f"@{revision}")
        self.timeout = _timeout()
        self.tries = _tries()
        self.cache_hits = 0
        if _offline():
            raise RemoteError(f"{self.location}: HF_HUB_OFFLINE is set; cannot read a Hub repository offline")
        # Built once; holds the token (if any). Never logged or put into messages.
        self._headers = build_hf_headers(library_name="modeltrace", library_version=_version())
        self.sha: str | None = None
        self._files: dict[str, int | None] = {}
        self.lfs_sha256: dict[str, str] = {}
        self._list()

    # ---- listing -------------------------------------------------------------------------------------------
    def _list(self) -> None:
        api = HfApi(endpoint=self.endpoint)
        info = None
        for attempt in range(self.tries):
            try:
                info = api.model_info(
                    self.repo_id, revision=self.revision, files_metadata=True, timeout=self.timeout  # type: ignore[arg-type]
                )
                break
            except OfflineModeIsEnabled:
                raise RemoteError(
                    f"{self.location}: HF_HUB_OFFLINE is set; cannot read a Hub repository offline"
                ) from None
            except (RevisionNotFoundError, GatedRepoError, RepositoryNotFoundError, DisabledRepoError) as exc:
                raise self._api_error(exc) from None
            except HfHubHTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 0
                if status not in RETRY_STATUS or attempt + 1 >= self.tries:
                    raise self._status_error(status, None, "listing files") from None
                resp = exc.response
                _sleep_before_retry(attempt, resp.headers.get("Retry-After") if resp is not None else None)
            except RETRY_EXCEPTIONS as exc:
                if attempt + 1 >= self.tries:
                    raise self._network_error(exc) from None
                _sleep_before_retry(attempt, None)
            except (httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
                raise RemoteError(
                    f"{self.location}: unexpected answer from {self.endpoint} while listing files "
                    f"({type(exc).__name__})"
                ) from None
        assert info is not None
        self.sha = info.sha if isinstance(info.sha, str) and _SHA_RE.match(info.sha) else None
        for s in info.siblings or []:
            self._files[s.rfilename] = s.size if isinstance(s.size, int) and s.size >= 0 else None
            lfs_sha = getattr(getattr(s, "lfs", None), "sha256", None)
            if isinstance(lfs_sha, str) and re.fullmatch(r"[0-9a-f]{64}", lfs_sha):
                self.lfs_sha256[s.rfilename] = lfs_sha  # the Hub's own content hash: file evidence for free

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
        at = f"({status}) at {self.endpoint}"
        if error_code == "RepoNotFound":
            return RemoteError(f"{self.location}: repository not found {at}")
        if error_code == "RevisionNotFound":
            return RemoteError(f"{self.location}: revision {self.revision!r} not found {at}")
        if error_code == "EntryNotFound" or status == 404:
            return RemoteError(f"{self.location}: {what}: not found {at}")
        if error_code == "GatedRepo":
            return RemoteError(f"{self.location}: gated repository; accept its terms and set HF_TOKEN {at}")
        if status in (401, 403):
            return RemoteError(
                f"{self.location}: {what}: access denied {at}; if the repository is private, set HF_TOKEN"
            )
        if status == 429:
            return RemoteError(f"{self.location}: {what}: rate limited {at}; retry later or set HF_TOKEN")
        return RemoteError(f"{self.location}: {what}: HTTP error {at}")

    def _network_error(self, exc: BaseException) -> RemoteError:
        return RemoteError(f"{self.location}: cannot reach {self.endpoint} ({_describe_exc(exc)})")

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
        for attempt in range(self.tries):
            try:
                r = get_session().head(self.url(name), headers=headers, timeout=self.timeout, follow_redirects=False)
            except OfflineModeIsEnabled:
                raise RemoteError(f"{self.location}: HF_HUB_OFFLINE is set") from None
            except RETRY_EXCEPTIONS as exc:
                if attempt + 1 >= self.tries:
                    raise self._network_error(exc) from None
                _sleep_before_retry(attempt, None)
                continue
            if r.status_code in RETRY_STATUS and attempt + 1 < self.tries:
                _sleep_before_retry(attempt, r.headers.get("Retry-After"))
                continue
            if r.status_code >= 400:
                raise self._status_error(r.status_code, r.headers.get("X-Error-Code"), name)
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
        data = self._fetch(name, offset, length)
        self.stats.add(name, offset, length)
        self.stats.digest(name, offset, data)
        if cache is not None:
            _write_atomic(cache, data)
        return data

    def _cache_path(self, name: str, offset: int, length: int) -> Path | None:
        if length > MAX_CACHED_READ:
            return None
        if offset == 0:
            if length > MAX_CACHED_PREFIX and name.lower().endswith(WEIGHT_SUFFIXES):
                return None
        elif offset != 8:
            return None
        # Pinned content only: a branch name moves, a commit id does not.
        commit = self.sha or (self.revision if _SHA_RE.match(self.revision) else None)
        if commit is None:
            return None
        key = "\n".join([self.endpoint, self.repo_id, commit, name, str(offset), str(length)])
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return cache_root() / "headers" / digest[:2] / digest

    def _fetch(self, name: str, offset: int, length: int) -> bytes:
        url = self.url(name)
        end = offset + length - 1
        headers = {**self._headers, "Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}
        what = f"{name} bytes {offset}-{end}"
        for attempt in range(self.tries):
            retry_after: str | None = None
            try:
                with get_session().stream("GET", url, headers=headers, timeout=self.timeout) as r:
                    if r.status_code in RETRY_STATUS and attempt + 1 < self.tries:
                        retry_after = r.headers.get("Retry-After")
                    elif r.status_code == 206:
                        return self._read_partial(r, name, offset, length)
                    elif r.status_code == 200:
                        return self._read_prefix(r, name, offset, length)
                    elif r.status_code == 416:
                        raise InputError(
                            f"{self.location}: {name} is truncated (wanted bytes up to {offset + length})"
                        )
                    else:
                        raise self._status_error(r.status_code, r.headers.get("X-Error-Code"), name)
            except OfflineModeIsEnabled:
                raise RemoteError(f"{self.location}: HF_HUB_OFFLINE is set; cannot read {name}") from None
            except RETRY_EXCEPTIONS as exc:
                if attempt + 1 >= self.tries:
                    raise RemoteError(
                        f"{self.location}: reading {what}: cannot reach {self.endpoint} ({_describe_exc(exc)})"
                    ) from None
            except httpx2.HTTPError as exc:
                raise RemoteError(f"{self.location}: reading {what}: {type(exc).__name__}") from None
            _sleep_before_retry(attempt, retry_after)
        raise RemoteError(f"{self.location}: reading {what}: no answer after {self.tries} attempts")

    def _read_partial(self, r: httpx2.Response, name: str, offset: int, length: int) -> bytes:
        cr = _CONTENT_RANGE_RE.match(r.headers.get("Content-Range", "").strip())
        end = offset + length - 1
        if cr is None:
            raise RemoteError(f"{self.location}: {name}: 206 answer without a valid Content-Range from {self.endpoint}")
        got_start, got_end = int(cr.group(1)), int(cr.group(2))
        if got_start != offset or got_end > end:
            raise RemoteError(
                f"{self.location}: {name}: asked for bytes {offset}-{end}, server sent {got_start}-{got_end}"
            )
        if got_end < end:
            raise InputError(f"{self.location}: {name} is truncated (wanted bytes up to {offset + length})")
        return self._collect(r, name, 0, length)

    def _read_prefix(self, r: httpx2.Response, name: str, offset: int, length: int) -> bytes:
        """The server ignored Range and sent the whole file: read only the prefix we need, if it is small."""
        if offset + length > MAX_UNRANGED_PREFIX:
            raise RemoteError(
                f"{self.location}: {self.endpoint} ignored the Range request for {name} (HTTP 200, whole file); "
                "refusing to download the whole file"
            )
        return self._collect(r, name, offset, length)

    def _collect(self, r: httpx2.Response, name: str, skip: int, length: int) -> bytes:
        buf = bytearray()
        want = skip + length
        for chunk in r.iter_bytes(STREAM_CHUNK):
            need = want - len(buf)
            buf += chunk[:need]
            if len(buf) >= want:
                break  # leaving the `with` closes the connection; the rest is never read
        if len(buf) < want:
            raise RemoteError(
                f"{self.location}: {name}: the server sent {max(0, len(buf) - skip)} of {length} bytes"
            )
        return bytes(buf[skip:want])


def _write_atomic(path: Path, data: bytes) -> None:
    """Best effort: a cache that cannot be written only costs a refetch."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        pass


def open_hub(spec: str) -> Source:
    """Open `hf://owner/name[@revision]` for lazy reading over HTTP Range requests."""
    from modeltrace.sources.safetensors_source import SafetensorsSource

    repo_id, revision = parse_spec(spec)
    endpoint = _endpoint()
    if urlsplit(endpoint).scheme not in ("http", "https"):
        raise InputError(f"HF_ENDPOINT={endpoint!r}: expected an http:// or https:// address")
    store = HubStore(repo_id, revision)
    if not any(n.endswith(".safetensors") for n in store._files):
        names = sorted(store._files)
        if any(n.endswith(".gguf") for n in names):
            raise InputError(f"{store.location}: holds GGUF files; reading GGUF from the Hub is not supported yet")
        if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
            raise InputError(f"{store.location}: has only PyTorch pickle weights; modeltrace reads safetensors "
                             "from the Hub")
    return SafetensorsSource(store)
