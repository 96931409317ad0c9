"""PyTorch zip checkpoints (`torch.save` since 1.6) read without torch and without running any pickled code.

A zip checkpoint holds `<prefix>/data.pkl` (the pickled object graph), one `<prefix>/data/<key>` member per storage
and `<prefix>/byteorder`. The pickle is read by a restricted unpickler: every global it names must be on a short
allow-list, and each allowed name maps to a harmless stand-in defined here (never to torch or to the real function),
so tensors come back as plain records (storage key, dtype, offset, shape, stride). Anything else the pickle asks
for (`os.system`, `builtins.eval`, a custom class) stops the load with an InputError before it can be called.

Tensor data is then read straight from the storage members: torch stores them uncompressed, so a row range is one
positional read at a known offset in the zip file. `TensorInfo.file` is the checkpoint file holding the tensor and
`TensorInfo.offset` the absolute offset of its first byte in that file (for the rare compressed member: the offset
inside the storage member).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modeltrace.errors import InputError
from modeltrace.sources.base import MAX_TEXT_BYTES, FileInfo, Source, TensorInfo
from modeltrace.sources.bytestore import LocalStore
from modeltrace.sources.dtypes import SAFETENSORS_DTYPES, decode

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
#: data.pkl holds only the object graph (a few hundred bytes per tensor); anything larger is not a checkpoint.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
MAX_RANK = 64
_LEGACY = "legacy PyTorch format not supported; convert to safetensors"


def _clean(text: object, limit: int = 120) -> str:
    """A name from the file, made safe for a one-line message."""
    s = ascii(str(text))[1:-1]
    return s if len(s) <= limit else s[:limit] + "..."


# ---- harmless stand-ins for the torch globals a state-dict pickle names ------------------------------------------
class _NoState:
    """Refuses the pickle BUILD opcode, so a hostile pickle cannot rewrite a stand-in after it was validated."""

    def __setstate__(self, state: object) -> None:
        raise ValueError(f"refusing to set state on {type(self).__name__.lstrip('_')}")


@dataclass(frozen=True)
class _DType(_NoState):
    """Stand-in for `torch.<dtype>`; `st` is the safetensors dtype string, None when unsupported."""

    name: str
    st: str | None


@dataclass(frozen=True)
class _StorageType(_NoState):
    """Stand-in for `torch.FloatStorage` & co.; `st` None means untyped (bytes), `supported` False: no reader."""

    name: str
    st: str | None
    supported: bool = True


@dataclass(frozen=True)
class _Storage(_NoState):
    """A lazy reference to one storage member of the zip (what `persistent_load` returns)."""

    key: str
    member: str
    st: str | None  # element dtype; None for an untyped (byte) storage
    nbytes: int


@dataclass(frozen=True)
class _TensorRef(_NoState):
    storage: _Storage
    st: str
    offset: object  # validated later: elements into the storage
    shape: tuple
    stride: tuple


@dataclass(frozen=True)
class _TensorClass(_NoState):
    """Stand-in for `torch.Tensor` / `torch.nn.Parameter` when named as a type by `_rebuild_from_type_v2`."""

    name: str


def _seq(value: object, what: str) -> tuple:
    if not isinstance(value, tuple | list):
        raise ValueError(f"tensor {what} is a {type(value).__name__}, not a tuple")
    return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage) or storage.st is None:
        raise ValueError("tensor rebuilt from something that is not a typed storage")
    return _TensorRef(storage, storage.st, storage_offset, _seq(size, "size"), _seq(stride, "stride"))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _DType):
        raise ValueError("tensor rebuilt from something that is not a storage and a dtype")
    if dtype.st is None:
        raise ValueError(f"tensor dtype torch.{dtype.name} is not supported")
    return _TensorRef(storage, dtype.st, storage_offset, _seq(size, "size"), _seq(stride, "stride"))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, _TensorRef):
        raise ValueError("parameter rebuilt from something that is not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter) or not isinstance(
            new_type, _TensorClass) or not isinstance(args, tuple):
        raise ValueError("unsupported tensor subclass rebuild")
    return func(*args)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # protocol-2 pickles spell bytes objects as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("unsupported _codecs.encode call")
    return text.encode("latin-1")


_STORAGE_TYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}
_UNSUPPORTED_STORAGE_TYPES = ("ComplexDoubleStorage", "ComplexFloatStorage", "QInt8Storage", "QInt32Storage",
                              "QUInt8Storage", "QUInt4x2Storage", "QUInt2x4Storage")
_TORCH_DTYPES = {
    "float64": "F64", "double": "F64", "float32": "F32", "float": "F32", "float16": "F16", "half": "F16",
    "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "long": "I64",
    "int32": "I32", "int": "I32", "int16": "I16", "short": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16",
    "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}
_UNSUPPORTED_DTYPES = ("complex32", "complex64", "complex128", "cfloat", "cdouble", "float8_e5m2fnuz",
                       "float8_e4m3fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "qint8", "qint32", "quint8",
                       "quint4x2", "quint2x4", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2")


def _allowed() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _TensorClass("Tensor"),
        ("torch._tensor", "Tensor"): _TensorClass("Tensor"),
        ("torch.nn.parameter", "Parameter"): _TensorClass("Parameter"),
        ("_codecs", "encode"): _codecs_encode,
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", None),
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
    }
    for name, st in _STORAGE_TYPES.items():
        allowed[("torch", name)] = _StorageType(name, st)
    for name in _UNSUPPORTED_STORAGE_TYPES:
        allowed[("torch", name)] = _StorageType(name, None, supported=False)
    for name, st in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _DType(name, st)
    for name in _UNSUPPORTED_DTYPES:
        allowed[("torch", name)] = _DType(name, None)
    return allowed


_ALLOWED = _allowed()
_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler (reads never pre-allocate from a claimed length) limited to the allow-list."""

    def __init__(self, data: bytes, where: str, storage) -> None:
        super().__init__(io.BytesIO(data))
        self._where = where
        self._storage = storage

    def find_class(self, module: str, name: str) -> object:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise InputError(f"{self._where}: the restricted pickle loader refuses to load global "
                             f"{_clean(module)}.{_clean(name)} (code or a type it does not allow)")
        return obj

    def persistent_load(self, pid: object) -> object:
        return self._storage(pid)


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


