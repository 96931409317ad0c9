"""PyTorch zip checkpoints (`torch.save` since 1.6) read without torch and without running any pickled code.

A zip checkpoint holds `<prefix>/data.pkl` (the pickled object graph), one `<prefix>/data/<key>` member per storage
and `<prefix>/byteorder`. The pickle is read by a restricted unpickler: every global it names must be on a short
allow-list, and each allowed name maps to a harmless stand-in (pickle_restricted.py; never torch or the real function),
so tensors come back as plain records (storage key, dtype, offset, shape, stride). Anything else the pickle asks
for (`os.system`, `builtins.eval`, a custom class) stops the load with an InputError before it can be called.

Tensor data is then read straight from the storage members: torch stores them uncompressed, so a row range is one
positional read at a known offset in the zip file. `TensorInfo.file` is the checkpoint file holding the tensor and
`TensorInfo.offset` the absolute offset of its first byte in that file (for the rare compressed member: the offset
inside the storage member).

The restricted unpickler and its stand-ins are pickle_restricted.py, one zip checkpoint's members and offsets
pickle_zip.py; this module is the Source over one checkpoint file or a folder of shards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from modeltrace.errors import InputError
from modeltrace.sources.base import MAX_TEXT_BYTES, FileInfo, Source, TensorInfo
from modeltrace.sources.bytestore import LocalStore
from modeltrace.sources.dtypes import SAFETENSORS_DTYPES, decode
from modeltrace.sources.pickle_restricted import _clean, _Storage, _TensorRef
from modeltrace.sources.pickle_zip import _contiguous_strides, _Loc, _unwrap, _ZipCheckpoint

PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
MAX_RANK = 64


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
