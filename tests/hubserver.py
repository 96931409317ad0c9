"""A tiny Hugging Face Hub look-alike on 127.0.0.1 for tests: local folders served as model repositories.

It answers what huggingface_hub and modeltrace's HubStore ask for:

- `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{rev}` (model_info; `?blobs=true` adds sizes),
- `GET /api/models/{repo}/tree/{rev}[/{path}]` (list_repo_tree, `?recursive=true`),
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with single-range `Range` support (206 + Content-Range, 416 when
  unsatisfiable) and the headers the library reads (`X-Repo-Commit`, `ETag`, `X-Linked-Size`, `Accept-Ranges`),
- 404 with `X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound, 401 when a token is required.

Every request is recorded in `server.log` (method, path, range, status, bytes sent) so tests can assert exactly
which byte ranges were fetched. Knobs: `ignore_range` (answer 200 with the whole file), `token` (require
`Authorization: Bearer <token>`), `fail_next(n, status)` (answer the next n requests with an error), `heads` (which
named revision `main` is: a new commit pushed to main).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 64 * 1024
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


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


def _files(folder: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(folder)): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(folder).parts
    }


def _file_etag(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        repos: Mapping[str, Path | Mapping[str, Path]],
        ignore_range: bool = False,
        token: str | None = None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        # repo id -> revision -> folder; a bare Path is the `main` revision
        self.repos: dict[str, dict[str, Path]] = {
            rid: ({"main": Path(v)} if isinstance(v, (str, Path)) else {k: Path(p) for k, p in v.items()})
            for rid, v in repos.items()
        }
        self.ignore_range = ignore_range
        self.token = token
        #: repo id -> the revision name `main` points to (a new commit on main: point it at another name)
        self.heads: dict[str, str] = {}
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._failures: list[int] = []
        self._delays: list[float] = []
        self._etags: dict[Path, str] = {}

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

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

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

    def lookup(self, repo_id: str, revision: str) -> tuple[str, Path] | None:
        """(commit sha, folder) for a revision name or a commit sha."""
        revs = self.repos[repo_id]
        if revision == "main" and repo_id in self.heads:
            revision = self.heads[repo_id]
        if revision in revs:
            return commit_sha(repo_id, revision), revs[revision]
        for name, folder in revs.items():
            if commit_sha(repo_id, name) == revision:
                return revision, folder
        return None

    def etag(self, path: Path) -> str:
        with self._lock:
            tag = self._etags.get(path)
        if tag is None:
            tag = _file_etag(path)
            with self._lock:
                self._etags[path] = tag
        return tag


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
        sha, folder = got
        files = _files(folder)
        if tree_path is not None:
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            self._json(self._tree(files, tree_path, recursive))
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for name, p in files.items():
            entry: dict = {"rfilename": name}
            if blobs:
                entry["size"] = p.stat().st_size
                entry["blobId"] = hashlib.sha1(name.encode()).hexdigest()
                if name.endswith(".safetensors"):
                    entry["lfs"] = {"size": p.stat().st_size, "sha256": self.server.etag(p), "pointerSize": 134}
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

    def _tree(self, files: dict[str, Path], under: str, recursive: bool) -> list[dict]:
        prefix = f"{under}/" if under else ""
        out: list[dict] = []
        dirs: set[str] = set()
        for name, p in files.items():
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
            out.append({"type": "file", "oid": hashlib.sha1(name.encode()).hexdigest(),
                        "size": p.stat().st_size, "path": name})
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
        got = self.server.lookup(repo_id, unquote(rev_raw))
        if got is None:
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return
        sha, folder = got
        path = _files(folder).get(unquote(path_raw))
        if path is None:
            self._error(404, "EntryNotFound", "Entry not found")
            return
        size = path.stat().st_size
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{self.server.etag(path)}"',
            "X-Linked-Size": str(size),
            "X-Linked-Etag": f'"{self.server.etag(path)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        span = None if self.server.ignore_range else self._parse_range(size)
        if span == "invalid":
            headers["Content-Range"] = f"bytes */{size}"
            self._error(416, None, "Range Not Satisfiable", headers)
            return
        if span is None:
            self._send_file(200, path, 0, size, headers, None)
        else:
            start, end = span  # type: ignore[misc]
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send_file(206, path, start, end - start + 1, headers, (start, end))

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

    def _json(self, value: object) -> None:
        body = json.dumps(value).encode()
        req = self._record(200, None)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self._method != "HEAD":
            self.wfile.write(body)
            req.sent = len(body)
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

    def _send_file(self, status: int, path: Path, start: int, length: int, headers: dict[str, str],
                   span: tuple[int, int] | None) -> None:
        req = self._record(status, span)
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self._method != "HEAD":
                with path.open("rb") as f:
                    f.seek(start)
                    while req.sent < length:
                        block = f.read(min(CHUNK, length - req.sent))
                        if not block:
                            break
                        self.wfile.write(block)
                        req.sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            req.done = True


@contextmanager
def serve(
    repos: Mapping[str, Path | Mapping[str, Path]], ignore_range: bool = False, token: str | None = None
) -> Iterator[HubServer]:
    """Run a HubServer in a background thread for the duration of the block."""
    server = HubServer(repos, ignore_range=ignore_range, token=token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
