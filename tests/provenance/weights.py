"""Small weight sets written in several storage layouts for the content-identity tests (numpy only, no torch)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from modeltrace.sources.dtypes import SAFETENSORS_DTYPES

_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A llama-like tiny model in bf16 with an f32 norm, an int buffer and a 3-D tensor."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((64, 16))}
    for i in range(2):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = rng.standard_normal((16, 16))
        out[p + "mlp.up_proj.weight"] = rng.standard_normal((40, 16))
        out[p + "mlp.down_proj.weight"] = rng.standard_normal((16, 40))
    out = {k: (v * 0.02).astype(ml_dtypes.bfloat16) for k, v in out.items()}
    out["model.norm.weight"] = (1 + 0.01 * rng.standard_normal(16)).astype(np.float32)
    out["model.layers.0.mlp.experts"] = (rng.standard_normal((3, 4, 8)) * 0.02).astype(ml_dtypes.bfloat16)
    out["model.position_ids"] = np.arange(32, dtype=np.int64)
    return out


def write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]], metadata: dict | None = None) -> Path:
    """A safetensors file with the tensors' data in exactly the given order (save_file would sort them)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, arr in tensors:
        n = arr.nbytes
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr).tobytes())
    return path


def write_sharded(folder: Path, tensors: dict[str, np.ndarray], shards: int, prefix: str = "model") -> Path:
    names = list(tensors)
    wmap = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"{prefix}-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, [(n, tensors[n]) for n in part])
        wmap.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return folder
