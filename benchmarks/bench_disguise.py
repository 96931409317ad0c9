"""The audit through disguises: one row per transformation, alone and combined, on dense and MoE test models.

    python benchmarks/bench_disguise.py     # reuses $MODELTRACE_TEST_CORPUS, else builds bench-data/corpus (~40 s)

Each row disguises a model of known provenance (tests/disguise.py; every permutation, fold and rotation there
leaves the logits unchanged), audits it against its true parents and prints: whether the relation (and merge
method) was found, the parent(s) named, the weakest parent's independence p-value, the largest recipe-weight error
against the truth (target <= 0.02 where the disguise preserves the recipe), seconds, and what the audit says it
undid. Then the null: independent same-shape pairs, adversarial ones included (false positives at p < 1e-6,
target 0), for the verdict's p-value and for the permutation-invariant match test alone.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import stats as sps  # noqa: E402

from benchmarks.common import data_dir  # noqa: E402
from modeltrace.audit import run_audit  # noqa: E402
from modeltrace.verdict import decide  # noqa: E402
from tests import disguise as D  # noqa: E402
from tests.audit_eval import independent_pairs  # noqa: E402
from tests.corpus import build_corpus  # noqa: E402

TOKENS = [f"t{i}" for i in range(256)]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def perms(m: D.Model, seed: int = 0, experts: bool = False) -> D.Model:
    r = _rng(seed)
    m = D.permute_heads(D.permute_mlp(m, r), r)
    if experts:
        m = D.permute_experts(m, r)
    return D.permute_residual(m, r)


def fold_rot(m: D.Model, seed: int = 0) -> D.Model:
    return D.rotate_residual(D.fold_norms(m), _rng(seed))


def main() -> None:
    env = os.environ.get("MODELTRACE_TEST_CORPUS")
    corpus = build_corpus(Path(env) if env else data_dir() / "corpus")
    work = data_dir() / "disguise"
    work.mkdir(parents=True, exist_ok=True)
    wide = D.wide_family(work / "wide")
    c = {n: corpus.path(n) for n in corpus.names()}
    c.update(wide)
    tok = {n: D.save(D.with_tokens(D.load(c[n]), TOKENS), work / f"tok-{n}") for n in ("ft_a1", "ft_a2")}

    rio, rio_c = "m_linear_rio", ["ft_a1", "ft_a2"]
    wm, wm_c = "wide_merge", ["wide_ft1", "wide_ft2"]
    moe, moe_c = "moe_linear", ["moe_ft1", "moe_ft2"]
    mix, mix_c = "mix_linear", ["mix_ft1", "mix_ft2"]
    order = _rng(5).permutation(256)
    rows = [
        # label, source model, candidates, disguise (Model -> Model) or ("gguf", qtype, fn) / ("dtype", dtype, fn)
        ("none (baseline)", rio, rio_c, lambda m: m),
        ("MLP units permuted", rio, rio_c, lambda m: D.permute_mlp(m, _rng(1))),
        ("attention heads permuted", rio, rio_c, lambda m: D.permute_heads(m, _rng(2))),
        ("residual stream permuted", rio, rio_c, lambda m: D.permute_residual(m, _rng(3))),
        ("all permutations", rio, rio_c, perms),
        ("all permutations (unrelated parents)", "m_linear_indep", ["base_a", "base_b"], perms),
        ("all permutations, fine-tune", "ft_a1", ["base_a"], perms),
        ("MoE: experts+units+heads+residual", moe, moe_c, lambda m: perms(m, 4, True)),
        ("Mixtral: experts+units+heads+resid", mix, mix_c, lambda m: perms(m, 5, True)),
        ("cast fp16", rio, rio_c, ("dtype", "F16", lambda m: m)),
        ("cast fp8 (E4M3)", rio, rio_c, ("dtype", "F8_E4M3", lambda m: m)),
        ("cast fp8 (E4M3), wide", wm, wm_c, ("dtype", "F8_E4M3", lambda m: m)),
        ("GGUF Q8_0", rio, rio_c, ("gguf", "Q8_0", lambda m: m)),
        ("GGUF Q8_0, wide", wm, wm_c, ("gguf", "Q8_0", lambda m: m)),
        ("GGUF Q6_K, wide", wm, wm_c, ("gguf", "Q6_K", lambda m: m)),
        ("GGUF Q4_K, wide", wm, wm_c, ("gguf", "Q4_K", lambda m: m)),
        ("noise 0.1% of std", rio, rio_c, lambda m: D.add_noise(m, _rng(6), 0.001)),
        ("noise 1%", rio, rio_c, lambda m: D.add_noise(m, _rng(6), 0.01)),
        ("noise 5%", rio, rio_c, lambda m: D.add_noise(m, _rng(6), 0.05)),
        ("noise 20%", rio, rio_c, lambda m: D.add_noise(m, _rng(6), 0.2)),
        ("layers reordered", rio, rio_c, lambda m: D.relayer(m, [2, 3, 0, 1])),
        ("layer dropped", "ft_a1", ["base_a"], lambda m: D.relayer(m, [0, 1, 3])),
        ("layer duplicated", "ft_a1", ["base_a"], lambda m: D.relayer(m, [0, 1, 1, 2, 3])),
        ("MLP pruned to 80% + permuted", rio, rio_c, lambda m: D.permute_mlp(D.prune_mlp(m, _rng(7), 0.8), _rng(8))),
        ("heads pruned (1 of 2 KV groups)", "ft_a1", ["base_a"], lambda m: D.prune_heads(m, 1)),
        ("vocab reordered (tokenizers)", rio, ["tok:ft_a1", "tok:ft_a2"],
         lambda m: D.revocab(m, order, tokens=TOKENS)),
        ("vocab extended +40 (tokenizers)", rio, ["tok:ft_a1", "tok:ft_a2"],
         lambda m: D.revocab(m, order, 40, _rng(9), tokens=TOKENS)),
        ("vocab truncated to 200 (tokenizers)", rio, ["tok:ft_a1", "tok:ft_a2"],
         lambda m: D.revocab(m, order[:200], tokens=TOKENS)),
        ("vocab reordered (no tokenizer)", "ft_a1", ["base_a"], lambda m: D.revocab(m, order)),
        ("norm gains folded", rio, rio_c, D.fold_norms),
        ("folded + residual rotated", rio, rio_c, fold_rot),
        ("folded + rotated, MoE", moe, moe_c, fold_rot),
        ("folded + rotated + MLP permuted", rio, rio_c, lambda m: D.permute_mlp(fold_rot(m), _rng(10))),
        ("merge, permuted, GGUF Q8_0", rio, rio_c, ("gguf", "Q8_0", perms)),
        ("merge, permuted, GGUF Q4_K, wide", wm, wm_c, ("gguf", "Q4_K", perms)),
        ("merge, folded+rotated, Q4_K, wide", wm, wm_c, ("gguf", "Q4_K", fold_rot)),
        ("reordered+pruned+permuted+Q8_0", rio, rio_c,
         ("gguf", "Q8_0", lambda m: perms(D.prune_mlp(D.relayer(m, [1, 0, 3, 2]), _rng(11), 0.9)))),
    ]
    print(f"{'transformation':40s} {'found':5s} {'answer':18s} {'parents':24s} {'log10 p':>9s} {'w err':>6s} "
          f"{'s':>5s}  undone")
    n_ok, werrs = 0, []
    for k, (label, src, cands, how) in enumerate(rows):
        m = D.load(c[src])
        cand_paths = [tok[x[4:]] if x.startswith("tok:") else c[x] for x in cands]
        if isinstance(how, tuple):
            kind, arg, fn = how
            m = fn(m)
            path = D.write_gguf(m, work / f"s{k}.gguf", arg) if kind == "gguf" else D.save(m, work / f"s{k}", arg)
        else:
            path = D.save(how(m), work / f"s{k}")
        t0 = time.perf_counter()
        v = decide(run_audit(str(path), [str(p) for p in cand_paths]))
        dt = time.perf_counter() - t0
        truth = corpus[src] if src in corpus else {"kind": "merge", "method": "linear",
                                                   "coefficients": {"wide_ft1": 0.6, "wide_ft2": 0.4}}
        names = [Path(p).name.removeprefix("tok-") for p in cand_paths]
        got = {p["model"].removeprefix("tok-"): p.get("weight") for p in v["parents"]}
        if truth["kind"] == "finetune":
            found = v["relation"] == "finetune" and list(got) == names
            werr = None
        else:
            found = v["relation"] == "merge" and v["method"] == truth["method"]
            coef = truth.get("coefficients") or {}
            werr = max(abs(got.get(n, 0.0) - coef[n]) for n in names) if coef else None
        n_ok += found
        if werr is not None:
            werrs.append(werr)
        lp = max(x["log10_p"] for x in v["p_values"].values())
        undone = "; ".join(dict.fromkeys(n for a in v.get("alignment", {}).values() for n in a["undone"]))
        ans = f"{v['relation']}/{v['method'] or '-'}"
        par = ", ".join(f"{n}" + (f" {w:.3f}" if isinstance(w, float) else "") for n, w in got.items())
        print(f"{label:40s} {'yes' if found else 'NO':5s} {ans:18s} {par[:24]:24s} {lp:9.1f} "
              f"{'' if werr is None else f'{werr:.4f}':>6s} {dt:5.2f}  {undone[:110]}")
    print(f"\nfound {n_ok}/{len(rows)}; max recipe-weight error {max(werrs):.4f} (target <= 0.02)")
    null(corpus, work)


def null(corpus, work: Path) -> None:
    pairs = independent_pairs(corpus)
    res = []
    t0 = time.perf_counter()
    for k, (a, b) in enumerate(pairs):
        res.append(_pair(corpus.path(a), corpus.path(b), "natural"))
        if k < 40:  # adversarial: b given a's per-layer std curve and gain level/spread, half also permuted
            ma, mb = D.load(corpus.path(a)), D.load(corpus.path(b))
            fooled = D.share_gain_direction(D.match_std_curve(mb, ma), ma)
            if k % 2:
                fooled = perms(fooled, k)
            res.append(_pair(corpus.path(a), D.save(fooled, work / f"adv{k}"), "adversarial"))
    dt = time.perf_counter() - t0
    for kind in ("natural", "adversarial", "all"):
        sel = [r for r in res if kind == "all" or r[0] == kind]
        vp = np.array([r[1] for r in sel])
        mp = np.array([r[2] for r in sel if r[2] is not None])
        print(f"null, {kind:11s}: {len(sel):3d} pairs; verdict p: false positives at p < 1e-6 {int((vp < -6).sum())}"
              f", min p 1e{vp.min():.2f}; match test ({len(mp)} pairs): false positives {int((mp < -6).sum())}, "
              f"min p 1e{mp.min():.2f}, KS uniformity p = {sps.kstest(10 ** mp, 'uniform').pvalue:.3f}, "
              f"share p < 0.05 = {np.mean(10 ** mp < 0.05):.3f}")
    print(f"({dt:.1f} s for {len(res)} audits)")


def _pair(a: Path, b: Path, kind: str) -> tuple[str, float, float | None]:
    run = run_audit(str(a), [str(b)])
    v = decide(run)
    al = run.alignments[0]
    return kind, v["p_values"][v["candidates"][0]]["log10_p"], (al.log10p if al is not None and al.tests else None)


if __name__ == "__main__":
    main()
