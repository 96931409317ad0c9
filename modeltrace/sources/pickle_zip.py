"""One PyTorch zip checkpoint (`torch.save` since 1.6): its pickled object graph and where each tensor's bytes are.

Data flow: `_ZipCheckpoint(store, file, where)` opens the zip, finds `<prefix>/data.pkl` (at most MAX_PICKLE_BYTES;
legacy non-zip files are refused) and loads it with pickle_restricted's unpickler, whose storages it resolves to
their members; `_unwrap` digs the state dict out of {"state_dict": ...} / {"model": ...} wrappers. For each tensor it
gives a `_Loc`: the member holding it, its absolute data offset in the zip file for stored (uncompressed) members
(one positional read per row range) or None for the rare compressed one, read through the zip, and its stride
(`_contiguous_strides` for the row-major check). Every read is counted in the store's statistics.
"""

from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass

from modeltrace.errors import InputError
from modeltrace.sources.bytestore import LocalStore
from modeltrace.sources.dtypes import SAFETENSORS_DTYPES
from modeltrace.sources.pickle_restricted import (
    _clean,
    _RestrictedUnpickler,
    _Storage,
    _StorageType,
    _TensorRef,
)

#: data.pkl holds only the object graph (a few hundred bytes per tensor); anything larger is not a checkpoint.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
_LEGACY = "legacy PyTorch format not supported; convert to safetensors"
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


# ---- one zip checkpoint ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Loc:
    """Where a tensor's bytes are: `data_offset` absolute in the zip (stored members) or None (compressed)."""

    weight_file: str
    member: str
    data_offset: int | None
    offset_in_member: int
    contiguous: bool
    stride: tuple[int, ...]