# ---- the Source ----------------------------------------------------------------------------------------------------
class PickleSource(Source):
    """A PyTorch zip checkpoint (one file, or a Hugging Face folder with pytorch_model.bin / its shards)."""

    thread_safe = False  # compressed members are read through one shared ZipFile handle

    format = "pytorch"

    def __init__(self, path: Path, folder: Path | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.store = LocalStore(self.folder, self.stats)
            self.location = str(self.folder)
        else:
            self.store = LocalStore(self.path.parent, self.stats, only=self.path.name)
            self.location = str(self.path)
        self._files = self.store.list_files()
        self._weight_map: dict[str, str] | None = None
        self.weight_files = self._find_weight_files()
        self._zips: dict[str, _ZipCheckpoint] = {}
        self._tensors: dict[str, TensorInfo] | None = None
        self._locs: dict[str, _Loc] = {}

    # ---- weights -------------------------------------------------------------------------------------------
    def _find_weight_files(self) -> list[str]:
        if self.folder is None:
            return [self.path.name]
        names = {f.name for f in self._files}
        if PICKLE_INDEX_NAME in names:
            index = self.json_file(PICKLE_INDEX_NAME) or {}
            wmap = index.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise InputError(f"{self.location}: {PICKLE_INDEX_NAME} has no weight_map")
            shards = sorted({str(v) for v in wmap.values()})
            for s in shards:
                self.store.path(s)  # refuses absolute names and `..`
                if s not in names:
                    raise InputError(f"{self.location}: missing shard {_clean(s)} named in {PICKLE_INDEX_NAME}")
            self._weight_map = {str(k): str(v) for k, v in wmap.items()}
            return shards
        try:
            rel = self.path.resolve().relative_to(self.folder.resolve())
        except ValueError:
            raise InputError(f"{self.path}: not inside {self.folder}") from None
        name = rel.as_posix()
        if name not in names:
            raise InputError(f"{self.location}: missing file {_clean(name)}")
        return [name]

    def _zip(self, weight_file: str) -> _ZipCheckpoint:
        z = self._zips.get(weight_file)
        if z is None:
            where = str(self.path) if self.folder is None else f"{self.location}: {weight_file}"
            z = _ZipCheckpoint(self.store, weight_file, where)
            self._zips[weight_file] = z
        return z

    def tensors(self) -> Mapping[str, TensorInfo]:
        if self._tensors is None:
            out: dict[str, TensorInfo] = {}
            for wf in self.weight_files:
                z = self._zip(wf)
                state = _unwrap(z.load(), z.where)
                for key, ref in state.items():
                    if not isinstance(ref, _TensorRef) or not isinstance(key, str):
                        continue
                    if key in out:
                        raise InputError(f"{self.location}: tensor {key!r} appears in two shards")
                    out[key] = self._tensor_info(z, key, ref)
            if not out:
                raise InputError(f"{self.location}: the checkpoint holds no tensors")
            if self._weight_map is not None:
                for name, shard in self._weight_map.items():
                    got = out.get(name)
                    if got is None:
                        raise InputError(f"{self.location}: {PICKLE_INDEX_NAME} lists {name!r} in {_clean(shard)} "
                                         "but it is not there")
                    if got.file != shard:
                        raise InputError(f"{self.location}: {PICKLE_INDEX_NAME} lists {name!r} in "
                                         f"{_clean(shard)}, found in {_clean(got.file)}")
            self._tensors = out
        return self._tensors

    def _tensor_info(self, z: _ZipCheckpoint, name: str, ref: _TensorRef) -> TensorInfo:
        where = f"{z.where}: tensor {name!r}"

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(ref.storage, _Storage) or ref.st not in SAFETENSORS_DTYPES:
            raise InputError(f"{where} has no readable storage")
        shape, stride, offset = ref.shape, ref.stride, ref.offset
        if len(shape) > MAX_RANK or not all(is_int(d) and d >= 0 for d in shape):
            raise InputError(f"{where} has an invalid shape {_clean(shape)}")
        if len(stride) != len(shape) or not all(is_int(s) and s >= 0 for s in stride):
            raise InputError(f"{where} has invalid strides {_clean(stride)}")
        if not is_int(offset) or offset < 0:
            raise InputError(f"{where} has an invalid storage offset {_clean(offset)}")
        itemsize = SAFETENSORS_DTYPES[ref.st].itemsize
        capacity = ref.storage.nbytes // itemsize  # elements the storage holds
        if 0 in shape:
            numel = 0
        else:
            if any(d > capacity for d in shape):
                raise InputError(f"{where} claims shape {_clean(shape)}, larger than its storage")
            numel = math.prod(shape)
        nz = [(d, s) for d, s in zip(shape, stride, strict=True) if d != 1]
        contiguous = all(s == c for (d, s), c in zip(nz, _contiguous_strides(tuple(d for d, _ in nz)),
                                                       strict=True))
        extent = 0 if numel == 0 else 1 + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
        if numel and offset + extent > capacity:
            raise InputError(f"{where} reaches past the end of its storage (offset {offset}, shape "
                             f"{_clean(shape)}, storage {capacity} elements); truncated or hostile")
        data_offset = z.data_offset(ref.storage.member)
        in_member = offset * itemsize
        self._locs[name] = _Loc(z.weight_file, ref.storage.member, data_offset, in_member, contiguous,
                                tuple(stride))
        abs_offset = in_member if data_offset is None else data_offset + in_member
        return TensorInfo(name, ref.st, tuple(shape), numel * itemsize, z.weight_file, abs_offset)

    def _span(self, info: TensorInfo, start: int, stop: int) -> tuple[_Loc, int, int]:
        loc = self._locs[info.name]
        if not loc.contiguous:
            raise InputError(f"{self.location}: tensor {info.name!r} is stored non-contiguously (strides "
                             f"{loc.stride}); not supported, convert to safetensors")
        row_bytes = info.cols * SAFETENSORS_DTYPES[info.dtype].itemsize
        return loc, loc.offset_in_member + start * row_bytes, (stop - start) * row_bytes

    def _read_bytes(self, info: TensorInfo, start: int, stop: int, transient: bool = False) -> bytes | memoryview:
        loc, off, length = self._span(info, start, stop)
        z = self._zip(loc.weight_file)
        if loc.data_offset is None:
            return z.read_member(loc.member, off, length)
        read = self.store.read_transient if transient else self.store.read
        return read(loc.weight_file, loc.data_offset + off, length)

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        raw = self._read_bytes(info, start, stop, transient=True)  # decode copies out of the reused buffer
        return decode(raw, info.dtype).reshape(stop - start, info.cols)

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> bytes:
        info = self.info(name)
        stop = info.rows if stop is None else min(stop, info.rows)
        if start < 0 or start > stop:
            raise InputError(f"{self.location}: bad row range [{start}, {stop}) for {name}")
        return bytes(self._read_bytes(info, start, stop)) if stop > start else b""

    # ---- files ---------------------------------------------------------------------------------------------
    def files(self) -> list[FileInfo]:
        return list(self._files)

    def _check_name(self, name: str) -> bool:
        """True if `name` is one of this source's files; InputError for names escaping the folder."""
        if self.folder is None:
            return name == self.path.name
        self.store.path(name)  # raises InputError for absolute names and `..`
        return any(f.name == name for f in self._files)

    def read_file(self, name: str, limit: int = MAX_TEXT_BYTES) -> bytes | None:
        if not self._check_name(name):
            return None
        size = self.store.size(name)
        if size > limit:
            raise InputError(f"{self.location}: {name} is {size} bytes, larger than the {limit}-byte limit")
        return bytes(self.store.read(name, 0, size)) if size else b""

    def config(self) -> dict | None:
        if self.folder is None:
            return None
        return super().config()

    def file_sha256(self, name: str) -> str:
        if not self._check_name(name):
            raise InputError(f"{self.location}: no file named {name!r}")
        return self.store.sha256(name)

    def close(self) -> None:
        for z in self._zips.values():
            z.close()
        self._zips.clear()
        self.store.close()
