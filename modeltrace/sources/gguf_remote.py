"""GGUF files read by byte range (an `hf://` repository holding GGUF): the reader of a local GGUF, without the file.

Data flow: the header of each file (one file, or every part of a split `-00001-of-0000N.gguf` set, in parallel) is
fetched by ranged reads from offset 0, growing (1 MiB, then x4) until `header_end` finds the end of the tensor-info
table -> those bytes, and nothing else, are parsed by gguf's own `GGUFReader` (`_HeaderReader` lists tensors without
touching their data, checking that each lies inside its file) -> `GGUFSource` maps names, permutations and config
as for a local file -> row ranges become byte ranges of the store (`_stored`), announced ranges are coalesced and
fetched ahead by the store's planner (`prefetch`), and quantized blocks are dequantized by `gguf.quants`.

A header that is truncated, hostile or larger than MAX_HEADER is a one-line InputError naming the file.
"""

from __future__ import annotations

import re
import struct
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.gguf_reader import ReaderTensor

from modeltrace.errors import InputError
from modeltrace.sources.base import MAX_TEXT_BYTES, FileInfo, TensorInfo
from modeltrace.sources.bytestore import ByteStore
from modeltrace.sources.gguf_source import GGUFSource, _one_line

__all__ = ["RemoteGGUFSource", "header_end", "gguf_choices", "open_gguf_repo", "MAX_HEADER"]

#: The most header bytes read before giving up (real headers, a 256k-token vocabulary included, are ~10-20 MB).
MAX_HEADER = 256 * 1024 * 1024
FIRST_READ = 1024 * 1024
SPLIT_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9
_PLAIN_DTYPES = {gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.F32: np.float32,
                 gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
                 gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
                 gguf.GGMLQuantizationType.I64: np.int64}


class _NeedMore(Exception):
    """The buffer ends before the header does."""


def header_end(buf: bytes, size: int) -> int:
    """Offset where the tensor-info table of a GGUF file of `size` bytes ends, from its first bytes `buf`.

    Raises _NeedMore when `buf` ends first, ValueError when the structure cannot be a GGUF header (counts and lengths
    are checked against the file's size, so a hostile header cannot make this loop long or read far)."""
    n, pos = len(buf), 0

    def take(k: int) -> int:
        nonlocal pos
        if k < 0 or k > size:
            raise ValueError("a length runs past the end of the file")
        if pos + k > n:
            raise _NeedMore
        pos += k
        return pos - k

    if buf[take(4):4] != b"GGUF":
        raise ValueError("GGUF magic invalid")
    order = "<"
    (version,) = struct.unpack_from("<I", buf, take(4))
    if version & 0xFFFF == 0:
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported")
    tensors, kvs = struct.unpack_from(order + "QQ", buf, take(16))
    if kvs * 12 > size or tensors * 24 > size:
        raise ValueError("tensor or metadata count larger than the file")

    def u32() -> int:
        return struct.unpack_from(order + "I", buf, take(4))[0]

    def u64() -> int:
        return struct.unpack_from(order + "Q", buf, take(8))[0]

    def value(kind: int, depth: int = 0) -> None:
        if kind in _SCALAR:
            take(_SCALAR[kind])
        elif kind == _STRING:
            take(u64())
        elif kind == _ARRAY and depth < 4:
            item, count = u32(), u64()
            if item in _SCALAR:
                take(count * _SCALAR[item])
                return
            if count * 8 > size:
                raise ValueError("array longer than the file")
            for _ in range(count):
                value(item, depth + 1)
        else:
            raise ValueError(f"unknown metadata value type {kind}")

    for _ in range(kvs):
        take(u64())  # key
        value(u32())
    for _ in range(tensors):
        take(u64())  # name
        dims = u32()
        if dims > 8:
            raise ValueError(f"a tensor with {dims} dimensions")
        take(8 * dims + 4 + 8)  # dims, type, offset
    return pos


