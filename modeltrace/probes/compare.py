"""`probe compare`: a black-box provenance test (after Nikolić et al., 2025: output similarity against a baseline of
unrelated models, Holm–Bonferroni corrected).

The same prompts go to the suspect, every candidate and every reference: half drawn at random from the prompt bank
and from random word strings, half chosen where the suspect's first answer token is least certain (highest
entropy), because confident prompts ("the capital of France") get the same answer from every model. Chosen from
the suspect's own outputs only, the selection treats candidates and references alike, so it cannot favour either.

Per prompt, the suspect's greedy answer is compared with each model's (a character-level sequence-matching ratio,
tokenizer-agnostic) and, where next-token distributions are available with the same vocabulary, the distributions
along the suspect's answer are compared (overlap = sum of min(p, q) = 1 - total variation). A candidate counts as
related when it is more similar to the suspect than *each* unrelated reference is (paired one-sided t-tests over
prompts, combined as an intersection-union test: the largest p), and the candidates' p-values are Holm-adjusted.
Like every similarity test this cannot tell a parent from a sibling or a child; weights can (modeltrace audit).
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np

from modeltrace.errors import InputError
from modeltrace.probes.backends import Backend, ChatRequest, LocalBackend, Progress
from modeltrace.probes.bank import Prompt, general_prompts, random_word_prompts
from modeltrace.stats import format_p, holm, intersection_union, mean_interval, paired_greater

TEXT_CHARS = 300


def greedy_similarity(a: str | None, b: str | None) -> float:
    """Sequence-matching ratio of two answers' first characters (whitespace normalised); NaN if either is missing."""
    if a is None or b is None:
        return math.nan
    a, b = " ".join(a.split())[:TEXT_CHARS], " ".join(b.split())[:TEXT_CHARS]
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def overlap(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over positions of sum(min(p, q)): 1 for identical next-token distributions, 0 for disjoint ones."""
    k = min(len(p), len(q))
    if k == 0:
        return math.nan
    return float(np.minimum(p[:k].astype(np.float32), q[:k].astype(np.float32)).sum(-1).mean())


def logprob_overlap(a: dict[str, float] | None, b: dict[str, float] | None) -> float:
    """The same overlap on the first answer token from endpoints' top log-probabilities (a lower bound: tokens
    outside both top-k lists are left out)."""
    if not a or not b:
        return math.nan
    return float(sum(min(math.exp(a[t]), math.exp(b[t])) for t in set(a) & set(b)))


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _lp_entropy(lp: dict[str, float] | None) -> float:
    if not lp:
        return math.nan
    ps = np.array([math.exp(v) for v in lp.values()])
    rest = max(0.0, 1.0 - ps.sum())
    return entropy(np.append(ps, rest))


def choose_prompts(suspect: Backend, n: int, seed: int, max_tokens: int,
                   progress: Progress | None) -> tuple[list[Prompt], list[dict], dict[int, Any]]:
    """Half random, half highest suspect entropy. Returns the prompts, how each was chosen, and any suspect answers
    already obtained while scoring (index -> ChatResult) so they are not asked twice."""
    rng = random.Random(seed)
    pool = list(general_prompts()) + random_word_prompts(max(4 * n, 120), seed)
    rng.shuffle(pool)
    n_rand = n - n // 2
    chosen = pool[:n_rand]
    info = [{"chosen": "random"} for _ in chosen]
    rest = pool[n_rand:]
    n_ent = n - n_rand
    pre: dict[int, Any] = {}
    if n_ent == 0:
        return chosen, info, pre
    ents: list[float] = []
    if isinstance(suspect, LocalBackend):
        probs = suspect.next_token_probs([_msgs(p) for p in rest], [[] for _ in rest], 1)
        ents = [entropy(p[0].astype(np.float64)) for p in probs]
        if progress:
            progress(len(rest))
        scored = rest
    else:
        scored = rest[: 3 * n_ent]  # each scoring is a paid request: a bounded pool
        ask = [ChatRequest(_msgs(p), max_tokens=max_tokens, greedy=True, top_logprobs=20) for p in scored]
        res = suspect.chat(ask[:1], progress)  # one request tells whether the server returns log-probabilities
        if res[0].first_logprobs is None:
            pre[len(chosen)] = res[0]
            for p in scored[:n_ent]:  # no log-probabilities: these stay random draws
                chosen.append(p)
                info.append({"chosen": "random (no log-probabilities for entropy)"})
            return chosen, info, pre
        res += suspect.chat(ask[1:], progress)
        ents = [_lp_entropy(r.first_logprobs) for r in res]
        for j, r in enumerate(res):
            pre[j] = r
    order = sorted(range(len(scored)), key=lambda j: -(ents[j] if not math.isnan(ents[j]) else -1))[:n_ent]
    remap = {}
    for j in order:
        remap[len(chosen)] = pre.get(j)
        chosen.append(scored[j])
        info.append({"chosen": "entropy", "suspect_entropy": round(ents[j], 4)})
    return chosen, info, {k: v for k, v in remap.items() if v is not None}


def _msgs(p: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": p.text}]


def run_compare(suspect: str, candidates: list[str], references: list[str], opener: Callable[[str], Backend],
                n_prompts: int = 48, max_tokens: int = 32, positions: int = 8, seed: int = 0, alpha: float = 0.01,
                progress_factory: Callable[[str, int], Progress] | None = None) -> dict[str, Any]:
    """Open the models one at a time (a large model never shares memory with another), query each with the same
    prompts, test every candidate against the references. `opener(spec)` returns a Backend."""
    if not candidates:
        raise InputError("give at least one --candidate")
    names = [suspect, *candidates, *references]
    if len(set(names)) != len(names):
        raise InputError("the suspect, candidates and references must all be different models")
    if not references and len(candidates) < 2:
        raise InputError("probe compare needs a baseline: give --reference models unrelated to the suspect (or at "
                         "least two candidates, which then serve as each other's baseline)")
    if n_prompts < 4:
        raise InputError("--prompts must be at least 4")

    def bar(label: str, total: int) -> Progress | None:
        return progress_factory(label, total) if progress_factory else None

    warnings: list[str] = []
    with opener(suspect) as s:
        prompts, info, pre = choose_prompts(s, n_prompts, seed, max_tokens, bar("choosing prompts", 0))
        todo = [i for i in range(len(prompts)) if i not in pre]
        res = s.chat([ChatRequest(_msgs(prompts[i]), max_tokens=max_tokens, greedy=True) for i in todo],
                     bar(f"suspect {suspect}", len(todo)))
        s_out = dict(pre)
        s_out.update(dict(zip(todo, res, strict=True)))
        s_res = [s_out[i] for i in range(len(prompts))]
        s_text = [r.text if r.error is None else None for r in s_res]
        s_lp = [r.first_logprobs for r in s_res]
        suspect_desc = s.describe()  # after the requests: it reports what the endpoint turned out to support
        s_local = isinstance(s, LocalBackend)
        s_vocab = s.vocab_hash if s_local else None
        s_dist = None
        if s_local:
            s_dist = [d.astype(np.float16) for d in s.next_token_probs(
                [_msgs(p) for p in prompts], [r.token_ids or [] for r in s_res], positions)]
    if sum(t is None for t in s_text) > len(prompts) // 2:
        raise InputError(f"the suspect answered only {sum(t is not None for t in s_text)} of {len(prompts)} "
                         "prompts; nothing to compare")

    models: list[dict[str, Any]] = []
    outputs: dict[str, list[str | None]] = {suspect: s_text}
    for role, spec in [("candidate", c) for c in candidates] + [("reference", r) for r in references]:
        with opener(spec) as m:
            res = m.chat([ChatRequest(_msgs(p), max_tokens=max_tokens, greedy=True,
                                      top_logprobs=20 if any(s_lp) else 0) for p in prompts],
                         bar(f"{role} {spec}", len(prompts)))
            texts = [r.text if r.error is None else None for r in res]
            g = [greedy_similarity(a, b) for a, b in zip(s_text, texts, strict=True)]
            d = [math.nan] * len(prompts)
            dist_note = None
            if s_dist is not None and isinstance(m, LocalBackend):
                if m.vocab_hash == s_vocab:
                    probs = m.next_token_probs([_msgs(p) for p in prompts], [r.token_ids or [] for r in s_res],
                                               positions)
                    d = [overlap(a, b) if s_text[i] is not None else math.nan
                         for i, (a, b) in enumerate(zip(s_dist, probs, strict=True))]
                else:
                    dist_note = "different tokenizer: next-token distributions not comparable"
            elif any(s_lp):
                d = [logprob_overlap(a, r.first_logprobs) for a, r in zip(s_lp, res, strict=True)]
            models.append({"model": spec, "role": role, "describe": m.describe(), "greedy": g, "distribution": d,
                           "exact": [a is not None and a == b for a, b in zip(s_text, texts, strict=True)],
                           "answered": sum(t is not None for t in texts), "note": dist_note})
            outputs[spec] = texts
            if sum(t is None for t in texts) > len(prompts) // 4:
                warnings.append(f"{spec} answered only {sum(t is not None for t in texts)} of {len(prompts)} "
                                "prompts")

    def has_dist(m: dict) -> bool:
        return sum(np.isfinite(m["distribution"])) >= max(4, len(prompts) // 2)

    metric = "distribution" if all(has_dist(m) for m in models) else "greedy"
    if metric == "greedy" and any(has_dist(m) for m in models):
        warnings.append("next-token distributions are not available for every model; the test uses greedy "
                        "outputs only")
    cands = [m for m in models if m["role"] == "candidate"]
    refs = [m for m in models if m["role"] == "reference"]
    if not refs:
        warnings.append("no --reference given: candidates serve as each other's baseline, so two related "
                        "candidates hide each other")
    for metric_name in ("greedy", "distribution"):
        ps = []
        for c in cands:
            base = refs or [o for o in cands if o is not c]
            per = {b["model"]: paired_greater(c[metric_name], b[metric_name]) for b in base}
            c.setdefault("tests", {})[metric_name] = {"p_vs_reference": per, "p": intersection_union(per.values())}
            ps.append(c["tests"][metric_name]["p"])
        for c, adj in zip(cands, holm(ps) if ps else [], strict=True):
            c["tests"][metric_name]["p_adjusted"] = adj

    rows = []
    for m in models:
        row = {"model": m["model"], "role": m["role"], "answered": m["answered"],
               "exact_match": float(np.mean(m["exact"]))}
        for key in ("greedy", "distribution"):
            vals = [v for v in m[key] if np.isfinite(v)]
            mean, lo, hi = mean_interval(vals) if vals else (math.nan,) * 3
            row[key] = None if not vals else {"mean": mean, "interval": [lo, hi], "prompts": len(vals)}
        if m["role"] == "candidate":
            t = m["tests"][metric]
            row.update({"p": t["p"], "p_adjusted": t["p_adjusted"], "p_vs_reference": t["p_vs_reference"],
                        "p_text": format_p(math.log10(max(t["p_adjusted"], 1e-300))),
                        "related": t["p_adjusted"] < alpha,
                        "other_metric": {k: {"p_adjusted": v["p_adjusted"]} for k, v in m["tests"].items()
                                         if k != metric}})
        if m["note"]:
            row["note"] = m["note"]
        rows.append(row)
    related = sorted([r for r in rows if r.get("related")], key=lambda r: -(r[metric] or {"mean": 0})["mean"])
    report = {
        "probe": "compare",
        "suspect": suspect_desc,
        "metric": metric,
        "alpha": alpha,
        "settings": {"prompts": len(prompts), "max_tokens": max_tokens, "positions": positions, "seed": seed,
                     "random_prompts": sum(i["chosen"].startswith("random") for i in info),
                     "entropy_prompts": sum(i["chosen"] == "entropy" for i in info)},
        "models": rows,
        "behaves_like": [r["model"] for r in related],
        "prompts": [{"id": p.id, "lang": p.lang, "text": p.text, "origin": p.origin, **i}
                    for p, i in zip(prompts, info, strict=True)],
        "outputs": outputs,
        "warnings": warnings,
    }
    report["summary"] = _summary(report)
    return report


def _summary(rep: dict) -> str:
    cands = [r for r in rep["models"] if r["role"] == "candidate"]
    if rep["behaves_like"]:
        parts = [f"{r['model']} ({r['p_text']}, Holm-adjusted)" for r in cands if r.get("related")]
        s = (f"The suspect behaves like {', '.join(parts)}: closer on {rep['metric']} similarity than every "
             "unrelated reference.")
        others = [r["model"] for r in cands if not r.get("related")]
        if others:
            s += f" No evidence for {', '.join(others)}."
        return s + (" Black-box similarity cannot tell a parent from a sibling or a child; weights can "
                    "(modeltrace audit).")
    return (f"No candidate is closer to the suspect than the unrelated references are (alpha {rep['alpha']:g}, "
            f"{rep['metric']} similarity over {rep['settings']['prompts']} prompts). Absence of evidence is not "
            "independence: a heavily fine-tuned or distilled model can drift away from its parent's outputs.")
