"""Audit speed and memory: a suspect (0.6 A + 0.4 B, bf16) against two candidates, all multi-GB sharded checkpoints.

Prints, measured in one run with a warm page cache:
- floor: reading the three checkpoints' bytes once with plain file reads;
- modeltrace audit (full streaming pass, recipe discovered, not given), and its ratio to the floor (target <= 1.5x):
  the steady state, the first audit of a fresh process (which also loads the compiled kernel) and --workers 2;
- the naive approach (whole shards loaded into memory, known weights checked per tensor, as in the ad-hoc scripts
  that caught Rio), and modeltrace's speed-up over it (target >= 5x);
- peak resident memory of each approach (separate processes), against the 512 MB budget for the audit.

    python benchmarks/bench_audit.py [--gb 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import data_dir, floor_read  # noqa: E402


def build(gb: float) -> tuple[Path, Path, Path]:
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import load_file, save_file  # needs ml_dtypes imported for bf16

    from benchmarks.common import make_sharded

    d = data_dir()
    a = make_sharded(d / f"audit-{gb:g}-a", gb, seed=1)
    b = make_sharded(d / f"audit-{gb:g}-b", gb, seed=2)
    s = d / f"audit-{gb:g}-s"
    if not (s / "model.safetensors.index.json").exists():
        s.mkdir(parents=True, exist_ok=True)
        for f in sorted(a.glob("*.safetensors")):
            ta, tb = load_file(str(f)), load_file(str(b / f.name))
            out = {k: (0.6 * ta[k].astype(np.float32) + 0.4 * tb[k].astype(np.float32)).astype(ml_dtypes.bfloat16)
                   for k in ta}
            save_file(out, str(s / f.name))
            del ta, tb, out
        for name in ("model.safetensors.index.json", "config.json"):
            (s / name).write_bytes((a / name).read_bytes())
    return s, a, b


NAIVE = r"""
import sys, numpy as np, time, ml_dtypes
from safetensors.numpy import load_file
from pathlib import Path
from benchmarks.common import rss_mb
s, a, b = map(Path, sys.argv[1:4])
t0 = time.perf_counter()
worst = 0.0
for f in sorted(s.glob("*.safetensors")):
    ts, ta, tb = load_file(str(f)), load_file(str(a / f.name)), load_file(str(b / f.name))
    for k in ts:
        x = ts[k].astype(np.float32).ravel(); y = ta[k].astype(np.float32).ravel(); z = tb[k].astype(np.float32).ravel()
        X = np.stack([y, z], axis=1)
        w = np.linalg.lstsq(X, x, rcond=None)[0]
        worst = max(worst, float(abs(w[0] - 0.6)))
print(time.perf_counter() - t0, rss_mb(), worst)
"""

# One process: imports, then the audit as a user's command runs it (the kernel's first use in the process included),
# then the same audit again (kernel loaded: the streaming pass alone), then --workers 2 (local processes).
AUDIT = r"""
import sys, time, json
from benchmarks.common import rss_mb
from modeltrace.audit import run_audit
from modeltrace.verdict import decide
base = rss_mb()
out = {"base_rss": base}
for key, kw in (("first", {}), ("warm", {}), ("workers2", {"workers": 2})):
    t0 = time.perf_counter()
    v = decide(run_audit(sys.argv[1], [sys.argv[2], sys.argv[3]], **kw))
    out[key] = time.perf_counter() - t0
    if key == "warm":
        out["rss"] = rss_mb()
    out[key + "_verdict"] = [v["relation"], v["method"], [(p["model"], p["weight"]) for p in v["parents"]]]
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    args = ap.parse_args()
    s, a, b = build(args.gb)
    for m in (s, a, b):
        floor_read(m)
    floors = []
    for _ in range(3):
        floors.append(sum(floor_read(m)[0] for m in (s, a, b)))
    floor = min(floors)
    total = sum(floor_read(m)[1] for m in (s, a, b))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", AUDIT, str(s), str(a), str(b)], capture_output=True, text=True,
                           check=True, env=env)
        runs.append(json.loads(r.stdout))
    first, warm, procs = (min(r[k] for r in runs) for k in ("first", "warm", "workers2"))
    audit = runs[0]
    assert audit["first_verdict"] == audit["warm_verdict"] == audit["workers2_verdict"]
    r = subprocess.run([sys.executable, "-c", NAIVE, str(s), str(a), str(b)], capture_output=True, text=True,
                       check=True, env=env)
    naive_t, naive_rss, _ = map(float, r.stdout.split())
    rel, method, parents = audit["warm_verdict"]
    print(f"three checkpoints, {total / 1e9:.2f} GB of weights (bf16, sharded)")
    print(f"floor, read once:          {floor:6.2f} s  ({total / floor / 1e9:.2f} GB/s)")
    print(f"modeltrace audit:          {warm:6.2f} s  = {warm / floor:.2f}x floor (target <= 1.5x); verdict "
          f"{rel} {method} " + ", ".join(f"{m} {w:.4f}" for m, w in parents))
    print(f"  first audit in a process {first:6.2f} s  = {first / floor:.2f}x floor (includes loading the compiled "
          f"kernel, ~0.3 s once per process)")
    print(f"  --workers 2 (processes)  {procs:6.2f} s  = {procs / floor:.2f}x floor (same verdict)")
    print(f"naive whole-shard check:   {naive_t:6.2f} s  = {naive_t / floor:.2f}x floor; modeltrace is "
          f"{naive_t / first:.1f}x faster (target >= 5x, first audit in a process)")
    print(f"peak RSS: audit {audit['rss']:.0f} MB ({audit['rss'] - audit['base_rss']:.0f} MB above the "
          f"{audit['base_rss']:.0f} MB of imports; budget 512 MB extra), naive {naive_rss:.0f} MB")


if __name__ == "__main__":
    main()
