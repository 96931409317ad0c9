"""Reader throughput: stream every tensor of a multi-GB sharded checkpoint through modeltrace's reader (decoding
bf16 to float32) against the floor of reading the same bytes once with plain file reads, warm page cache.

    python benchmarks/bench_read.py [--gb 2.0]

Target (issue 2): ratio <= 1.2. Also prints the naive approach (safetensors' whole-file load) for comparison.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import data_dir, floor_read, make_sharded, rss_mb, warm  # noqa: E402
from modeltrace.sources import open_source  # noqa: E402


def stream_all(folder: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    with open_source(folder) as src:
        for name in src.tensors():
            for _, chunk in src.iter_rows(name):
                n += chunk.size
        read = src.stats.bytes_read
    return time.perf_counter() - t0, read


def naive(folder: Path) -> float:
    from safetensors.numpy import load_file

    t0 = time.perf_counter()
    for f in sorted(folder.glob("*.safetensors")):
        d = load_file(str(f))
        for v in d.values():
            v.astype("float32")
        del d
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    args = ap.parse_args()
    folder = make_sharded(data_dir() / f"read-{args.gb:g}gb", args.gb)
    warm(folder)
    floors, streams = [], []
    for _ in range(3):
        floors.append(floor_read(folder)[0])
        t, read = stream_all(folder)
        streams.append(t)
    f, s = min(floors), min(streams)
    nv = naive(folder)
    _, total = floor_read(folder)
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards")
    print(f"floor (plain reads, once):       {f:.2f} s  ({total / f / 1e9:.2f} GB/s)")
    print(f"modeltrace stream (bf16->f32):  {s:.2f} s  ratio to floor {s / f:.2f}x  (target <= 1.2x)")
    print(f"naive whole-file load + cast:   {nv:.2f} s  ratio to floor {nv / f:.2f}x")
    print(f"bytes read by the reader: {read / 1e9:.2f} GB; peak RSS of this process {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
