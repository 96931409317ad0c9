"""Alignment cost at scale: matching the hidden units of a 20k-unit MLP layer pair (target: within 10 s on 2 cores).

    python benchmarks/bench_align.py [--units 20480] [--hidden 2048]

Prints, for a derived pair (the child's units permuted, plus a fine-tune-sized delta) and an independent pair:
- matching only: the two matchings of the independence test (input side: gate+up rows, output side: down columns,
  each at 64 sampled residual coordinates) over all 20k x 20k unit pairs, plus the alignment for the streaming pass;
  how many units took the exact (Hungarian) step, and the share of units recovered;
- the whole layer from safetensors files: reading the sketches (every gate/up row at the sampled columns, the
  sampled rows of down_proj) and matching, with peak resident memory.
No dense O(n^3) assignment runs on the full layer: only units that are not clear mutual best matches get an exact
assignment, capped at 2048 of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from benchmarks.common import data_dir, rss_mb  # noqa: E402
from modeltrace.align.match_test import unit_test  # noqa: E402
from modeltrace.align.sketch import RES_SAMPLE_WIDE, Sketcher, res_coords  # noqa: E402
from modeltrace.align.units import unit_features  # noqa: E402
from modeltrace.align.view import open_view  # noqa: E402
from modeltrace.architectures import Slot  # noqa: E402


def _layer(folder: Path, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> Path:
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    bf = ml_dtypes.bfloat16
    p = "model.layers.0.mlp."
    save_file({p + "gate_proj.weight": gate.astype(bf), p + "up_proj.weight": up.astype(bf),
               p + "down_proj.weight": down.astype(bf)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": int(gate.shape[1]),
                                                    "intermediate_size": int(gate.shape[0]), "num_hidden_layers": 1}))
    return folder


def build(units: int, hidden: int) -> tuple[Path, Path, Path, np.ndarray]:
    d = data_dir() / f"align-{units}x{hidden}"
    rng = np.random.default_rng(0)
    perm = np.random.default_rng(1).permutation(units)  # child unit i is parent unit perm[i]

    def mats(r):
        return (r.standard_normal((units, hidden), dtype=np.float32) * 0.02,
                r.standard_normal((units, hidden), dtype=np.float32) * 0.02,
                r.standard_normal((hidden, units), dtype=np.float32) * 0.02)

    if not (d / "child" / "model.safetensors").exists():
        g, u, dn = mats(rng)
        _layer(d / "parent", g, u, dn)
        delta = 0.1  # a fine-tune's relative change, per element
        _layer(d / "child", g[perm] * (1 + delta * rng.standard_normal(g.shape, dtype=np.float32)),
               u[perm] * (1 + delta * rng.standard_normal(u.shape, dtype=np.float32)),
               dn[:, perm] * (1 + delta * rng.standard_normal(dn.shape, dtype=np.float32)))
        _layer(d / "other", *mats(np.random.default_rng(2)))
    return d / "parent", d / "child", d / "other", perm


def sketch(path: Path, hidden: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    view = open_view(str(path))
    coords = res_coords(hidden)
    coords = coords[np.linspace(0, len(coords) - 1, RES_SAMPLE_WIDE).astype(np.int64)]
    feats = unit_features(Sketcher(view), [Slot("mlp_gate", 0), Slot("mlp_up", 0), Slot("mlp_down", 0)], coords)
    view.close()
    return feats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=20480)
    ap.add_argument("--hidden", type=int, default=2048)
    args = ap.parse_args()
    parent, child, other, perm = build(args.units, args.hidden)
    print(f"MLP layer: {args.units} units, hidden {args.hidden}, bf16; features: gate+up rows and down columns at "
          f"{RES_SAMPLE_WIDE} sampled residual coordinates")
    t0 = time.perf_counter()
    fp = sketch(parent, args.hidden)
    t_sketch = time.perf_counter() - t0
    fc, fo = sketch(child, args.hidden), sketch(other, args.hidden)
    print(f"sketch one layer from safetensors (read gate/up/down, keep sampled columns/rows): {t_sketch:.2f} s")
    for label, f, truth in (("derived (permuted + delta)", fc, perm), ("independent", fo, None)):
        t0 = time.perf_counter()
        t = unit_test(f[0], fp[0], f[1], fp[1], 0)
        t_test = time.perf_counter() - t0
        extra = ""
        if t.log10p <= -6:
            t1 = time.perf_counter()
            al = t.alignment()
            t_al = time.perf_counter() - t1
            ok = float(np.mean(al == truth)) if truth is not None else float("nan")
            extra = f"; alignment for streaming +{t_al:.2f} s, units recovered {100 * ok:.2f}%"
        exact = t.m_in.exact + t.m_out.exact
        print(f"{label:28s} matching {t_test:5.2f} s (target <= 10 s): agreements {t.agree}/{t.n_s}, "
              f"log10 p {t.log10p:.1f}, exact-assignment units {exact} (of {2 * t.n_s}){extra}")
    t0 = time.perf_counter()
    unit_test(fc[0], fp[0], fc[1], fp[1], 0)
    print(f"derived again (warm): {time.perf_counter() - t0:.2f} s; peak RSS {rss_mb():.0f} MB "
          f"(features: {args.units} x {3 * RES_SAMPLE_WIDE} float32 per model, similarity blocks 16 MB)")


if __name__ == "__main__":
    main()
