"""GGUF files (llama.cpp): tensors under Hugging Face names, dequantized row range by row range.

The `gguf` package parses the file (memory-mapped, so nothing is read until a row range is asked for) and does the
dequantization; gguf_names.py maps GGUF names to the HF names the architecture's modeltrace family recognises (from
gguf's own tensor maps, for any architecture). This module reverses dims into numpy order, undoes llama.cpp's Q/K
row permutation where its converter applies it, presents GPT-2's Conv1D matrices in HF's [in, out] orientation, and
synthesizes an HF-like config from the metadata.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import gguf.quants as gguf_quants
import numpy as np

from modeltrace.errors import InputError
from modeltrace.sources.base import MAX_TEXT_BYTES, FileInfo, Source, TensorInfo, sha256_stream
from modeltrace.sources.gguf_names import PERMUTED_ARCHS, hf_class, model_type_for, naming_for

HASH_CHUNK = 8 * 1024 * 1024

_Q = gguf.GGMLQuantizationType
#: types GGUFReader hands back as ordinary numpy element arrays (everything else comes as raw block bytes)
_PLAIN_TYPES = {_Q.F32, _Q.F16, _Q.F64, _Q.I8, _Q.I16, _Q.I32, _Q.I64}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _source_rows(start: int, stop: int, heads: int, total_rows: int) -> np.ndarray:
    """GGUF rows that hold HF rows [start, stop) of a Q/K matrix permuted by llama.cpp.

    llama.cpp stores, within each head of `d` rows, HF row `i * d/2 + j` (i in {0, 1}) at row `2 * j + i`.
    """
    d = total_rows // heads
    half = d // 2
    hf = np.arange(start, stop, dtype=np.int64)
    head, within = np.divmod(hf, d)
    i, j = np.divmod(within, half)
    return head * d + 2 * j + i


class GGUFSource(Source):
    format = "gguf"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.location = str(path)
        if not self.path.is_file():
            raise InputError(f"{self.location}: no such GGUF file")
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the gguf parser raises ValueError/IndexError/KeyError/... on bad input
            raise InputError(f"{self.location}: not a readable GGUF file (truncated or corrupt: {_one_line(exc)})") \
                from None
        self._setup([(self.path.name, reader)])
        # the header (metadata and tensor table) is what was read to list the tensors
        self.stats.add(self.path.name, 0, int(min(reader.data_offset, self.path.stat().st_size)))

    def _setup(self, readers: list[tuple[str, gguf.GGUFReader]]) -> None:
        """Metadata from the first reader, tensors from all of them (a split GGUF: one reader per file)."""
        reader = readers[0][1]
        self._reader: gguf.GGUFReader | None = reader
        self._swapped = reader.byte_order == "S"
        self.arch = self._meta("general.architecture")
        if not isinstance(self.arch, str):
            self.arch = None
        experts = self._as_int(self._arch_meta("expert_count"))
        self.model_type = None if self.arch is None else model_type_for(self.arch, bool(experts))
        self._tensors: dict[str, TensorInfo] = {}
        self._transposed: set[str] = set()  # HF names whose rows are the stored tensor's columns
        self._whole_lock = threading.Lock()
        self._whole: tuple[str, np.ndarray] | None = None  # the last transposed tensor read whole
        self._raw: dict[str, Any] = {}  # HF name -> gguf ReaderTensor
        self._gguf_names: dict[str, str] = {}  # HF name -> GGUF name
        self._build_tensors(readers)

    # ---- metadata ------------------------------------------------------------------------------------------
    def _meta(self, key: str) -> Any:
        reader = self._reader
        if reader is None:
            return None
        field = reader.get_field(key)
        if field is None:
            return None
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError, TypeError):
            return None

    def _arch_meta(self, suffix: str) -> Any:
        return None if self.arch is None else self._meta(f"{self.arch}.{suffix}")

    @staticmethod
    def _as_int(value: Any) -> Any:
        """Metadata integer, or a per-layer list collapsed to one int when every layer agrees."""
        if isinstance(value, list):
            if value and all(v == value[0] for v in value):
                return int(value[0])
            return [int(v) for v in value] if value else None
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        return None

    # ---- tensors -------------------------------------------------------------------------------------------
    def _build_tensors(self, readers: list[tuple[str, gguf.GGUFReader]]) -> None:
        stored = [(file, t) for file, reader in readers for t in reader.tensors]
        n_blocks = self._as_int(self._arch_meta("block_count"))
        n_blocks = n_blocks if isinstance(n_blocks, int) and 0 <= n_blocks <= 100_000 else 0
        if n_blocks == 0:  # fall back to the highest blk.N seen
            nums = [int(m.group(1)) for _, t in stored if (m := re.match(r"blk\.(\d+)\.", t.name))]
            n_blocks = max(nums) + 1 if nums else 0
        self._naming = naming_for(self.arch, self.model_type, n_blocks, [t.name for _, t in stored])
        for file, t in stored:
            hf = self._naming.hf_name(t.name)
            if hf in self._tensors:  # two GGUF tensors claim one HF name: keep the later one's own name
                hf = t.name
            if hf in self._tensors:
                raise InputError(f"{self.location}: tensor {t.name} appears twice")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if len(shape) == 2 and self._naming.transposed(hf):  # GPT-2 Conv1D: GGUF [out, in], HF [in, out]
                shape = shape[::-1]
                self._transposed.add(hf)
            self._tensors[hf] = TensorInfo(
                name=hf,
                dtype=t.tensor_type.name,
                shape=shape,
                nbytes=int(t.n_bytes),
                file=file,
                offset=int(t.data_offset),
            )
            self._raw[hf] = t
            self._gguf_names[hf] = t.name

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    def gguf_name(self, name: str) -> str:
        """The GGUF-native name of a tensor listed under its HF name."""
        self.info(name)
        return self._gguf_names[name]

    def _permute_heads(self, info: TensorInfo) -> int | None:
        """Head count to undo llama.cpp's Q/K permutation with, or None when the tensor is not permuted."""
        if self.arch not in PERMUTED_ARCHS:
            return None
        if info.name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            key = "attention.head_count"
        elif info.name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            key = "attention.head_count_kv"
        else:
            return None
        heads = self._as_int(self._arch_meta(key))
        if heads is None and key.endswith("_kv"):
            heads = self._as_int(self._arch_meta("attention.head_count"))
        if isinstance(heads, list):
            layer = re.search(r"\.layers\.(\d+)\.", info.name)
            heads = heads[int(layer.group(1))] if layer and int(layer.group(1)) < len(heads) else None
        if not isinstance(heads, int) or heads <= 0 or info.rows % (2 * heads):
            raise InputError(f"{self.location}: cannot undo llama.cpp's row permutation of {info.name}: "
                             f"{self.arch}.{key} is missing or does not divide its {info.rows} rows")
        return heads

    def _tensor(self, info: TensorInfo) -> Any:
        if self._reader is None:
            raise InputError(f"{self.location}: source is closed")
        return self._raw[info.name]

    def _stored_count(self, info: TensorInfo) -> int | None:
        """How many rows the stored data has (a transposed tensor's stored rows are its HF columns; a 1-D tensor of
        plain numbers has one per element), or None for a 1-D block-quantized tensor (blocks span its elements)."""
        if info.name in self._transposed:
            return info.cols
        if len(info.shape) <= 1:
            return info.numel if self._tensor(info).tensor_type in _PLAIN_TYPES else None
        return info.rows

    def _stored(self, info: TensorInfo, count: int, lo: int, hi: int) -> np.ndarray:
        """Stored rows [lo, hi) of the tensor's data seen as `count` rows: a (hi - lo, items per row) array of the
        stored item type (numbers, or the raw bytes of quantized blocks). The one place data is read (here: a view
        of the memory map; a remote GGUF reads the byte range)."""
        rows = self._tensor(info).data.reshape(count, -1)
        chunk = rows[lo:hi]
        self.stats.add(info.file, info.offset + lo * rows.strides[0], int(chunk.nbytes))
        return chunk

    def _spans(self, info: TensorInfo, start: int, stop: int) -> list[tuple[int, int]]:
        """Stored byte ranges (offset, length) that reading HF rows [start, stop) touches (for prefetching)."""
        count = self._stored_count(info)
        if count is None or info.name in self._transposed:
            return [(info.offset, info.nbytes)]
        heads = self._permute_heads(info)
        if heads is not None:
            src = _source_rows(start, stop, heads, info.rows)
            start, stop = int(src.min()), int(src.max()) + 1
        per = info.nbytes // max(1, count)
        return [(info.offset + start * per, (stop - start) * per)]

    def _unsupported(self, info: TensorInfo, why: str = "") -> InputError:
        return InputError(f"{self.location}: tensor {self._gguf_names[info.name]} ({info.name}) is stored as "
                          f"{info.dtype}, which cannot be dequantized{why}")

    def _dequantize(self, info: TensorInfo, raw: np.ndarray) -> np.ndarray:
        qtype = self._tensor(info).tensor_type
        if qtype in _PLAIN_TYPES:
            return np.array(raw, dtype=np.float32)
        if self._swapped:
            raise self._unsupported(info, " from a big-endian file")
        try:
            out = gguf_quants.dequantize(np.ascontiguousarray(raw), qtype)
        except NotImplementedError:
            raise self._unsupported(info) from None
        except (ValueError, IndexError) as exc:
            raise InputError(f"{self.location}: tensor {self._gguf_names[info.name]} ({info.dtype}) is corrupt: "
                             f"{_one_line(exc)}") from None
        return np.asarray(out, dtype=np.float32)

    def _read_stored(self, info: TensorInfo, lo: int, hi: int) -> np.ndarray:
        """Stored rows [lo, hi), dequantized to float32 (hi - lo, cols)."""
        count = self._stored_count(info)
        if count is None:  # 1-D block-quantized tensor: blocks span "rows", so dequantize it whole (it is small)
            return self._dequantize(info, self._stored(info, 1, 0, 1).reshape(-1)).reshape(-1, 1)[lo:hi]
        return self._dequantize(info, self._stored(info, count, lo, hi)).reshape(hi - lo, info.cols)

    def _read_transposed(self, info: TensorInfo) -> np.ndarray:
        """A tensor the family stores [in, out] (GGUF: [out, in]), whole, in the family's orientation. Its HF rows
        are stored columns, so it is dequantized whole (these are GPT-2's small Conv1D matrices); the last one is
        kept for the next row range."""
        with self._whole_lock:
            if self._whole is not None and self._whole[0] == info.name:
                return self._whole[1]
        raw = self._stored(info, info.cols, 0, info.cols)
        stored = self._dequantize(info, raw).reshape(info.cols, info.rows)
        whole = np.ascontiguousarray(stored.T)
        with self._whole_lock:
            self._whole = (info.name, whole)
        return whole

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        if info.name in self._transposed:
            return self._read_transposed(info)[start:stop].copy()
        heads = self._permute_heads(info)
        if heads is None:
            return self._read_stored(info, start, stop)
        src = _source_rows(start, stop, heads, info.rows)
        lo, hi = int(src.min()), int(src.max()) + 1
        return self._read_stored(info, lo, hi)[src - lo]

    def read_raw(self, name: str, start: int = 0, stop: int | None = None) -> bytes:
        """Stored bytes of HF rows [start, stop) (for llama Q/K: the stored rows that hold them, in HF order)."""
        info = self.info(name)
        stop = info.rows if stop is None else min(stop, info.rows)
        if start < 0 or start > stop:
            raise InputError(f"{self.location}: bad row range [{start}, {stop}) for {name}")
        count = self._stored_count(info)
        if info.name in self._transposed:
            if self._tensor(info).tensor_type not in _PLAIN_TYPES:
                raise InputError(f"{self.location}: {name} is a transposed {info.dtype} tensor; its rows have no "
                                 "bytes of their own")
            stored = self._stored(info, info.cols, 0, info.cols)
            return np.ascontiguousarray(stored.reshape(info.cols, info.rows).T[start:stop]).tobytes()
        if count is None:
            if (start, stop) != (0, info.rows):
                raise InputError(f"{self.location}: {name} is a 1-D {info.dtype} tensor; only all of it has bytes")
            return self._stored(info, 1, 0, 1).tobytes()
        heads = self._permute_heads(info) if stop > start else None
        if heads is None:
            return self._stored(info, count, start, stop).tobytes()
        src = _source_rows(start, stop, heads, info.rows)
        lo, hi = int(src.min()), int(src.max()) + 1
        return self._stored(info, count, lo, hi)[src - lo].tobytes()

    # ---- config and tokenizer ------------------------------------------------------------------------------
    def config(self) -> dict | None:
        if self.arch is None:
            return None
        cfg: dict[str, Any] = {"model_type": self.model_type}
        cls = hf_class(self.model_type, self.arch)
        if cls:
            cfg["architectures"] = [cls]
        fields = {
            "hidden_size": "embedding_length",
            "num_hidden_layers": "block_count",
            "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv",
            "intermediate_size": "feed_forward_length",
            "vocab_size": "vocab_size",
            "max_position_embeddings": "context_length",
            "head_dim": "attention.key_length",
            "num_experts": "expert_count",
            "num_experts_per_tok": "expert_used_count",
            "moe_intermediate_size": "expert_feed_forward_length",
            "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
        }
        for hf_key, suffix in fields.items():
            value = self._as_int(self._arch_meta(suffix))
            if value is not None:
                cfg[hf_key] = value
        if "num_key_value_heads" not in cfg and "num_attention_heads" in cfg:
            cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        if "vocab_size" not in cfg:
            tokens = self._token_count()
            if tokens:
                cfg["vocab_size"] = tokens
            elif "model.embed_tokens.weight" in self._tensors:
                cfg["vocab_size"] = self._tensors["model.embed_tokens.weight"].shape[0]
        for hf_key, suffix in (("rope_theta", "rope.freq_base"), ("rms_norm_eps", "attention.layer_norm_rms_epsilon")):
            value = self._arch_meta(suffix)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                cfg[hf_key] = float(value)
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        cfg["_source"] = "gguf"
        return cfg

    def _token_count(self) -> int | None:
        reader = self._reader
        field = reader.get_field("tokenizer.ggml.tokens") if reader is not None else None
        return len(field.data) if field is not None else None

    def _token_text(self, key: str) -> str | None:
        token_id = self._as_int(self._meta(key))
        reader = self._reader
        field = reader.get_field("tokenizer.ggml.tokens") if reader is not None else None
        if not isinstance(token_id, int) or field is None or not 0 <= token_id < len(field.data):
            return None
        try:
            return field.contents(token_id)
        except (ValueError, IndexError, UnicodeDecodeError):
            return None

    def native_tokenizer(self) -> dict | None:
        model = self._meta("tokenizer.ggml.model")
        count = self._token_count()
        if model is None and count is None:
            return None
        return {
            "type": model if isinstance(model, str) else None,
            "vocab_size": count,
            "special_tokens": {
                "bos": self._token_text("tokenizer.ggml.bos_token_id"),
                "eos": self._token_text("tokenizer.ggml.eos_token_id"),
            },
            "chat_template": bool(self._meta("tokenizer.chat_template")),
        }

    # ---- files ---------------------------------------------------------------------------------------------
    def files(self) -> list[FileInfo]:
        return [FileInfo(self.path.name, self.path.stat().st_size)]

    def read_file(self, name: str, limit: int = MAX_TEXT_BYTES) -> bytes | None:
        if name != self.path.name:
            return None
        size = self.path.stat().st_size
        if size > limit:
            raise InputError(f"{self.location}: {name} is {size} bytes, larger than the {limit}-byte limit")
        data = self.path.read_bytes()
        self.stats.add(name, 0, len(data))
        return data

    def card_text(self) -> str | None:
        return None

    def file_sha256(self, name: str) -> str:
        if name != self.path.name:
            raise InputError(f"{self.location}: no file named {name!r} (a GGUF source is the one file)")

        def chunks():
            with open(self.path, "rb") as fh:
                offset = 0
                while block := fh.read(HASH_CHUNK):
                    self.stats.add(name, offset, len(block))
                    offset += len(block)
                    yield block

        return sha256_stream(chunks())

    def close(self) -> None:
        self._reader = None
        self._raw = {}
        self._whole = None