class _ZipCheckpoint:
    def __init__(self, store: LocalStore, weight_file: str, where: str) -> None:
        self.store = store
        self.weight_file = weight_file
        self.where = where
        path = store.path(weight_file)
        try:
            self._fh = open(path, "rb")  # kept open: compressed members are read through it
        except FileNotFoundError:
            raise InputError(f"{where}: missing file") from None
        except OSError as exc:
            raise InputError(f"{where}: cannot open ({exc.strerror})") from None
        self.file_size = store.size(weight_file)
        head = self._fh.read(4)
        self._fh.seek(0)
        try:
            self.zf = zipfile.ZipFile(self._fh)
        except zipfile.BadZipFile:
            self._fh.close()
            what = "a pickle" if head[:1] == b"\x80" else "not a zip archive"
            raise InputError(f"{where}: {what}; {_LEGACY}") from None
        except Exception as exc:  # hostile archives raise many kinds of error
            self._fh.close()
            raise InputError(f"{where}: unreadable zip archive ({type(exc).__name__}: {_clean(exc)})") from None
        self._members = {i.filename: i for i in self.zf.infolist()}
        pkls = [n for n in self._members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            self.close()
            if not pkls:
                raise InputError(f"{where}: zip archive without a data.pkl; not a PyTorch checkpoint")
            raise InputError(f"{where}: zip archive holds {len(pkls)} data.pkl files; not a PyTorch checkpoint")
        self.prefix = pkls[0][: -len("/data.pkl")]
        self._storages: dict[str, _Storage] = {}

    def close(self) -> None:
        self.zf.close()
        self._fh.close()

    def _member_bytes(self, name: str, limit: int) -> bytes:
        info = self._members[name]
        if info.file_size > limit:
            raise InputError(f"{self.where}: {_clean(name)} is {info.file_size} bytes; not a PyTorch checkpoint")
        try:
            return self.zf.read(info)
        except Exception as exc:
            raise InputError(f"{self.where}: cannot read {_clean(name)} ({type(exc).__name__}: {_clean(exc)})") \
                from None

    def load(self) -> object:
        order = f"{self.prefix}/byteorder"
        if order in self._members:
            mark = self._member_bytes(order, 16).strip()
            if mark == b"big":
                raise InputError(f"{self.where}: big-endian checkpoint; not supported (convert to safetensors)")
            if mark != b"little":
                raise InputError(f"{self.where}: unknown byte order mark {_clean(mark)}")
        data = self._member_bytes(f"{self.prefix}/data.pkl", MAX_PICKLE_BYTES)
        try:
            return _RestrictedUnpickler(data, self.where, self._storage).load()
        except InputError:
            raise
        except RecursionError:
            raise InputError(f"{self.where}: data.pkl nests too deeply; not a valid checkpoint") from None
        except MemoryError:
            raise InputError(f"{self.where}: data.pkl asks for more memory than it holds (corrupt or hostile)") \
                from None
        except Exception as exc:  # any malformed pickle: one line for the user
            msg = str(exc).splitlines()[0] if str(exc) else ""
            raise InputError(f"{self.where}: data.pkl is not a valid checkpoint pickle "
                             f"({type(exc).__name__}: {_clean(msg)})") from None

    def _storage(self, pid: object) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise ValueError("unknown persistent id")
        _, stype, key, _location, numel = pid
        if isinstance(key, bytes):
            key = key.decode("ascii", errors="replace")
        if not isinstance(stype, _StorageType):
            raise ValueError("persistent id without a storage type")
        if not stype.supported:
            raise InputError(f"{self.where}: storage type torch.{stype.name} is not supported")
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or key in (".", ".."):
            raise ValueError(f"bad storage key {_clean(key)}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise ValueError(f"bad storage size {_clean(numel)}")
        nbytes = numel * (SAFETENSORS_DTYPES[stype.st].itemsize if stype.st else 1)
        member = f"{self.prefix}/data/{key}"
        cached = self._storages.get(key)
        if cached is not None:
            if cached.st != stype.st or cached.nbytes != nbytes:
                raise InputError(f"{self.where}: storage {_clean(key)} is declared with two different types")
            return cached
        info = self._members.get(member)
        if info is None:
            raise InputError(f"{self.where}: storage {_clean(member)} named in data.pkl is missing")
        if info.file_size < nbytes:
            raise InputError(f"{self.where}: storage {_clean(member)} holds {info.file_size} bytes, data.pkl "
                             f"claims {nbytes}; truncated or hostile")
        st = _Storage(key, member, stype.st, nbytes)
        self._storages[key] = st
        return st

    def data_offset(self, member: str) -> int | None:
        """Absolute offset of a stored (uncompressed) member's bytes in the zip; None when compressed."""
        info = self._members[member]
        if info.flag_bits & 0x1:
            raise InputError(f"{self.where}: {_clean(member)} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        if info.header_offset + 30 > self.file_size:
            raise InputError(f"{self.where}: {_clean(member)} points outside the file; truncated?")
        head = self.store.read(self.weight_file, info.header_offset, 30)
        if bytes(head[:4]) != b"PK\x03\x04":
            raise InputError(f"{self.where}: bad zip local header for {_clean(member)}; corrupt file")
        name_len, extra_len = struct.unpack("<HH", bytes(head[26:30]))
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self.file_size:
            raise InputError(f"{self.where}: {_clean(member)} extends past the end of the file; truncated?")
        return start

    def read_member(self, member: str, offset: int, length: int) -> bytes:
        """Bytes of a compressed member (seeking decompresses from the start; torch never compresses)."""
        try:
            with self.zf.open(member) as f:
                f.seek(offset)
                raw = f.read(length)
        except Exception as exc:
            raise InputError(f"{self.where}: cannot read {_clean(member)} ({type(exc).__name__}: {_clean(exc)})") \
                from None
        if len(raw) != length:
            raise InputError(f"{self.where}: {_clean(member)} is truncated")
        self.store.stats.add(self.weight_file, offset, length)
        return raw


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    acc = 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


def _unwrap(obj: object, where: str) -> dict:
    for _ in range(4):
        if not isinstance(obj, dict) or any(isinstance(v, _TensorRef) for v in obj.values()):
            break
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise InputError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    return obj
