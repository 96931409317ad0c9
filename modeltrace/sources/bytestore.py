"""Byte access to the files of a checkpoint, local or remote, behind one small interface.

The safetensors reader only ever asks for (file, offset, length); a local store answers with `pread`, a remote one
with an HTTP Range request. That keeps the format logic identical wherever the bytes live.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from modeltrace.errors import InputError
from modeltrace.sources.base import FileInfo, ReadStats


class ByteStore(ABC):
    location: str
    #: whether `mapped` gives the bytes in place (local files) rather than None
    can_map: bool = False
    #: how many reads are worth running at once (remote stores: their connections; local: 1, reads are fast)
    parallel: int = 1

    def __init__(self, stats: ReadStats) -> None:
        self.stats = stats

    @abstractmethod
    def list_files(self) -> list[FileInfo]: ...

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def read(self, name: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, or an InputError if the file is shorter."""

    def read_ahead(self, name: str, offset: int, length: int, ahead: int) -> bytes:
        """Like `read`; a remote store may fetch up to `ahead` following bytes in the same request and serve the next
        read that starts where this one ends from them (headers whose length comes first)."""
        return self.read(name, offset, length)

    def read_transient(self, name: str, offset: int, length: int) -> bytes | memoryview:
        """Like `read`, but the result may live in a reused buffer: valid only until the next read."""
        return self.read(name, offset, length)

    @contextmanager
    def mapped(self, name: str, offset: int, length: int) -> Iterator[memoryview | None]:
        """The bytes at [offset, offset + length) without copying them, valid inside the block; None when this
        store cannot map (remote stores). Callers fall back to `read_transient`."""
        yield None

    def prefetch(self, spans: Iterable[tuple[str, int, int]]) -> None:  # noqa: B027 - optional hook
        """Hint: these (file, offset, length) spans will be read soon. Remote stores fetch them now, coalesced and
        many at a time, and serve the later `read` calls from memory; local stores ignore it (their fast path)."""

    def exists(self, name: str) -> bool:
        return any(f.name == name for f in self.list_files())

    def sha256(self, name: str, chunk: int = 8 * 1024 * 1024) -> str:
        """SHA-256 of one file, streamed in bounded chunks (local or remote alike)."""
        size = self.size(name)
        h = hashlib.sha256()
        for off in range(0, size, chunk):
            h.update(self.read(name, off, min(chunk, size - off)))
        return h.hexdigest()

    def close(self) -> None:  # noqa: B027
        pass


def safe_relative(root: Path, name: str, location: str) -> Path:
    """Resolve `name` inside `root`, refusing absolute paths and `..` escapes (hostile index files)."""
    if not name or os.path.isabs(name) or "\\" in name or any(p in ("..", "") for p in name.split("/")):
        raise InputError(f"{location}: refusing file name {name!r} that points outside the model folder")
    path = (root / name).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        raise InputError(f"{location}: refusing file name {name!r} that points outside the model folder") from None
    return path


class LocalStore(ByteStore):
    """Files under one directory (or a single file), read with positional reads; nothing is ever written."""

    can_map = True

    def __init__(self, root: Path, stats: ReadStats, only: str | None = None) -> None:
        super().__init__(stats)
        self.root = root
        self.only = only
        self.location = str(root / only) if only else str(root)
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._local = threading.local()
        self._lock = threading.Lock()

    def list_files(self) -> list[FileInfo]:
        if self.only:
            return [FileInfo(self.only, (self.root / self.only).stat().st_size)]
        out = []
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and ".git" not in p.parts:
                out.append(FileInfo(str(p.relative_to(self.root)), p.stat().st_size))
        return out

    def path(self, name: str) -> Path:
        return safe_relative(self.root, name, self.location)

    def exists(self, name: str) -> bool:
        try:
            return self.path(name).is_file()
        except InputError:
            return False

    def size(self, name: str) -> int:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            raise InputError(f"{self.location}: missing file {name}") from None

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            return fd
        with self._lock:
            return self._open_fd(name)

    def _open_fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            try:
                fd = os.open(self.path(name), os.O_RDONLY)
            except FileNotFoundError:
                raise InputError(f"{self.location}: missing file {name}") from None
            except OSError as exc:
                raise InputError(f"{self.location}: cannot open {name}: {exc.strerror}") from None
            self._fds[name] = fd
        return fd

    def read(self, name: str, offset: int, length: int) -> bytes:
        return bytes(self._pread(name, offset, length, bytearray(length)))

    @contextmanager
    def mapped(self, name: str, offset: int, length: int) -> Iterator[memoryview | None]:
        """Map just this window of the file (page cache, no copy into a buffer), unmapped on exit.

        Reading page-cache pages in place is what lets the audit run near the speed of reading the bytes once;
        mapping one chunk at a time keeps resident memory bounded by the chunk, not the file. The file's size is
        checked first, so a short file is an InputError, not a SIGBUS.
        """
        if length <= 0:
            yield None
            return
        fd = self._fd(name)
        if offset + length > self._size_of(name, fd):
            raise InputError(f"{self.location}: {name} is truncated (wanted bytes up to {offset + length})")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, offset + length - start, prot=mmap.PROT_READ, offset=start)
        view = memoryview(mm)[offset - start:offset - start + length]
        self.stats.add(name, offset, length)
        try:
            yield view
        finally:
            try:
                view.release()
                mm.close()
            except BufferError:  # an array over the window is still alive (e.g. in a traceback): unmapped by GC
                pass

    def _size_of(self, name: str, fd: int) -> int:
        size = self._sizes.get(name)
        if size is None:
            size = self._sizes[name] = os.fstat(fd).st_size
        return size

    def read_transient(self, name: str, offset: int, length: int) -> memoryview:
        # Reusing one buffer avoids a fresh (page-faulting) allocation per chunk.
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            buf = self._local.buf = bytearray(length)
        return self._pread(name, offset, length, buf)

    def _pread(self, name: str, offset: int, length: int, buf: bytearray) -> memoryview:
        fd = self._fd(name)
        view = memoryview(buf)[:length]
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise InputError(f"{self.location}: {name} is truncated (wanted bytes up to {offset + length})")
            got += n
        self.stats.add(name, offset, length)
        return view

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
