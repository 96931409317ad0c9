"""The restricted unpickler of PyTorch checkpoints: the globals a state-dict pickle may name, and harmless stand-ins.

Data flow: `_RestrictedUnpickler(data, where, storage)` loads a checkpoint's data.pkl; every global it names is looked
up in `_ALLOWED` (a short allow-list of torch rebuild functions, storage and dtype names, OrderedDict, codecs.encode),
which maps each to a stand-in defined here (never to torch or the real function): tensors come back as `_TensorRef`
records (storage, dtype, offset, shape, stride) for pickle_zip.py to locate. Anything else the pickle asks for
(`os.system`, `builtins.eval`, a custom class) is one InputError before it is called; complex and quantized storage
types and dtypes have stand-ins that refuse them when used. `_clean` makes names from the file safe for messages.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass

from modeltrace.errors import InputError


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
