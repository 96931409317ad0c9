"""Synthetic models for the fingerprint and index benchmarks (and their tests).

- `HeaderOnlySource`: a 397B-class MoE (the Rio case's shape: 60 layers, 512 routed experts, fused transformers-5
  expert tensors) that exists only as headers; rows are generated on demand, deterministically, so a fingerprint of
  it is computed for real and its reads are counted as if they were bf16 bytes.
- `write_moe_checkpoint`: a real sharded bf16 safetensors checkpoint of the same proportions, for HTTP Range tests.
- `family_fingerprints`: fingerprints made directly at the sample level (no weights), for a 10,000-model index:
  independent families plus a planted lineage (base, two fine-tunes, their merges).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from modeltrace.architectures import Part, Slot, is_structured
from modeltrace.fingerprint.core import Fingerprint, SlotSample, _moments
from modeltrace.fingerprint.robust import RobustSection, _splitmix, from_names
from modeltrace.fingerprint.sampling import plan
from modeltrace.sources.base import FileInfo, Source, TensorInfo


def moe_tensors(layers: int = 60, experts: int = 512, hidden: int = 4096, moe_inter: int = 1024, heads: int = 32,
                kv_heads: int = 2, head_dim: int = 256, vocab: int = 248320, shards: int = 94
                ) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor headers of a Qwen3.5-397B-A17B-like checkpoint (bf16), spread over `shards` files."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,)),
            (p + "mlp.gate.weight", (experts, hidden)),
            (p + "mlp.experts.gate_up_proj", (experts, 2 * moe_inter, hidden)),
            (p + "mlp.experts.down_proj", (experts, hidden, moe_inter)),
            (p + "mlp.shared_expert.gate_proj.weight", (moe_inter, hidden)),
            (p + "mlp.shared_expert.up_proj.weight", (moe_inter, hidden)),
            (p + "mlp.shared_expert.down_proj.weight", (hidden, moe_inter)),
            (p + "mlp.shared_expert_gate.weight", (1, hidden)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    total = sum(int(np.prod(s)) * 2 for _, s in shapes)
    per_shard = total / shards
    out: dict[str, TensorInfo] = {}
    done = 0
    offsets: dict[str, int] = {}
    for name, shape in shapes:
        nbytes = int(np.prod(shape)) * 2
        f = f"model-{min(shards - 1, int(done // per_shard)) + 1:05d}-of-{shards:05d}.safetensors"
        out[name] = TensorInfo(name, "BF16", shape, nbytes, f, offsets.get(f, 0))
        offsets[f] = offsets.get(f, 0) + nbytes
        done += nbytes
    config = {"model_type": "qwen3_moe", "hidden_size": hidden, "num_hidden_layers": layers,
              "num_experts": experts, "num_experts_per_tok": 10, "moe_intermediate_size": moe_inter,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "vocab_size": vocab}
    return out, config


class HeaderOnlySource(Source):
    """A checkpoint that exists only as headers: rows are made on demand, reads counted as stored bf16 bytes."""

    format = "safetensors"

    def __init__(self, tensors: dict[str, TensorInfo], config: dict, location: str = "synthetic://moe-397b",
                 seed: int = 0) -> None:
        super().__init__()
        self._tensors = tensors
        self._config = config
        self.location = location
        self.seed = seed

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def _read_rows(self, info: TensorInfo, start: int, stop: int) -> np.ndarray:
        self.stats.add(info.file, info.offset + start * info.cols * 2, (stop - start) * info.cols * 2)
        g = np.random.default_rng([self.seed, zlib.crc32(info.name.encode()), start])
        rows = g.standard_normal((stop - start, info.cols), dtype=np.float32) * np.float32(0.02)
        return rows.astype(ml_dtypes.bfloat16).astype(np.float32)

    def files(self) -> list[FileInfo]:
        sizes: dict[str, int] = {}
        for t in self._tensors.values():
            sizes[t.file] = sizes.get(t.file, 0) + t.nbytes
        return [FileInfo(f, s) for f, s in sorted(sizes.items())] + [FileInfo("config.json", 200)]

    def read_file(self, name: str, limit: int = 0) -> bytes | None:
        return json.dumps(self._config).encode() if name == "config.json" else None

    def file_sha256(self, name: str) -> str:
        raise NotImplementedError


def write_moe_checkpoint(folder: Path, layers: int = 4, experts: int = 64, hidden: int = 2048,
                         moe_inter: int = 768, vocab: int = 32000, shards: int = 4, seed: int = 0) -> Path:
    """A real sharded bf16 MoE checkpoint (fused expert tensors, one shard per layer group), built once."""
    from safetensors.numpy import save_file

    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tensors, cfg = moe_tensors(layers, experts, hidden, moe_inter, heads=16, kv_heads=4, head_dim=128, vocab=vocab,
                               shards=shards)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    def block(shape: tuple[int, ...]) -> np.ndarray:  # random-looking, cheap: a random window of a random pool
        n = int(np.prod(shape))
        reps = -(-n // pool.size)
        src = np.tile(pool, reps) if reps > 1 else pool
        start = int(rng.integers(0, src.size - n + 1))
        return np.ascontiguousarray(src[start:start + n]).reshape(shape)

    wmap: dict[str, str] = {}
    by_file: dict[str, list[str]] = {}
    for name, info in tensors.items():
        by_file.setdefault(info.file, []).append(name)
    for f, names in by_file.items():
        save_file({n: block(tensors[n].shape) for n in names}, str(folder / f))
        wmap.update({n: f for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---- fingerprints at the sample level ------------------------------------------------------------------------
def dense_parts(layers: int = 32, hidden: int = 4096, inter: int = 14336, kv: int = 1024, vocab: int = 128256
                ) -> tuple[dict[Slot, Part], dict[Slot, str]]:
    """Canonical parts of a Llama-3-8B-shaped model (no weights needed to plan its fingerprint)."""
    shapes = {"embed": (vocab, hidden), "lm_head": (vocab, hidden), "final_norm": (hidden, 1)}
    per_layer = {"attn_q": (hidden, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden), "attn_o": (hidden, hidden),
                 "mlp_gate": (inter, hidden), "mlp_up": (inter, hidden), "mlp_down": (hidden, inter),
                 "attn_norm": (hidden, 1), "mlp_norm": (hidden, 1)}
    parts: dict[Slot, Part] = {}
    for role, (r, c) in shapes.items():
        parts[Slot(role)] = Part(Slot(role), role, 0, r, c)
    for i in range(layers):
        for role, (r, c) in per_layer.items():
            s = Slot(role, i)
            parts[s] = Part(s, s.key, 0, r, c)
    return parts, {s: "BF16" for s in parts}


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


class SampleFamily:
    """Models as dicts slot -> float32 sample, combined linearly exactly as merges combine weights.

    With `robust`, each model also carries a disguise-robust section (fingerprint/robust.py) of the size the real
    collector makes for these parts (token rows, reader products, norm gains; one tokenizer, so every model shares
    its tokens): its arrays ride in the same dict under `robust:` keys and combine linearly like the samples."""

    def __init__(self, parts: dict[Slot, Part], dtypes: dict[Slot, str], robust: bool = False) -> None:
        self.plans = plan(parts, dtypes)
        self.shapes: dict[str, tuple[int, ...]] = {}
        if robust:
            self.shapes, self.gain_idx, self.kp = _robust_layout(parts, self.plans)

    def random(self, rng: np.random.Generator, scale: float = 0.02) -> dict:
        out: dict = {}
        for p in self.plans:
            if p.structured and p.part.cols == 1:
                out[p.slot] = _bf16(1.0 + 0.05 * rng.standard_normal((p.nrows, p.ncols), dtype=np.float32))
            else:
                out[p.slot] = _bf16(scale * rng.standard_normal((p.nrows, p.ncols), dtype=np.float32))
        for key, shape in self.shapes.items():
            gain = key.startswith("robust:gain:")
            out[key] = ((1.0 if gain else 0.0) + (0.05 if gain else scale) * rng.standard_normal(shape)
                        ).astype(np.float32)
        return out

    def finetune(self, base: dict[Slot, np.ndarray], rng: np.random.Generator, rel: float = 0.1
                 ) -> dict[Slot, np.ndarray]:
        return {k: _bf16(v + rel * v.std() * rng.standard_normal(v.shape, dtype=np.float32)) for k, v in base.items()}

    def fingerprint(self, values: dict[Slot, np.ndarray], label: str, spec: str | None = None) -> Fingerprint:
        import hashlib

        h = hashlib.sha256(label.encode())
        slots = {}
        for p in self.plans:
            v = values[p.slot]
            h.update(v.tobytes())
            slots[p.slot] = SlotSample(p.slot, p.part.rows, p.part.cols, p.dtype, p.row0,
                                       is_structured(p.slot, p.part), v, _moments(v))
        model = {"label": label, "spec": spec or f"synthetic://{label}", "family": "llama", "model_type": "llama",
                 "layers": 32, "parameters": 8_030_000_000, "total_bytes": 16_060_000_000, "card": {}}
        return Fingerprint(model, h.hexdigest(), 0, 0, slots, robust=self._robust(values) if self.shapes else None)

    def _robust(self, values: dict) -> RobustSection:
        k = self.shapes["robust:rows:embed"][0]
        keys = np.sort(_splitmix(np.arange(k, dtype=np.uint64)))
        rows, gains, products = from_names({key.removeprefix("robust:"): values[key] for key in self.shapes})
        return RobustSection("string", keys, np.arange(k, dtype=np.int64), rows, {"embed": "BF16", "lm_head": "BF16"},
                             self.gain_idx, gains, products, self.kp)


def _robust_layout(parts: dict[Slot, Part], plans: list) -> tuple[dict[str, tuple[int, ...]], np.ndarray, int]:
    """(array shapes, gain columns, product tokens) of the robust section that the collector
    (fingerprint/robust.py) makes for `parts` (bf16)."""
    from modeltrace.align.roles import roles_named
    from modeltrace.fingerprint.robust import MIN_PRODUCT_TOKENS, PRODUCT_BYTES, PRODUCT_TOKENS, n_tokens, read_gains
    from modeltrace.fingerprint.sampling import KEEP_COLS, column_order

    roles = roles_named("llama")

    emb = parts[Slot("embed")]
    hidden, vocab = emb.cols, emb.rows
    k = n_tokens(hidden, 2, True, vocab)
    readers = [p for p in plans if p.slot.role in roles.readers and p.part.cols == hidden]
    kp = min(k, PRODUCT_TOKENS, max(MIN_PRODUCT_TOKENS, PRODUCT_BYTES // max(2 * sum(p.nrows for p in readers), 1)))
    idx: set[int] = set()
    for p in plans:
        if p.part.cols == hidden and roles.gain_slot(p.slot) is not None:
            idx.update(int(c) for c in column_order(p.part.rows, p.part.cols)[:KEEP_COLS])
    shapes: dict[str, tuple[int, ...]] = {"robust:rows:embed": (k, hidden), "robust:rows:lm_head": (k, hidden)}
    for s in parts:
        if s.role in read_gains(roles):
            shapes[f"robust:gain:{s.role}:{s.layer}"] = (hidden,) if s.role == "final_norm" else (len(idx),)
    for p in readers:
        shapes[f"robust:prod:{p.slot.role}:{p.slot.layer}:{p.slot.expert}"] = (kp, p.nrows)
    return shapes, np.array(sorted(idx), dtype=np.int64), kp


def family_fingerprints(n: int, family: SampleFamily, seed: int = 0) -> Iterator[Fingerprint]:
    """`n` fingerprints: a planted lineage (lin_base, lin_ft1, lin_ft2 and their TIES-free merges lin_ta, lin_mix)
    first, then independent bases each with a few fine-tunes, like a hub of model families."""
    rng = np.random.default_rng(seed)
    base = family.random(rng)
    ft1, ft2 = family.finetune(base, rng), family.finetune(base, rng)
    yield family.fingerprint(base, "lin_base")
    yield family.fingerprint(ft1, "lin_ft1")
    yield family.fingerprint(ft2, "lin_ft2")
    yield family.fingerprint({k: _bf16(base[k] + 0.7 * (ft1[k] - base[k]) + 0.5 * (ft2[k] - base[k])) for k in base},
                             "lin_ta")
    made = 4
    while made < n:
        root = family.random(rng)
        yield family.fingerprint(root, f"fam{made:05d}_base")
        made += 1
        for j in range(min(3, n - made)):
            yield family.fingerprint(family.finetune(root, rng), f"fam{made:05d}_ft{j}")
            made += 1


def planted_suspect(family: SampleFamily, seed: int = 0) -> Fingerprint:
    """0.6 x lin_ft1 + 0.4 x lin_ft2 of the planted lineage (not itself in the index)."""
    rng = np.random.default_rng(seed)
    base = family.random(rng)
    ft1, ft2 = family.finetune(base, rng), family.finetune(base, rng)
    return family.fingerprint({k: _bf16(0.6 * ft1[k] + 0.4 * ft2[k]) for k in base}, "suspect")
