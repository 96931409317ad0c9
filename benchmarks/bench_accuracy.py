"""Audit accuracy on merges made by mergekit with known recipes (the test corpus), against issue 3's targets.

    python benchmarks/bench_accuracy.py            # builds the corpus once into bench-data/corpus (~40 s)

Prints: method accuracy (target >= 95%), weight error (<= 0.01), SLERP t / density error (<= 0.05), stack layer maps
(exact), false positives on independent pairs at p < 1e-6 (target 0 over >= 50 pairs) and a uniformity test of
their p-values.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import stats as sps  # noqa: E402

from benchmarks.common import data_dir  # noqa: E402
from tests.audit_eval import derived_names, independence_p, independent_pairs, score  # noqa: E402
from tests.corpus import build_corpus  # noqa: E402


def main() -> None:
    t0 = time.perf_counter()
    corpus = build_corpus(data_dir() / "corpus")
    print(f"corpus ready in {time.perf_counter() - t0:.1f} s")
    cases = [score(corpus, n) for n in derived_names(corpus)]
    print(f"\n{'model':18s} {'truth':16s} {'answer':28s} {'w err':>7s} {'p err':>7s}  ok")
    for c in cases:
        ans = f"{c.verdict['relation']}/{c.verdict.get('method') or '-'}"
        we = "" if c.weight_error is None else f"{c.weight_error:.4f}"
        pe = "" if c.param_error is None else f"{c.param_error:.4f}"
        print(f"{c.name:18s} {(c.truth_method or c.kind):16s} {ans:28s} {we:>7s} {pe:>7s}  {'yes' if c.ok else 'NO'}"
              + ("" if c.ok else f"  {c.errors}"))
    ok = sum(c.ok for c in cases)
    merges = [c for c in cases if c.kind == "merge"]
    werr = [c.weight_error for c in cases if c.weight_error is not None]
    perr = [c.param_error for c in cases if c.param_error is not None]
    print(f"\nrelation+method correct: {ok}/{len(cases)} = {100 * ok / len(cases):.1f}% (target >= 95%); "
          f"merges {sum(c.ok for c in merges)}/{len(merges)}")
    if werr:
        print(f"max weight error (linear, task arithmetic): {max(werr):.4f} (target <= 0.01)")
    if perr:
        print(f"max SLERP t / density error: {max(perr):.4f} (target <= 0.05)")
    sparse = [c for c in cases if c.sparse_weight_error is not None]
    if sparse:
        print("sparse merges, weight error against the normalised recipe (tests hold them to 0.02): "
              + ", ".join(f"{c.name} {c.sparse_weight_error:.4f}" for c in sparse))
    pairs = independent_pairs(corpus)
    t1 = time.perf_counter()
    ps = np.array([independence_p(corpus, a, b)[0] for a, b in pairs])
    print(f"independent pairs: {len(pairs)}, false positives at p < 1e-6: {int((ps < 1e-6).sum())} (target 0); "
          f"min p {ps.min():.3g}; KS uniformity p = {sps.kstest(ps, 'uniform').pvalue:.3f}; "
          f"share p < 0.05: {np.mean(ps < 0.05):.3f} ({time.perf_counter() - t1:.1f} s)")


if __name__ == "__main__":
    main()
