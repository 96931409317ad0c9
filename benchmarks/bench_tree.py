"""The family tree (issue 15): accuracy on the test collection and time at scale, each printed with its figure.

1. accuracy (with --corpus ROOT): tests/tree_collection.py (the test corpus plus ~110 models made with the same real
   tools, 154 in all), every model indexed, the tree built and scored against the manifest (tests/tree_eval.py):
   directed edge precision / recall (targets 0.97 / 0.95), merges with the right parents and their weights (target
   within 0.01), roots, edges between independent families (target none), per true relation;
2. scale: a synthetic index of --models (10,000) fingerprints made at the sample level (benchmarks/synth.py's
   SampleFamily, a small llama shape: 4 layers, hidden 256) with planted families (a root, two fine-tunes, a
   fine-tune of a fine-tune, a linear merge of the two fine-tunes): the whole tree from an index with no tree cache
   (target <= 60 s on 2 cores), then one more model added and the tree again (target <= 2 s), and the share of
   planted edges found.

    python benchmarks/bench_tree.py [--corpus /work/corpus] [--models 10000] [--skip-scale]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from benchmarks.common import data_dir, rss_mb  # noqa: E402
from benchmarks.synth import SampleFamily, _bf16, dense_parts  # noqa: E402
from modeltrace.fingerprint import make_fingerprint  # noqa: E402
from modeltrace.index import Index  # noqa: E402
from modeltrace.tree import build_tree  # noqa: E402


def bench_accuracy(root: str) -> None:
    from corpus import build_corpus
    from tree_collection import build_collection
    from tree_eval import score

    models = build_collection(build_corpus(root))["models"]
    with tempfile.TemporaryDirectory() as tmp, Index(Path(tmp) / "ix.sqlite", create=True) as ix:
        t0 = time.perf_counter()
        for n, e in models.items():
            ix.add(make_fingerprint(e["path"]), n)
        t1 = time.perf_counter()
        tree = build_tree(ix)
        t2 = time.perf_counter()
    s = score(tree, models)
    print(f"[1] tree of {len(models)} collection models (fingerprinted in {t1 - t0:.1f} s, tree {t2 - t1:.1f} s): "
          f"directed edge precision {s.precision:.3f} ({s.correct}/{s.edges}; target 0.97), recall {s.recall:.3f} "
          f"({s.correct}/{s.truth}; target 0.95); {s.reversed} edges reversed; merges with the right parents "
          f"{s.merges_parents_right}/{s.merges_total}; max weight error {s.max_weight_error:.4f} over "
          f"{len(s.weight_errors)} linear / task-arithmetic merges (target 0.01); roots right {s.roots_right}/"
          f"{s.roots_total} (+{len(s.extra_roots)} extra); edges between independent families: "
          f"{len(s.cross_family)} (target 0)")
    print("    per true relation (found/total): " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in s.by_kind.items()))
    print("    wrong: " + "; ".join(f"{p}->{c} ({r})" for p, c, r in s.wrong))


def _families(n: int, fam: SampleFamily, seed: int = 0):
    """Planted families of 5: root, ft1, ft2 (siblings), ft1 -> ft1a (a chain), 0.6 ft1 + 0.4 ft2 (a merge)."""
    rng = np.random.default_rng(seed)
    made, k = 0, 0
    while made < n:
        root = fam.random(rng)
        f1, f2 = fam.finetune(root, rng), fam.finetune(root, rng)
        f1a = fam.finetune(f1, rng)
        merge = {s: _bf16(0.6 * f1[s] + 0.4 * f2[s]) for s in root}
        for name, v in [("root", root), ("ft1", f1), ("ft2", f2), ("ft1a", f1a), ("merge", merge)][:n - made]:
            yield fam.fingerprint(v, f"f{k:05d}_{name}")
            made += 1
        k += 1


TRUTH = {"ft1": ["root"], "ft2": ["root"], "ft1a": ["ft1"], "merge": ["ft1", "ft2"]}


def bench_scale(n: int) -> None:
    parts, dtypes = dense_parts(layers=4, hidden=256, inter=704, kv=128, vocab=4096)
    fam = SampleFamily(parts, dtypes)
    path = data_dir() / f"tree-index-{n}.sqlite"
    if not path.exists():
        t0 = time.perf_counter()
        with Index(path.with_suffix(".tmp"), create=True) as ix:
            batch = []
            for fp in _families(n, fam):
                batch.append(fp)
                if len(batch) == 500:
                    ix.add_many(batch)
                    batch = []
            ix.add_many(batch)
        os.replace(path.with_suffix(".tmp"), path)
        print(f"    built a {n}-model index in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 1e9:.2f} GB)")
    work = Path(tempfile.mkdtemp(prefix="mt-tree-bench-")) / "ix.sqlite"
    import shutil

    shutil.copy(path, work)  # no tree cache yet: the whole tree is computed
    extra = next(iter(_families(1, fam, seed=99)))
    with Index(work) as ix:
        t0, c0 = time.perf_counter(), time.process_time()
        tree = build_tree(ix)
        whole, cpu = time.perf_counter() - t0, time.process_time() - c0
        ix.add(extra, "added_root")
        child = fam.finetune({s: v.values for s, v in extra.slots.items()}, np.random.default_rng(7))
        t0, c0 = time.perf_counter(), time.process_time()
        again = build_tree(ix)
        inc1, icpu1 = time.perf_counter() - t0, time.process_time() - c0
        ix.add(fam.fingerprint(child, "added_ft"), "added_ft")
        t0, c0 = time.perf_counter(), time.process_time()
        again = build_tree(ix)
        inc2, icpu2 = time.perf_counter() - t0, time.process_time() - c0
    found = total = 0
    for name in tree.nodes:
        fam_id, _, kind = name.partition("_")
        for p in TRUTH.get(kind, []):
            total += 1
            found += any(e["parent"] == f"{fam_id}_{p}" for e in tree.parents(name))
    ok = any(e["parent"] == "added_root" for e in again.parents("added_ft"))
    print(f"[2] tree of {tree.stats['models']} synthetic fingerprints (4-layer, hidden-256 llama shape; "
          f"{path.stat().st_size / 1e9:.2f} GB index): whole tree {whole:.1f} s wall ({cpu:.1f} s CPU; target <= 60 s; "
          f"{tree.stats['pairs']} pairs, {tree.stats['families']} families); after one `index add` {inc1:.2f} s and "
          f"{inc2:.2f} s wall ({icpu1:.2f} s and {icpu2:.2f} s CPU; target <= 2 s; "
          f"{again.stats['pairs_computed']} pairs computed, "
          f"{again.stats['families_solved']} family solved); planted edges found {found}/{total}; added fine-tune "
          f"placed under its root: {ok}; peak RSS {rss_mb():.0f} MB")
    print(f"    load average during the run (2 cores): {os.getloadavg()[0]:.1f}")
    shutil.rmtree(work.parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=os.environ.get("MODELTRACE_TEST_CORPUS"))
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--skip-scale", action="store_true")
    a = ap.parse_args()
    if a.corpus:
        bench_accuracy(a.corpus)
    if not a.skip_scale:
        bench_scale(a.models)


if __name__ == "__main__":
    main()
