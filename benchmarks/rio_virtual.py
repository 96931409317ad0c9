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
"""

from __future__ import annotations

import hashlib
import json
import struct
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = ["RioShape", "VirtualModel", "rio_family"]

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


def rio_family(shape: RioShape) -> dict[str, VirtualModel]:
    """Repository id -> virtual model: the merge, its parents, a sibling of one parent and an independent model."""
    return {f"bench/{k}": VirtualModel(shape, k, k) for k in ("rio", "nex", "qwen", "sibling", "indep")}
