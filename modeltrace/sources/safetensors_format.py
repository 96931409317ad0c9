"""Strict parsing of safetensors headers and row-range reads over any ByteStore.

The header is validated before anything is allocated: its length against the file, every tensor's byte span against
its dtype and shape, spans inside the data section and not overlapping. A hostile header therefore cannot make us
allocate or read more than the file holds.
"""

from __future__ import annotations

import json
import struct
import sys

import numpy as np

from modeltrace.errors import InputError
from modeltrace.sources.base import TensorInfo
from modeltrace.sources.bytestore import ByteStore
from modeltrace.sources.dtypes import SAFETENSORS_DTYPES, decode

#: Real headers are a few MB even for 100k-tensor shards; the format itself caps them at 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Bounds on a shape, so that a hostile one stays cheap to multiply out (torch itself allows 64 dimensions).
MAX_RANK = 64
MAX_DIM = 2**63 - 1
_DIMS: dict[int, int] = {}  # dimension values seen, one int object shared by every shape (at most 65,536 kept)
_SHAPES: dict[tuple, tuple[tuple[int, ...], int]] = {}  # (dtype, shape) validated -> (canonical shape, bytes)
#: Bytes of header fetched with the 8-byte length prefix in one request (remote stores) when nothing tells its size;
#: a larger header costs a second request for the rest.
HEADER_AHEAD = 64 * 1024


def parse_header(store: ByteStore, name: str, file_size: int | None = None, ahead: int = HEADER_AHEAD
                 ) -> tuple[dict[str, TensorInfo], dict]:
    """Read and validate one safetensors file's header: (tensors by name, __metadata__). `ahead`: header bytes
    expected, fetched with the length prefix where that saves a request (see `header_estimate`)."""
    where = f"{store.location}: {name}"
    size = store.size(name) if file_size is None else file_size
    if size < 8:
        raise InputError(f"{where} is truncated ({size} bytes; not a safetensors file)")
    (hlen,) = struct.unpack("<Q", store.read_ahead(name, 0, 8, ahead))
    if hlen > MAX_HEADER_BYTES:
        raise InputError(f"{where}: header length {hlen} exceeds the 100 MB limit (corrupt or hostile file)")
    if 8 + hlen > size:
        raise InputError(f"{where}: header length {hlen} is larger than the file ({size} bytes); truncated?")
    raw = store.read(name, 8, hlen)
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also integers of thousands of digits
        raise InputError(f"{where}: header is not valid JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{where}: header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise InputError(f"{where}: header is not a JSON object")
    data_start = 8 + hlen
    data_len = size - data_start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise InputError(f"{where}: __metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for tname, entry in header.items():
        tensors[tname] = _tensor_info(where, name, tname, entry, data_start, data_len)
        b, e = entry["data_offsets"]
        spans.append((b, e, tname))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise InputError(f"{where}: tensors {n0} and {n1} overlap in the data section (corrupt or hostile)")
    return tensors, meta


def header_estimate(names: list[str]) -> int:
    """Header bytes a shard holding these tensors should have (JSON entries of ~90 bytes besides the name), with a
    margin: enough to read most headers with their length prefix in one request, little past them."""
    return int(1.1 * sum(len(n) + 90 for n in names)) + 2048


def _short(value: object, limit: int = 80) -> str:
    """repr of a (possibly hostile, huge) header value, cut to a readable length."""
    if isinstance(value, list) and len(value) > 8:
        return repr(value[:8])[:limit] + f"... ({len(value)} entries)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _tensor_info(where: str, file: str, tname: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: entry for {tname!r} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offs = entry.get("data_offsets")
    # A shape already validated for this dtype (a 93k-tensor MoE has a few dozen distinct ones): its canonical tuple
    # and byte size come from the memo; anything else, hostile input included, takes the full checks below.
    known = None
    if type(dtype) is str and type(shape) is list and len(shape) <= MAX_RANK and all(type(d) is int for d in shape):
        known = _SHAPES.get((dtype, tuple(shape)))  # exact ints only: 1.0 and True hash like 1 but are not shapes
    if known is None:
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise InputError(f"{where}: tensor {tname!r} has unsupported dtype {_short(dtype)}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape):
            raise InputError(f"{where}: tensor {tname!r} has an invalid shape {_short(shape)}")
        numel = 1
        for d in shape:
            numel *= d
        # one int per dimension value for all tensors (a 93k-tensor checkpoint otherwise holds 93k copies of each)
        known = (tuple(_DIMS.get(d) or _dim(d) for d in shape), numel * SAFETENSORS_DTYPES[dtype].itemsize)
        if len(_SHAPES) < 65536:
            _SHAPES[(sys.intern(dtype), known[0])] = known
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise InputError(f"{where}: tensor {tname!r} has invalid data_offsets {_short(offs)}")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise InputError(f"{where}: tensor {tname!r} points outside the file (offsets {begin}-{end}, "
                         f"data section {data_len} bytes); truncated or hostile")
    dims, expect = known
    assert isinstance(dtype, str)  # a memo hit or the checks above: a known dtype name
    if end - begin != expect:
        raise InputError(f"{where}: tensor {tname!r} claims shape {shape} {dtype} ({expect} bytes) but spans "
                         f"{end - begin} bytes")
    return TensorInfo(tname, sys.intern(dtype), dims, expect, file, data_start + begin)


def _dim(d: int) -> int:
    return _DIMS.setdefault(d, d) if len(_DIMS) < 65536 else d


def row_span(info: TensorInfo, start: int, stop: int) -> tuple[int, int]:
    """(absolute offset, length) of rows [start, stop) of a row-major tensor."""
    row_bytes = info.cols * SAFETENSORS_DTYPES[info.dtype].itemsize
    return info.offset + start * row_bytes, (stop - start) * row_bytes


def read_rows(store: ByteStore, info: TensorInfo, start: int, stop: int) -> np.ndarray:
    off, length = row_span(info, start, stop)
    raw = store.read_transient(info.file, off, length)
    return decode(raw, info.dtype).reshape(stop - start, info.cols)  # decode copies out of the transient buffer