class _HeaderReader(gguf.GGUFReader):
    """gguf's reader over a file's header bytes only: tensors are listed, not mapped (their `data` is an empty
    array of the stored item type), and each must lie inside the real file."""

    def __init__(self, path: Any, size: int) -> None:
        self._size = size
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        seen: set[str] = set()
        for field in fields:
            _len, name_data, _ndims, dims, raw_dtype, offset_tensor = field.parts
            name = str(bytes(name_data), encoding="utf-8")
            if name in seen:
                raise ValueError(f"Found duplicated tensor with name {name}")
            seen.add(name)
            qtype = gguf.GGMLQuantizationType(raw_dtype[0])
            n_elems = int(np.prod([int(d) for d in dims], dtype=object))
            block, type_size = GGML_QUANT_SIZES[qtype]
            if not dims.size or int(dims[0]) % block:
                raise ValueError(f"tensor {name}: rows of {int(dims[0]) if dims.size else 0} elements are not whole "
                                 f"{qtype.name} blocks")
            n_bytes = n_elems * type_size // block
            data_offs = int(start_offs + int(offset_tensor[0]))
            if data_offs + n_bytes > self._size:
                raise ValueError(f"tensor {name} runs past the end of the file (truncated)")
            item = np.dtype(_PLAIN_DTYPES.get(qtype, np.uint8))
            if self.byte_order == "S":
                item = item.newbyteorder("S")
            self.tensors.append(ReaderTensor(name=name, tensor_type=qtype, shape=dims, n_elements=n_elems,
                                             n_bytes=n_bytes, data_offset=data_offs, data=np.empty(0, dtype=item),
                                             field=field))


def read_header(store: ByteStore, name: str, location: str) -> gguf.GGUFReader:
    """Parse one GGUF file's header from ranged reads of `store`; InputError in one line when it is not one."""
    size = store.size(name)
    buf = b""
    want = min(size, FIRST_READ)
    while True:
        if want > len(buf):
            buf += bytes(store.read(name, len(buf), want - len(buf)))
        try:
            end = header_end(buf, size)
            break
        except _NeedMore:
            if len(buf) >= size:
                raise InputError(f"{location}: {name} is not a readable GGUF file (truncated: the header runs past "
                                 f"the end of its {size} bytes)") from None
            if len(buf) >= MAX_HEADER:
                raise InputError(f"{location}: {name}: GGUF header larger than {MAX_HEADER >> 20} MiB; refusing "
                                 "to read further") from None
            want = min(size, MAX_HEADER, len(buf) * 4)
        except (ValueError, struct.error) as exc:
            raise InputError(f"{location}: {name} is not a readable GGUF file (corrupt: {_one_line(exc)})") from None
    try:
        with tempfile.TemporaryFile(prefix="modeltrace-gguf-") as fh:
            fh.write(buf[:end])
            fh.flush()
            return _HeaderReader(fh, size)  # the memory map keeps the (deleted) file's bytes
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # gguf raises ValueError/IndexError/KeyError/... on bad input
        raise InputError(f"{location}: {name} is not a readable GGUF file (corrupt: {_one_line(exc)})") from None


def gguf_choices(names: Iterable[str]) -> dict[str, list[str]]:
    """GGUF files of a repository as choices: a single file, or every part of a split set (named by its first
    part) -> the files it is made of, in order."""
    out: dict[str, list[str]] = {}
    for n in sorted(names):
        if not n.lower().endswith(".gguf"):
            continue
        m = SPLIT_RE.match(n)
        if m is None:
            out[n] = [n]
        else:
            first = f"{m.group(1)}-00001-of-{m.group(3)}.gguf"
            out.setdefault(first, []).append(n)
    return out


