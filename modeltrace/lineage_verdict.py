"""The verdict's parts that reach beyond one recipe: weights pooled across tensors with their intervals, and the
answer when training is involved (who is the parent, sibling, descendant, or a merge then trained), from the exact
squared distances the streaming pass summed (relatives.py holds the geometry). Pure functions of an AuditRun."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from modeltrace.audit import AuditRun, SlotResult
from modeltrace.relatives import place
from modeltrace.stats import format_p, mean_interval, pooled_interval


def pooled(values: list[float], ses: list[float]) -> float | None:
    """One weight from per-tensor estimates: precision-weighted where standard errors exist (tensors that cannot
    tell the parents apart drop out), else the mean."""
    m = parent_entry("", values, ses)["weight"]
    return None if m is None else round(float(m), 4)


def parent_entry(model: str, values: list[float], ses: list[float] | None = None,
                 floor: float = 2.0**-23) -> dict[str, Any]:
    """A parent with its weight pooled over tensors and a 95% interval (rounded outwards, so that display rounding
    never excludes what the interval contains). `floor`: the smallest half-width, the resolution of the storage
    (rounding.RESOLUTION over rounded storage), with standard errors or without."""
    if ses is not None and any(np.isfinite(x) for x in ses):
        m, lo, hi = pooled_interval(values, [x if np.isfinite(x) or x == np.inf else np.inf for x in ses],
                                    floor=floor)
    else:  # no standard errors (task arithmetic, model stock): the spread over tensors, never below the floor
        m, lo, hi = mean_interval(values)
        if np.isfinite(m):
            half = max(hi - m, m - lo, floor * max(1.0, abs(m)))
            lo, hi = m - half, m + half
    if not np.isfinite(m):
        return {"model": model, "weight": None, "interval": None}
    return {"model": model, "weight": round(m, 4),
            "interval": [math.floor(lo * 1e6) / 1e6, math.ceil(hi * 1e6) / 1e6]}


def _distances(run: AuditRun, matrix: list[SlotResult]) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared distances between all models, summed over the slots on which every model was compared."""
    n = len(run.views)
    D, norms = np.zeros((n, n)), np.zeros(n)
    full = [r for r in matrix if len(r.cands) == n - 1] or matrix
    for r in full:
        idx = [0] + list(r.cands)
        e = r.stats.sqdist()
        D[np.ix_(idx, idx)] += e
        norms[idx] += np.diag(r.stats.G)
    return D, norms


def trained(out: dict[str, Any], run: AuditRun, matrix: list[SlotResult], related: list[int],
             logp: dict[int, float], merge_weights: dict[int, list[float]]) -> dict[str, Any]:
    """Training is involved (no recipe explains the suspect down to its storage rounding). A parent is named only
    when the base of the family is known (given, or inferred) and says which way the line of descent runs
    (relatives.place); otherwise the nearest relatives are named with the direction left open."""
    names = {i: v.label for i, v in enumerate(run.views)}
    s = names[0]
    D, norms = _distances(run, matrix)
    pl = place(D, norms, [c for c in range(1, len(run.views)) if c in related], run.base)
    heavy = [c for c, v in merge_weights.items() if c != run.base and float(np.mean(v)) >= 0.1]
    p_of = {c: format_p(logp[c]) for c in related}
    if run.base is not None and run.base in related:
        # a merge then trained: S - M is mostly a combination of two or more task vectors P_i - M
        others = [c for c in related if c != run.base]
        lam, explained = _delta_fit(D, others, run.base)
        parts = [(c, w) for c, w in zip(others, lam, strict=True) if w >= 0.1]
        if len(parts) >= 2 and explained >= CHAIN_SHARE:
            out["relation"] = "finetune"
            out["chain"] = [{"step": "merge", "parents": {names[c]: round(w, 4) for c, w in parts},
                             "base": names[run.base]}, {"step": "finetune"}]
            terms = " + ".join(f"{w:.2f}·{names[c]}" for c, w in parts)
            out["parents"] = [{"model": names[c], "weight": round(w, 4), "interval": None} for c, w in parts]
            out["summary"] = (f"{s} is a fine-tune of a merge: {names[run.base]} + task vectors {terms} (their "
                              f"difference from {names[run.base]}) explain {100 * explained:.0f}% of its own, and "
                              "training left the rest (a residual above storage rounding in most tensors).")
            return out
    if pl.parent is not None:
        assert run.base is not None  # a parent is placed only against a known base (relatives.place)
        out["relation"] = "finetune"
        out["direction"] = "parent-to-suspect"
        w = [r.fit.free_weights.get(pl.parent, np.nan) for r in matrix]
        out["parents"] = [parent_entry(names[pl.parent], w)]
        how = "the base" + (" (inferred: the other candidates meet at it)" if run.base_inferred else "")
        chain = f", itself a fine-tune of {names[run.base]}" if pl.parent != run.base else ""
        text = (f"{s} is a fine-tune of {names[pl.parent]}{chain} (independent of {names[pl.parent]}: "
                f"{p_of.get(pl.parent, '?')}); direction from {names[run.base]}, {how}.")
        if pl.siblings:
            out["siblings"] = [names[c] for c in pl.siblings]
            text += f" Siblings (fine-tunes of {names[run.base]} too): {', '.join(out['siblings'])}."
        if pl.descendants:
            out["descendants"] = [names[c] for c in pl.descendants]
            text += f" Derived from {s} in turn: {', '.join(out['descendants'])}."
        out["summary"] = text
        return out
    near = pl.nearest if pl.nearest is not None else min(related, key=lambda i: logp[i])
    rel = sorted(related, key=lambda c: D[0, c])
    out["relation"] = "related"
    out["direction"] = "unknown"
    out["parents"] = [{"model": names[c]} for c in rel]
    if len(heavy) >= 2:
        hint = [parent_entry(names[c], merge_weights[c]) for c in heavy]
        out["recipe_hint"] = hint
        terms = " + ".join(f"{p['weight']:.2f}·{p['model']}" for p in hint)
        out["summary"] = (f"{s} is related to {', '.join(names[c] for c in heavy)}: the best merge recipe, {terms}, "
                          "leaves a residual above storage rounding in most tensors, and a merge involves no "
                          "training: a merge of them then trained or perturbed, or a relative through a common "
                          "ancestor not among the candidates (offer it as a candidate or with --base).")
        return out
    also = [names[c] for c in rel if c != near]
    out["summary"] = (f"{s} is related to {names[near]} through training ({p_of.get(near, '?')})"
                      + (f", and to {', '.join(also)}" if also else "")
                      + f": a parent, a sibling or a child of {names[near]} cannot be told apart without their common "
                      "base; offer it as a candidate or with --base.")
    return out


