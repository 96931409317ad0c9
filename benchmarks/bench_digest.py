"""Content digest speed: the per-tensor BLAKE3 manifest of a multi-GB sharded bf16 checkpoint against the floor of
reading the same bytes once with plain file reads (warm page cache), and against SHA-256 of every file.

    python benchmarks/bench_digest.py [--gb 2.0] [--repeats 3] [--f32]

Target (issue 17): content digest <= 1.2x the floor. `--f32` also times an f32 checkpoint (each f32 tensor is
checked for being exactly bf16/f16 on the way, which costs a pass over its first window).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import data_dir, floor_read, make_sharded, rss_mb, warm  # noqa: E402
from modeltrace.provenance.content import content_digest  # noqa: E402
from modeltrace.sources import open_source  # noqa: E402


def digest_once(folder: Path, workers: int | None) -> tuple[float, str]:
    t0 = time.perf_counter()
    with open_source(folder) as src:
        d = content_digest(src, workers=workers)
    return time.perf_counter() - t0, d.model_id


def sha256_files(folder: Path) -> float:
    t0 = time.perf_counter()
    buf = bytearray(16 * 1024 * 1024)
    for f in sorted(folder.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(memoryview(buf)[:n])
    return time.perf_counter() - t0


def to_f32(src: Path, dst: Path) -> Path:
    """The same checkpoint re-saved as float32 (exact), built once."""
    if (dst / "model.safetensors.index.json").exists():
        return dst
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.safetensors")):
        save_file({k: v.astype("float32") for k, v in load_file(str(f)).items()}, str(dst / f.name))
    (dst / "model.safetensors.index.json").write_text((src / "model.safetensors.index.json").read_text())
    return dst


def bench(folder: Path, repeats: int, workers: int | None, label: str) -> dict:
    warm(folder)
    floors, digests, shas = [], [], []
    ident = ""
    for _ in range(repeats):
        floors.append(floor_read(folder)[0])
        t, ident = digest_once(folder, workers)
        digests.append(t)
        shas.append(sha256_files(folder))
    _, total = floor_read(folder)
    f, d, s = min(floors), min(digests), min(shas)
    print(f"[{label}] checkpoint: {total / 1e9:.2f} GB in {len(list(folder.glob('*.safetensors')))} shards")
    print(f"[{label}] floor (plain reads, once):  {f:.2f} s  ({total / f / 1e9:.2f} GB/s)")
    print(f"[{label}] content digest (BLAKE3):   {d:.2f} s  ratio to floor {d / f:.2f}x  (target <= 1.2x)  "
          f"{ident[:21]}…")
    print(f"[{label}] SHA-256 of every file:      {s:.2f} s  ratio to floor {s / f:.2f}x  (one thread)")
    return {"label": label, "gb": total / 1e9, "floor_s": f, "digest_s": d, "sha256_s": s, "ratio": d / f}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--f32", action="store_true", help="also time the same weights stored as float32")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    folder = make_sharded(data_dir() / f"read-{args.gb:g}gb", args.gb)
    rows = [bench(folder, args.repeats, args.workers, "bf16")]
    if args.f32:
        rows.append(bench(to_f32(folder, data_dir() / f"read-{args.gb:g}gb-f32"), args.repeats, args.workers, "f32"))
    print(f"peak RSS of this process {rss_mb():.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
