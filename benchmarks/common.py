"""Shared helpers for benchmarks: synthetic multi-GB checkpoints and the read-once floor."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

CHUNK = 16 * 1024 * 1024


def make_sharded(folder: Path, total_gb: float, shards: int = 4, hidden: int = 2048, seed: int = 0,
                 layers_per_shard: int | None = None, mix: tuple[Path, Path, float] | None = None) -> Path:
    """A llama-shaped bf16 checkpoint of about `total_gb` GB in `shards` files (built once, reused)."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inter = hidden * 4
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 2
    n_layers = max(shards, int(total_gb * 1e9 / per_layer))
    per_shard = layers_per_shard or -(-n_layers // shards)
    wmap: dict[str, str] = {}
    for s in range(shards):
        tensors = {}
        for layer in range(s * per_shard, min(n_layers, (s + 1) * per_shard)):
            p = f"model.layers.{layer}."
            shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                      "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                      "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                      "mlp.down_proj": (hidden, inter)}
            for name, shape in shapes.items():
                w = rng.standard_normal(shape, dtype=np.float32) * 0.02
                tensors[p + name + ".weight"] = w.astype(ml_dtypes.bfloat16)
            tensors[p + "input_layernorm.weight"] = np.ones(hidden, dtype=ml_dtypes.bfloat16)
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(folder / fname))
        wmap.update({k: fname for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                    "num_hidden_layers": n_layers, "intermediate_size": inter,
                                                    "num_attention_heads": 16, "vocab_size": 32000}))
    return folder


def floor_read(folder: Path) -> tuple[float, int]:
    """Seconds to read every weight byte once with plain 16 MB reads (the physical floor)."""
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(CHUNK)
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                total += n
    return time.perf_counter() - t0, total


def warm(folder: Path) -> None:
    floor_read(folder)


def data_dir() -> Path:
    return Path(os.environ.get("MODELTRACE_BENCH_DIR", Path(__file__).resolve().parent.parent / "bench-data"))


def rss_mb() -> float:
    """Peak resident memory of this process since it started (VmHWM). Not ru_maxrss: on Linux that survives
    fork and exec, so a child started by a large parent reports the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
