"""Virtual checkpoints of the Rio case's shape, served by tests/hubserver.py: nothing is stored, every byte is made
on demand from a counter-based hash, so any range of any tensor costs only its own size to produce.

Shape (`RioShape`, qwen3_5_moe_text-like): `layers` decoder layers, every 4th with full attention (gated q, k, v, o,
q/k norms) and the others linear attention (in_proj_qkvz, in_proj_ba, conv1d, A_log, dt_bias, norm, out_proj);
each with a router, `experts` routed experts stored per expert (gate/up/down), a shared expert and its gate, two
norms; embeddings and lm_head of `vocab` rows; bf16; spread over `shards` files. `RioShape.full()` is the 397B
shape (60 layers, 512 experts, hidden 4096, vocab 248,320: ~93k tensors in 94 shards); `small()` a scaled-down one
this 2-core machine can stream in a benchmark.

Models (`VirtualModel`): qwen = base noise; nex = qwen + a fine-tune delta; sibling = qwen + another delta;
rio = bf16(0.6 nex + 0.4 qwen) elementwise (the merge, rounded once); indep = other base noise. Values of element i
of tensor t are a function of (model seed, t, i) only.

`VirtualGGUF`: one of these models as llama.cpp would publish it (architecture qwen35moe, experts stacked per layer
into one [experts, rows, cols] tensor, matrices Q6_K or IQ4_XS, norms and routers F32): each requested byte range
is made by generating the bf16 rows it covers and quantizing them. The linear-attention input projections, which
llama.cpp re-splits, and conv1d/A_log/dt_bias are left out (the audit compares the slots the copies share).
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np

__all__ = ["RioShape", "VirtualModel", "VirtualGGUF", "rio_family", "iq4_xs"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
ROW_BLOCK = 1 << 16  # elements generated per vectorised step


@dataclass(frozen=True)
class RioShape:
    layers: int = 60
    experts: int = 512
    hidden: int = 4096
    moe_inter: int = 1024
    vocab: int = 248_320
    heads: int = 32
    kv_heads: int = 2
    head_dim: int = 256
    lin_k_heads: int = 16
    lin_v_heads: int = 64
    lin_head_dim: int = 128
    shards: int = 94

    @classmethod
    def full(cls) -> RioShape:
        return cls()

    @classmethod
    def small(cls) -> RioShape:
        return cls(layers=8, experts=32, hidden=512, moe_inter=128, vocab=8192, heads=8, kv_heads=2, head_dim=64,
                   lin_k_heads=4, lin_v_heads=8, lin_head_dim=32, shards=8)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, out = self.hidden, [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        lk, lv, ld = self.lin_k_heads * self.lin_head_dim, self.lin_v_heads * self.lin_head_dim, self.lin_head_dim
        for L in range(self.layers):
            p = f"model.layers.{L}."
            if L % 4 == 3:
                q = self.heads * self.head_dim
                out += [(p + "self_attn.q_proj.weight", (2 * q, h)),
                        (p + "self_attn.k_proj.weight", (self.kv_heads * self.head_dim, h)),
                        (p + "self_attn.v_proj.weight", (self.kv_heads * self.head_dim, h)),
                        (p + "self_attn.o_proj.weight", (h, q)),
                        (p + "self_attn.q_norm.weight", (self.head_dim,)),
                        (p + "self_attn.k_norm.weight", (self.head_dim,))]
            else:
                out += [(p + "linear_attn.in_proj_qkvz.weight", (2 * lk + 2 * lv, h)),
                        (p + "linear_attn.in_proj_ba.weight", (2 * self.lin_v_heads, h)),
                        (p + "linear_attn.conv1d.weight", (2 * lk + lv, 1, 4)),
                        (p + "linear_attn.A_log", (self.lin_v_heads,)),
                        (p + "linear_attn.dt_bias", (self.lin_v_heads,)),
                        (p + "linear_attn.norm.weight", (ld,)),
                        (p + "linear_attn.out_proj.weight", (h, lv))]
            out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate.weight", (self.experts, h)),
                    (p + "mlp.shared_expert.gate_proj.weight", (self.moe_inter, h)),
                    (p + "mlp.shared_expert.up_proj.weight", (self.moe_inter, h)),
                    (p + "mlp.shared_expert.down_proj.weight", (h, self.moe_inter)),
                    (p + "mlp.shared_expert_gate.weight", (1, h))]
            for e in range(self.experts):
                out += [(p + f"mlp.experts.{e}.gate_proj.weight", (self.moe_inter, h)),
                        (p + f"mlp.experts.{e}.up_proj.weight", (self.moe_inter, h)),
                        (p + f"mlp.experts.{e}.down_proj.weight", (h, self.moe_inter))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def config(self) -> dict:
        return {"model_type": "qwen3_5_moe_text", "architectures": ["Qwen3_5MoeForCausalLM"],
                "hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_experts": self.experts,
                "num_experts_per_tok": 10, "moe_intermediate_size": self.moe_inter,
                "shared_expert_intermediate_size": self.moe_inter, "vocab_size": self.vocab,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "torch_dtype": "bfloat16", "full_attention_interval": 4}


def _noise(seed: int, tensor: int, start: int, n: int) -> np.ndarray:
    """Approximately N(0, 1) float32 values of elements [start, start + n) (splitmix64, Irwin-Hall of 4)."""
    idx = np.arange(start, start + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = idx + np.uint64((seed * 1_000_003 + tensor * 7_919) & 0xFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    parts = z.view(np.uint16).reshape(n, 4).astype(np.float32)
    return (parts.sum(axis=1) - 4 * 32767.5) * np.float32(1 / (32767.5 * 1.1547))


class VirtualModel:
    """One model of the family as a RepoFiles for tests/hubserver.py (sizes, ranged chunks, ETags)."""

    def __init__(self, shape: RioShape, kind: str, name: str) -> None:
        self.shape, self.kind, self.name = shape, kind, name
        tensors = shape.tensors()
        per = -(-len(tensors) // shape.shards)
        self.files: dict[str, bytes] = {}
        self.layout: dict[str, tuple[int, list[int], list[tuple[int, tuple[int, ...]]]]] = {}
        wmap = {}
        tid = 0
        for s in range(shape.shards):
            fname = f"model-{s + 1:05d}-of-{shape.shards:05d}.safetensors"
            chunk = tensors[s * per:(s + 1) * per]
            header, off, starts, items = {}, 0, [], []
            for tname, shp in chunk:
                n = int(np.prod(shp)) * 2
                header[tname] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + n]}
                starts.append(off)
                items.append((tid, shp))
                wmap[tname] = fname
                tid += 1
                off += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self.files[fname] = struct.pack("<Q", len(raw)) + raw
            self.layout[fname] = (off, starts, items)
        self.files["config.json"] = json.dumps(shape.config()).encode()
        self.files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": wmap}).encode()
        self.files["README.md"] = f"---\nlicense: apache-2.0\n---\n# {name}\n".encode()

    # ---- values --------------------------------------------------------------------------------------------
    def values(self, tensor: int, start: int, n: int) -> np.ndarray:
        """bf16 elements [start, start + n) of tensor number `tensor`."""
        def base(seed: int) -> np.ndarray:
            return _noise(seed, tensor, start, n) * np.float32(0.02)

        def bf(x: np.ndarray) -> np.ndarray:
            return x.astype(ml_dtypes.bfloat16)

        if self.kind == "indep":
            return bf(base(7))
        qwen = base(1)
        if self.kind == "qwen":
            return bf(qwen)
        if self.kind == "sibling":
            return bf(qwen + base(3) * np.float32(0.25))
        nex = bf(qwen + base(2) * np.float32(0.25))
        if self.kind == "nex":
            return nex
        assert self.kind == "rio"
        return bf(np.float32(0.6) * nex.astype(np.float32) + np.float32(0.4) * bf(qwen).astype(np.float32))

    # ---- RepoFiles -----------------------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        return {n: len(b) + (self.layout[n][0] if n in self.layout else 0) for n, b in self.files.items()}

    def is_lfs(self, name: str) -> bool:
        return name.endswith(".safetensors")

    def etag(self, name: str) -> str:
        algo = hashlib.sha256 if self.is_lfs(name) else hashlib.sha1
        return algo(f"{self.kind}/{self.name}/{name}/{self.shape}".encode()).hexdigest()

    def chunks(self, name: str, start: int, length: int) -> Iterator[bytes]:
        head = self.files[name]
        end = start + length
        if start < len(head):
            yield head[start:min(end, len(head))]
            start = len(head)
        if start >= end or name not in self.layout:
            return
        data_len, starts, items = self.layout[name]
        a, b = start - len(head), min(end - len(head), data_len)
        i = bisect_right(starts, a) - 1
        while a < b and i < len(items):
            t0 = starts[i]
            tid, shp = items[i]
            t1 = t0 + int(np.prod(shp)) * 2
            lo, hi = max(a, t0), min(b, t1)
            e0, e1 = (lo - t0) // 2, -(-(hi - t0) // 2)
            for s in range(e0, e1, ROW_BLOCK):
                n = min(ROW_BLOCK, e1 - s)
                raw = self.values(tid, s, n).tobytes()
                cut0 = (lo - t0) - 2 * s if s == e0 else 0
                cut1 = (hi - t0) - 2 * s
                yield raw[max(0, cut0):min(len(raw), cut1)]
            a = hi
            i += 1


def rio_family(shape: RioShape) -> dict[str, VirtualModel | VirtualGGUF]:
    """Repository id -> virtual model: the merge, its parents, a sibling of one parent, an independent model, and
    the merge as GGUF (Q6_K, IQ4_XS)."""
    out: dict[str, VirtualModel | VirtualGGUF] = {
        f"bench/{k}": VirtualModel(shape, k, k) for k in ("rio", "nex", "qwen", "sibling", "indep")}
    out["bench/rio-gguf-q6k"] = VirtualGGUF(shape, "rio", "Q6_K")
    out["bench/rio-gguf-iq4xs"] = VirtualGGUF(shape, "rio", "IQ4_XS")
    return out


# ---- GGUF ----------------------------------------------------------------------------------------------------
def iq4_xs(x: np.ndarray) -> np.ndarray:
    from disguise import _iq4_xs as encode  # tests/disguise.py (on sys.path in the benchmark)

    return encode(x)


def _q6_k(x: np.ndarray) -> np.ndarray:
    from disguise import _q6_k as encode  # tests/disguise.py (on sys.path in the benchmark)

    return encode(x)


_Q = gguf.GGMLQuantizationType
_ENCODERS = {"Q6_K": (_q6_k, 210), "IQ4_XS": (iq4_xs, 136)}


class VirtualGGUF:
    """One model of the family as a single GGUF file (see the module docstring), a RepoFiles for tests/hubserver."""

    def __init__(self, shape: RioShape, kind: str = "rio", qtype: str = "Q6_K") -> None:
        self.shape, self.kind, self.qtype = shape, kind, qtype
        self.model = VirtualModel(shape, kind, kind)
        self.fname = f"{kind}-{qtype}.gguf"
        ids = {name: i for i, (name, _) in enumerate(shape.tensors())}
        shapes = dict(shape.tensors())
        items: list[tuple[str, tuple[int, ...], list[int], str]] = []  # gguf name, shape, source ids, storage

        def add(gname: str, hf: str, storage: str | None = None) -> None:
            shp = shapes[hf]
            store = storage or ("F32" if len(shp) == 1 or shp[0] == 1 else qtype)
            if store == qtype and shp[-1] % 256:
                store = "F16"
            items.append((gname, shp, [ids[hf]], store))

        add("token_embd.weight", "model.embed_tokens.weight")
        for L in range(shape.layers):
            p, b = f"model.layers.{L}.", f"blk.{L}."
            add(b + "attn_norm.weight", p + "input_layernorm.weight")
            add(b + "post_attention_norm.weight", p + "post_attention_layernorm.weight")
            if L % 4 == 3:
                for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                             ("attn_output", "o_proj"), ("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")):
                    add(f"{b}{g}.weight", f"{p}self_attn.{h}.weight")
            else:
                add(b + "ssm_out.weight", p + "linear_attn.out_proj.weight")
            add(b + "ffn_gate_inp.weight", p + "mlp.gate.weight", "F32")
            add(b + "ffn_gate_inp_shexp.weight", p + "mlp.shared_expert_gate.weight", "F32")
            for g, h in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                add(f"{b}ffn_{g}_shexp.weight", f"{p}mlp.shared_expert.{h}.weight")
                first = shapes[f"{p}mlp.experts.0.{h}.weight"]
                store = qtype if first[-1] % 256 == 0 else "F16"
                items.append((f"{b}ffn_{g}_exps.weight", (shape.experts, *first),
                              [ids[f"{p}mlp.experts.{e}.{h}.weight"] for e in range(shape.experts)], store))
        add("output_norm.weight", "model.norm.weight")
        add("output.weight", "lm_head.weight")

        w = gguf.GGUFWriter(None, "qwen35moe")
        w.add_block_count(shape.layers)
        w.add_context_length(262_144)
        w.add_embedding_length(shape.hidden)
        w.add_head_count(shape.heads)
        w.add_head_count_kv(shape.kv_heads)
        w.add_key_length(shape.head_dim)
        w.add_expert_count(shape.experts)
        w.add_expert_used_count(10)
        w.add_expert_feed_forward_length(shape.moe_inter)
        w.add_vocab_size(shape.vocab)
        self.items: list[tuple[int, int, int, tuple[int, ...], list[int], str]] = []  # offset, nbytes, row bytes...
        off = 0
        for gname, shp, src, store in items:
            rows, cols = int(np.prod(shp[:-1])), shp[-1]
            row_bytes = {"F32": 4 * cols, "F16": 2 * cols}.get(store) or cols // 256 * _ENCODERS[store][1]
            n = rows * row_bytes
            raw = None if store in ("F32", "F16") else _Q[store]
            w.add_tensor_info(gname, shp, np.float32 if store == "F32" else np.float16, n, raw_dtype=raw)
            self.items.append((off, n, row_bytes, shp, src, store))
            off += n + (-n % 32)
        self.data_len = off
        with tempfile.TemporaryDirectory() as tmp:
            w.path = Path(tmp) / "h.gguf"
            w.write_header_to_file(w.path)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            w.close()
            head = (Path(tmp) / "h.gguf").read_bytes()
        self.head = head + b"\0" * (-len(head) % 32)
        self._starts = [it[0] for it in self.items]

    # ---- RepoFiles -----------------------------------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        return {self.fname: len(self.head) + self.data_len, "README.md": len(self._card())}

    def _card(self) -> bytes:
        return (f"---\nlicense: apache-2.0\nbase_model: bench/{self.kind}\nbase_model_relation: quantized\n---\n"
                f"# {self.kind} {self.qtype}\n").encode()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(".gguf")

    def etag(self, name: str) -> str:
        algo = hashlib.sha256 if self.is_lfs(name) else hashlib.sha1
        return algo(f"gguf/{self.kind}/{self.qtype}/{name}/{self.shape}".encode()).hexdigest()

    def _rows(self, src: list[int], shp: tuple[int, ...], store: str, r0: int, r1: int) -> bytes:
        """Stored bytes of rows [r0, r1) of a (possibly stacked) tensor."""
        cols = shp[-1]
        per = int(np.prod(shp[1:-1])) if len(shp) == 3 else int(np.prod(shp[:-1]))
        parts = []
        r = r0
        while r < r1:
            t = 0 if len(src) == 1 else r // per
            a = r - t * per if len(src) > 1 else r
            n = min(r1 - r, (per - a) if len(src) > 1 else r1 - r)
            x = self.model.values(src[t], a * cols, n * cols).astype(np.float32).reshape(n, cols)
            if store == "F32":
                parts.append(x.tobytes())
            elif store == "F16":
                parts.append(x.astype(np.float16).tobytes())
            else:
                parts.append(_ENCODERS[store][0](x).tobytes())
            r += n
        return b"".join(parts)

    def chunks(self, name: str, start: int, length: int) -> Iterator[bytes]:
        if name == "README.md":
            yield self._card()[start:start + length]
            return
        end = start + length
        if start < len(self.head):
            yield self.head[start:min(end, len(self.head))]
            start = len(self.head)
        a, b = start - len(self.head), end - len(self.head)
        i = max(0, bisect_right(self._starts, a) - 1)
        while a < b and i < len(self.items):
            off, n, row_bytes, shp, src, store = self.items[i]
            if a < off:  # alignment padding before this tensor
                pad = min(b, off) - a
                yield b"\0" * pad
                a += pad
                continue
            if a >= off + n:
                i += 1
                continue
            lo, hi = a - off, min(b - off, n)
            r0, r1 = lo // row_bytes, -(-hi // row_bytes)
            for c in range(r0, r1, 64):
                raw = self._rows(src, shp, store, c, min(r1, c + 64))
                s0 = lo - c * row_bytes if c == r0 else 0
                yield raw[s0:min(len(raw), hi - c * row_bytes)]
            a = off + hi
        if a < b:  # padding after the last tensor
            yield b"\0" * (b - a)
