"""A tiny Hugging Face Hub look-alike on 127.0.0.1 for tests and benchmarks: folders (or virtual repositories whose
bytes are made on demand) served as model repositories.

It answers what huggingface_hub and modeltrace's HubStore ask for:

- `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{rev}` (model_info; `?blobs=true` adds sizes, git
  blob ids and, for LFS files, the SHA-256),
- `GET /api/models/{repo}/tree/{rev}[/{path}]` (list_repo_tree, `?recursive=true`),
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with single-range `Range` support (206 + Content-Range, 416 when
  unsatisfiable) and the headers the real Hub sends (`X-Repo-Commit`, `ETag` = the LFS SHA-256 for LFS files and
  the git blob id otherwise, `X-Linked-Size`, `Accept-Ranges`),
- 404 with `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound, 401 when a token is required.

Every request is recorded in `server.log` (method, path, range, status, bytes sent) so tests can assert exactly
which byte ranges were fetched. Faults: `ignore_range` (answer 200 with the whole file), `token` (require
`Authorization: Bearer <token>`), `fail_next(n, status)`, `delay_next(n, s)`, `swap_after(n, repo, files)` (after n
more file reads the same commit serves other content, with its own ETag), `trickle(rate)` (bodies sent at `rate`
bytes a second). `link=Link(bandwidth, latency)` simulates a network link shared by every connection. `heads`
(which named revision `main` is: a new commit pushed to main).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class Request:
    """One request, logged before its answer is sent (so a client that got its answer always finds it here)."""

    method: str
    path: str  # URL path, unquoted, without the query
    range: tuple[int, int] | None  # inclusive (start, end) actually served with 206, else None
    status: int
    sent: int = 0  # body bytes written so far (final once `done`)
    query: str = ""
    range_header: str | None = None
    done: bool = False


def commit_sha(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class RepoFiles(Protocol):
    """What the server needs of a repository revision: names and sizes, bytes of a range, content ids."""

    def sizes(self) -> dict[str, int]: ...

    def chunks(self, name: str, start: int, length: int) -> Iterator[bytes]: ...

    def etag(self, name: str) -> str: ...

    def is_lfs(self, name: str) -> bool: ...


class FolderFiles:
    """A folder on disk; ETags computed once per file (SHA-256 for LFS files, the git blob id otherwise)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._tags: dict[str, str] = {}
        self._lock = threading.Lock()

    def sizes(self) -> dict[str, int]:
        return {
            str(p.relative_to(self.folder)): p.stat().st_size
            for p in sorted(self.folder.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(self.folder).parts
        }

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def chunks(self, name: str, start: int, length: int) -> Iterator[bytes]:
        with (self.folder / name).open("rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                block = f.read(min(CHUNK, left))
                if not block:
                    return
                left -= len(block)
                yield block

    def etag(self, name: str) -> str:
        with self._lock:
            tag = self._tags.get(name)
        if tag is None:
            path = self.folder / name
            h = hashlib.sha256() if self.is_lfs(name) else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            tag = h.hexdigest()
            with self._lock:
                self._tags[name] = tag
        return tag


def as_files(value: Path | str | RepoFiles) -> RepoFiles:
    return FolderFiles(Path(value)) if isinstance(value, (str, Path)) else value


class _Repos(dict):
    """repo id -> revision -> files; a repository added while serving (`server.repos[id] = {rev: folder}`, as the
    service tests do) gets its folders wrapped like those given at start."""

    def __setitem__(self, rid: str, revs: object) -> None:
        if isinstance(revs, (str, Path)) or not isinstance(revs, Mapping):
            revs = {"main": revs}
        super().__setitem__(rid, {k: as_files(p) for k, p in revs.items()})


@dataclass
class Link:
    """A network link: `bandwidth` bytes a second shared by all connections, `latency` seconds before each answer."""

    bandwidth: float = 100e6
    latency: float = 0.020
    _free_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, n: int) -> None:
        """Wait until `n` more bytes have passed the link (first come, first served)."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + n / self.bandwidth
            until = self._free_at
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        repos: Mapping[str, Path | RepoFiles | Mapping[str, Path | RepoFiles]],
        ignore_range: bool = False,
        token: str | None = None,
        link: Link | None = None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        # repo id -> revision -> files; a bare folder is the `main` revision
        self.repos: dict[str, dict[str, RepoFiles]] = _Repos()
        for rid, v in repos.items():
            self.repos[rid] = v
        self.ignore_range = ignore_range
        self.token = token
        self.link = link
        #: repo id -> the revision name `main` points to (a new commit on main: point it at another name)
        self.heads: dict[str, str] = {}
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._failures: list[int] = []
        self._delays: list[float] = []
        self._swaps: list[list] = []  # [reads left, repo id, revision, files]
        self.trickle_rate: float | None = None
        self.trickle_api = False
        self.in_flight = 0  # file requests being answered now
        self.max_in_flight = 0  # the most at once since the last `clear`

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    # ---- test helpers --------------------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 503) -> None:
        with self._lock:
            self._failures.extend([status] * n)

    def delay_next(self, n: int, seconds: float) -> None:
        """Hold the next n answers for `seconds` each (a server that stalls: client read timeouts)."""
        with self._lock:
            self._delays.extend([seconds] * n)

    def swap_after(self, n: int, repo_id: str, files: Path | RepoFiles, revision: str = "main") -> None:
        """After n more file reads (resolve GETs) of any repository, `repo_id`@`revision` serves `files` under the
        same commit: a file that changes while it is read."""
        with self._lock:
            self._swaps.append([n, repo_id, revision, as_files(files)])

    def trickle(self, rate: float | None, api: bool = False) -> None:
        """Send file bodies (and, with `api`, API answers) at `rate` bytes a second; None: full speed."""
        self.trickle_rate, self.trickle_api = rate, api

    def clear(self) -> None:
        with self._lock:
            self.log.clear()
            self.max_in_flight = self.in_flight

    def enter(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def requests(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method) and contains in r.path]

    def ranges(self, file: str | None = None) -> list[tuple[str, int, int]]:
        """(file path in repo, start, end inclusive) of every 206 answer, in order."""
        out = []
        for r in self.requests("GET", "/resolve/"):
            if r.range is None:
                continue
            name = r.path.split("/resolve/", 1)[1].split("/", 1)[1]
            if file is None or name == file:
                out.append((name, r.range[0], r.range[1]))
        return out

    def bytes_sent(self) -> int:
        return sum(r.sent for r in self.requests())

    def stats(self, clear: bool = False) -> dict:
        """Per repository: requests, body bytes sent, and the (file, start, end) ranges served; then forget them."""
        out: dict[str, dict] = {}
        with self._lock:
            log = [r for r in self.log if r.path != "/_stats"]
            if clear:
                self.log.clear()
        for r in log:
            rest = r.path[len("/api/models/"):] if r.path.startswith("/api/models/") else r.path.lstrip("/")
            repo = "/".join(rest.split("/")[:2])
            d = out.setdefault(repo, {"requests": 0, "bytes": 0, "ranges": []})
            d["requests"] += 1
            d["bytes"] += r.sent
            if r.range is not None and "/resolve/" in r.path:
                d["ranges"].append([r.path, r.range[0], r.range[1]])
        return out

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every logged response has been fully written (or abandoned by its client)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(r.done for r in self.requests()):
            time.sleep(0.01)

    # ---- internals -----------------------------------------------------------------------------------------
    def record(self, req: Request) -> None:
        with self._lock:
            self.log.append(req)

    def take_delay(self) -> float:
        with self._lock:
            return self._delays.pop(0) if self._delays else 0.0

    def take_failure(self) -> int | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def count_read(self) -> None:
        """One file read happened: pending swaps come due."""
        with self._lock:
            for sw in self._swaps:
                sw[0] -= 1
                if sw[0] < 0:
                    self.repos[sw[1]][sw[2]] = sw[3]
            self._swaps = [sw for sw in self._swaps if sw[0] >= 0]

    def lookup(self, repo_id: str, revision: str) -> tuple[str, RepoFiles] | None:
        """(commit sha, files) for a revision name or a commit sha."""
        revs = self.repos[repo_id]
        if revision == "main" and repo_id in self.heads:
            revision = self.heads[repo_id]
        if revision in revs:
            return commit_sha(repo_id, revision), revs[revision]
        for name, files in revs.items():
            if commit_sha(repo_id, name) == revision:
                return revision, files
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer
    timeout = 10
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms delayed-ACK stalls

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr logging
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a read timeout after `delay_next`): nobody is left to answer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    # ---- routing -------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self._method = method
        self._upath = unquote(parts.path)
        self._query = parts.query
        self._range_header = self.headers.get("Range")
        counted = "/resolve/" in parts.path
        if counted:
            self.server.enter(1)
        try:
            self._answer(parts)
        finally:
            if counted:
                self.server.enter(-1)

    def _answer(self, parts) -> None:
        if self.server.link is not None:
            time.sleep(self.server.link.latency)
        delay = self.server.take_delay()
        if delay:
            time.sleep(delay)
        failure = self.server.take_failure()
        if failure is not None:
            self._error(failure, None, "injected failure")
            return
        if self.server.token is not None and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self._error(401, "RepoNotFound", "Invalid username or password.")
            return
        raw = parts.path
        if raw == "/_stats":  # benchmarks in another process: per-repository requests and bytes, and the ranges
            self._json(self.server.stats(clear="clear=1" in parts.query))
            return
        if raw.startswith("/api/models/"):
            self._api(raw[len("/api/models/"):], parse_qs(parts.query))
        elif "/resolve/" in raw:
            self._resolve(raw.lstrip("/"))
        else:
            self._error(404, None, "Not found")

    def _split_repo(self, raw: str) -> tuple[str, str] | None:
        """`owner/name/rest` or `name/rest` (raw, still quoted) -> (repo id, rest) for a known repo."""
        segs = raw.split("/")
        for n in (2, 1):
            rid = "/".join(unquote(s) for s in segs[:n])
            if rid in self.server.repos:
                return rid, "/".join(segs[n:])
        return None

    def _api(self, raw: str, query: dict[str, list[str]]) -> None:
        found = self._split_repo(raw)
        if found is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        repo_id, rest = found
        revision = "main"
        tree_path: str | None = None
        if rest.startswith("revision/"):
            revision = unquote(rest[len("revision/"):])
        elif rest.startswith("tree/"):
            rev_raw, _, path_raw = rest[len("tree/"):].partition("/")
            revision, tree_path = unquote(rev_raw), unquote(path_raw).strip("/")
        elif rest:
            self._error(404, None, "Not found")
            return
        got = self.server.lookup(repo_id, revision)
        if got is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        sha, files = got
        sizes = files.sizes()
        if tree_path is not None:
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            self._json(self._tree(sizes, tree_path, recursive))
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, size in sizes.items():
            entry: dict = {"rfilename": name}
            if blobs:
                entry["size"] = size
                if files.is_lfs(name):
                    entry["blobId"] = hashlib.sha1(f"lfs pointer {name}".encode()).hexdigest()
                    entry["lfs"] = {"size": size, "sha256": files.etag(name), "pointerSize": 134}
                else:
                    entry["blobId"] = files.etag(name)
            siblings.append(entry)
        self._json({
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": sha,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "private": self.server.token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["safetensors"],
            "library_name": "transformers",
            "siblings": siblings,
        })

    def _tree(self, sizes: dict[str, int], under: str, recursive: bool) -> list[dict]:
        prefix = f"{under}/" if under else ""
        out: list[dict] = []
        dirs: set[str] = set()
        for name, size in sizes.items():
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            if "/" in rel and not recursive:
                dirs.add(prefix + rel.split("/", 1)[0])
                continue
            if recursive:
                segs = rel.split("/")[:-1]
                for i in range(1, len(segs) + 1):
                    dirs.add(prefix + "/".join(segs[:i]))
            out.append({"type": "file", "oid": hashlib.sha1(name.encode()).hexdigest(), "size": size, "path": name})
        out.extend({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs))
        return out

    def _resolve(self, raw: str) -> None:
        found = self._split_repo(raw)
        if found is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        repo_id, rest = found
        if not rest.startswith("resolve/"):
            self._error(404, None, "Not found")
            return
        rev_raw, _, path_raw = rest[len("resolve/"):].partition("/")
        if self._method == "GET":
            self.server.count_read()
        got = self.server.lookup(repo_id, unquote(rev_raw))
        if got is None:
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return
        sha, files = got
        name = unquote(path_raw)
        size = files.sizes().get(name)
        if size is None:
            self._error(404, "EntryNotFound", "Entry not found")
            return
        tag = files.etag(name)
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{tag}"',
            "X-Linked-Size": str(size),
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        span = None if self.server.ignore_range else self._parse_range(size)
        if span == "invalid":
            headers["Content-Range"] = f"bytes */{size}"
            self._error(416, None, "Range Not Satisfiable", headers)
            return
        if span is None:
            self._send_file(200, files, name, 0, size, headers, None)
        else:
            start, end = span  # type: ignore[misc]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send_file(206, files, name, start, end - start + 1, headers, (start, end))

    def _parse_range(self, size: int) -> tuple[int, int] | str | None:
        header = self._range_header
        if not header:
            return None
        m = _RANGE_RE.match(header.strip())
        if m is None:
            return None  # multi-range or unknown unit: ignore Range, like many servers
        a, b = m.group(1), m.group(2)
        if not a and not b:
            return "invalid"
        if not a:  # suffix: last n bytes
            n = int(b)
            if n == 0:
                return "invalid"
            return max(0, size - n), size - 1
        start = int(a)
        end = min(int(b), size - 1) if b else size - 1
        if start >= size or (b and int(b) < start):
            return "invalid"
        return start, end

    # ---- responses -----------------------------------------------------------------------------------------
    def _record(self, status: int, span: tuple[int, int] | None) -> Request:
        req = Request(self._method, self._upath, span, status, 0, self._query, self._range_header)
        self.server.record(req)
        return req

    def _write(self, data: bytes, req: Request, trickle: bool) -> None:
        rate = self.server.trickle_rate if trickle else None
        if rate:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                req.sent += 1
                time.sleep(1.0 / rate)
            return
        link = self.server.link
        if link is not None:
            link.send(len(data))
        self.wfile.write(data)
        req.sent += len(data)

    def _json(self, value: object) -> None:
        body = json.dumps(value).encode()
        req = self._record(200, None)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self._method != "HEAD":
                self._write(body, req, self.server.trickle_api)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            req.done = True

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        req = self._record(status, None)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self._method != "HEAD":
            self.wfile.write(body)
        req.done = True

    def _send_file(self, status: int, files: RepoFiles, name: str, start: int, length: int,
                   headers: dict[str, str], span: tuple[int, int] | None) -> None:
        req = self._record(status, span)
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self._method != "HEAD":
                for block in files.chunks(name, start, length):
                    self._write(block, req, True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            req.done = True


@contextmanager
def serve(
    repos: Mapping[str, Path | RepoFiles | Mapping[str, Path | RepoFiles]], ignore_range: bool = False,
    token: str | None = None, link: Link | None = None,
) -> Iterator[HubServer]:
    """Run a HubServer in a background thread for the duration of the block."""
    server = HubServer(repos, ignore_range=ignore_range, token=token, link=link)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