#: A merge then trained is named as such when the parents' task vectors explain this share of the suspect's
#: difference from the base (two sibling fine-tunes of one task explain ~0.3-0.5 of each other's).
CHAIN_SHARE = 0.75


def _delta_fit(D: np.ndarray, parents: list[int], base: int) -> tuple[list[float], float]:
    """Task-vector weights of S - M on the parents' P_i - M, and the share of ||S - M||^2 they explain (the Gram of
    differences from the exact distances)."""
    idx = [0] + parents
    G = np.array([[0.5 * (D[i, base] + D[j, base] - D[i, j]) for j in idx] for i in idx])
    if G[0, 0] <= 0:
        return [0.0] * len(parents), 0.0
    A, b = G[1:, 1:], G[1:, 0]
    w = np.linalg.lstsq(A, b, rcond=1e-12)[0]
    return [float(x) for x in w], float(b @ w / G[0, 0])


def upcycled(out: dict[str, Any], run: AuditRun, related: list[int], logp: dict[int, float]) -> dict[str, Any] | None:
    """A mixture of experts whose experts were compared with a dense candidate's MLP (audit._upcycle_source): named
    as upcycled from it, with which experts are still exact copies and which were trained further; None when that
    candidate is not related (the experts then did not come from it)."""
    names = {i: v.label for i, v in enumerate(run.views)}
    cross = [r for r in run.slots if r.cross]
    dense = max({c for r in cross for c in r.cross}, key=lambda c: sum(1 for r in cross if c in r.cross))
    if dense not in related:
        return None
    experts: dict[tuple[int, int], bool] = {}
    for r in cross:
        if dense in r.cross:
            key = (r.slot.layer, r.slot.expert)
            experts[key] = experts.get(key, True) and r.fit.method == "copy" and dense in r.fit.weights
    rest = [r for r in run.slots if not r.cross and dense in r.cands]
    rest_copied = sum(1 for r in rest if r.fit.method == "copy" and dense in r.fit.weights)
    layers = sorted({k[0] for k in experts})
    copied = sorted(k for k, v in experts.items() if v)
    s, d = names[0], names[dense]
    out["relation"] = "upcycled"
    out["method"] = "moe_upcycling"
    out["parents"] = [{"model": d}]
    out["upcycling"] = {"dense": d, "layers": len(layers), "experts": len(experts),
                        "experts_copied": [{"layer": k[0], "expert": k[1]} for k in copied],
                        "experts_trained": len(experts) - len(copied),
                        "other_tensors": {"compared": len(rest), "copied": rest_copied}}
    per_layer = len(experts) // max(len(layers), 1)
    out["summary"] = (f"{s} is a mixture of experts upcycled from {d}: each of its {per_layer} experts in "
                      f"{len(layers)} layers starts from {d}'s dense MLP of the same layer ({len(copied)} of "
                      f"{len(experts)} still exact copies, {len(experts) - len(copied)} trained further); of its other "
                      f"{len(rest)} compared tensors {rest_copied} are {d}'s exactly and the rest {d}'s trained "
                      f"further (independent of {d}: {format_p(logp[dense])}). Its router has no counterpart in {d}.")
    return out


__all__ = ["CHAIN_SHARE", "parent_entry", "pooled", "trained", "upcycled"]