class RemoteGGUFSource(GGUFSource):
    """A GGUF file (or split set) of a remote store; see the module docstring."""

    def __init__(self, store: ByteStore, files: list[str], location: str) -> None:
        from modeltrace.sources.base import Source

        Source.__init__(self)
        self.store = store
        store.stats = self.stats
        self.location = location
        self.gguf_files = list(files)
        self.selected_file = files[0]
        n = max(1, min(getattr(store, "parallel", 1), len(files)))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="modeltrace-headers") as pool:
            readers = list(pool.map(lambda f: read_header(store, f, location), files))
        first = readers[0]
        count = first.get_field("split.count")
        if len(files) > 1 and (count is None or int(count.contents()) != len(files)):
            raise InputError(f"{location}: {files[0]} does not describe a split of {len(files)} files")
        self._setup(list(zip(files, readers, strict=True)))

    def _stored(self, info: TensorInfo, count: int, lo: int, hi: int) -> np.ndarray:
        per = info.nbytes // count
        data = self.store.read(info.file, info.offset + lo * per, (hi - lo) * per)
        return np.frombuffer(data, dtype=self._tensor(info).data.dtype).reshape(hi - lo, -1)

    def prefetch(self, reads: Iterable[tuple[str, int, int]]) -> None:
        self.store.prefetch([(info.file, off, n) for info, start, stop in self.planned(reads)
                             for off, n in self._spans(info, start, stop)])

    # ---- files ---------------------------------------------------------------------------------------------
    def files(self) -> list[FileInfo]:
        return [FileInfo(f, self.store.size(f)) for f in self.gguf_files]

    def read_file(self, name: str, limit: int = MAX_TEXT_BYTES) -> bytes | None:
        if name not in self.gguf_files:
            return None
        size = self.store.size(name)
        if size > limit:
            raise InputError(f"{self.location}: {name} is {size} bytes, larger than the {limit}-byte limit")
        return bytes(self.store.read(name, 0, size))

    def card_text(self) -> str | None:
        """The repository's model card (a local GGUF file has none; a Hub repository of GGUFs usually does)."""
        if not self.store.exists("README.md") or self.store.size("README.md") > MAX_TEXT_BYTES:
            return None
        return bytes(self.store.read("README.md", 0, self.store.size("README.md"))).decode("utf-8", "replace")

    def file_sha256(self, name: str) -> str:
        if name not in self.gguf_files:
            raise InputError(f"{self.location}: no file named {name!r} (this source is {', '.join(self.gguf_files)})")
        return self.store.sha256(name)

    def close(self) -> None:
        super().close()
        self.store.close()


def open_gguf_repo(store: ByteStore, names: list[str], file: str | None) -> RemoteGGUFSource:
    """The repository's GGUF model: the one named (a file, or any part of a split set: the whole set), else its only
    GGUF file or split set; a one-line InputError listing the choices when there are several."""
    location = store.location
    choices = gguf_choices(names)
    if file is not None:
        picked = next((parts for first, parts in choices.items() if file == first or file in parts), None)
        if picked is None:
            raise InputError(f"{location}: no GGUF file named {file!r}"
                             + (f" (it holds {_listing(choices)})" if choices else ""))
        return _open(store, picked, f"{location}/{file}")
    if len(choices) == 1:
        return _open(store, next(iter(choices.values())), location)
    raise InputError(f"{location}: holds {len(choices)} GGUF files ({_listing(choices)}); name one, "
                     f"e.g. {location}/{next(iter(choices))}")


def _listing(choices: dict[str, list[str]]) -> str:
    shown = [f + (f" +{len(p) - 1} parts" if len(p) > 1 else "") for f, p in list(choices.items())[:8]]
    return ", ".join(shown) + (f" and {len(choices) - 8} more" if len(choices) > 8 else "")


def _open(store: ByteStore, parts: list[str], location: str) -> RemoteGGUFSource:
    m = SPLIT_RE.match(parts[0])
    if m is not None:
        want = [f"{m.group(1)}-{i:05d}-of-{m.group(3)}.gguf" for i in range(1, int(m.group(3)) + 1)]
        missing = [f for f in want if f not in parts]
        if missing:
            raise InputError(f"{location}: split GGUF {parts[0]} is missing {missing[0]}"
                             + (f" and {len(missing) - 1} more parts" if len(missing) > 1 else ""))
    return RemoteGGUFSource(store, parts, location)
