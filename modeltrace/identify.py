"""`modeltrace identify`: which indexed models a suspect is made from, and how, from fingerprints alone.

1. rank: cosine of summary vectors against the whole index (one matrix product);
2. test: the SHORTLIST best are compared sample by sample (the audit's independence statistic); p-values are
   Holm-adjusted over every indexed model, so a larger index asks for stronger evidence;
3. lineage: related models that are plausible merges of others (the suspect included) are descendants or siblings,
   not ancestors; a stack, copy or recipe is looked for among the rest, else the closest one is the parent;
4. verdict: the audit's own layer map, slot fits and verdict run on the chosen fingerprints, so relation, method and
   weights with intervals mean what they mean in `modeltrace audit`, which confirms them on the full weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from modeltrace.errors import InputError
from modeltrace.fingerprint.compare import PairEvidence, compare, fit, gram_stack
from modeltrace.fingerprint.core import Fingerprint
from modeltrace.fingerprint.lineage import Explanation, centre, explain, merges_among, stack_sources
from modeltrace.fingerprint.undisguise import Aligned, DisguiseEvidence, align_group, evidence
from modeltrace.fingerprint.view import fingerprint_views
from modeltrace.index.store import Index
from modeltrace.stats import format_p, holm_log10

#: Models compared sample by sample after the summary-vector ranking (fewer when their fingerprints are large:
#: at least MIN_SHORTLIST, and no more than SHORTLIST_BYTES of fingerprints loaded).
SHORTLIST = 32
MIN_SHORTLIST = 8
SHORTLIST_BYTES = 96 * 1024 * 1024
#: Related models (strongest evidence first) among which lineage and recipe are worked out ...
MAX_RELATED = 8
#: ... with this many reserved for each family (summary vectors alike), so a merge across families keeps both parents.
MIN_PER_FAMILY = 2
FAMILY_COSINE = 0.5
SCHEMA_VERSION = "1"


def _alpha_log10() -> float:
    from modeltrace.verdict import ALPHA

    return math.log10(ALPHA)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """identify multiplies many small matrices: on one BLAS thread it is ~3x faster and steady on a busy machine
    (measured: threads spin-waiting for each tiny product cost more than they compute)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def identify(suspect: Fingerprint, index: Index, top: int = 5) -> dict[str, Any]:
    """Rank `index` by evidence that its models are ancestors of `suspect`; relation and recipe among the top."""
    with _one_blas_thread():
        return _identify(suspect, index, top)


def _identify(suspect: Fingerprint, index: Index, top: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ids, names, mat, sizes = index.sketches()
    if not len(ids):
        raise InputError(f"{index.path}: the index is empty; add models with `modeltrace index add MODEL`")
    identical = index.by_hash(suspect.content_hash)
    sim = mat @ suspect.sketch()
    order: list[int] = []
    budget = 0
    for i in np.argsort(-sim, kind="stable"):
        if names[i] == identical:
            continue
        if len(order) >= SHORTLIST or (len(order) >= MIN_SHORTLIST and budget + sizes[i] > SHORTLIST_BYTES):
            break
        order.append(int(i))
        budget += int(sizes[i])
    row = {names[i]: i for i in order}
    loaded = index.load([int(ids[i]) for i in order])
    sims = {names[i]: float(sim[i]) for i in order}
    fps = dict(loaded)
    tested = list(fps)
    ev, dv = _pair_evidence(suspect, fps, tested)
    family = len(ids) - (1 if identical else 0)
    adj = dict(zip(tested, holm_log10([_log10_p(ev[n], dv[n]) for n in tested], family), strict=True))
    alpha = _alpha_log10()
    # how close, for ranking related models (the disguise tests' calibrated z saturates for any close relative)
    zs = {n: max(ev[n].z, dv[n].strength if dv[n] is not None else 0.0) for n in tested}
    strong = sorted((n for n in tested if adj[n] < alpha), key=lambda n: -zs[n])
    related = _diverse(strong, {n: mat[row[n]] for n in strong})
    label = suspect.label if suspect.label not in fps else f"{suspect.label} (suspect)"

    verdict: dict[str, Any] | None = None
    merges: dict[str, Explanation] = {}
    chosen: list[str] = []
    al: Aligned | None = None
    if related:
        al = align_group(suspect, fps, related, ev, dv, alpha)
        if al.mode == "tokens":  # only candidates whose residual basis was recovered take part in the fits
            related = [n for n in related if n in al.per_candidate]
    gnames = [label, *related]
    if related and al is not None:
        layer_maps = [{}, *(ev[n].layer_map if al.mode == "coordinates" else {} for n in related)]
        gs = gram_stack([al.suspect, *(al.fps[n] for n in related)], layer_maps, gnames)
        found = merges_among(gs, list(range(1, len(gnames))))
        merges = {gnames[i]: e for i, e in found.items()}
        pool = [i for i in range(1, len(gnames)) if i not in found]
        if al.mode == "invariant":  # candidates are compared in their own basis; the suspect only by invariants
            picked = sorted(pool, key=lambda i: -zs[gnames[i]])[:3]
            verdict = _invariant_verdict([gnames[i] for i in picked], al, adj)
        else:
            layered = any(k.layer >= 0 for k in al.suspect.slots)  # else every layer was disguised beyond use
            verdict, picked = _lineage_verdict(al.suspect, label, al.fps, gs, pool, gnames,
                                               _audit_on if al.mode != "tokens" and layered else _audit_tokens)
        chosen = [gnames[i] for i in picked]
    hits = _rank(verdict, chosen, related, merges, gnames, tested, adj, ev, sims, fps)
    if al is not None and al.notes:
        for h in hits:
            undone = al.per_candidate.get(h["model"]) or (al.notes if h["model"] in chosen else [])
            if undone and h["role"] != "unrelated":
                h["note"] = "; ".join(x for x in [h["note"], *undone] if x)
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "suspect": {"label": suspect.label, "spec": suspect.spec, "content_hash": suspect.content_hash,
                    "bytes_read": suspect.bytes_read, "total_bytes": suspect.model.get("total_bytes"),
                    "fingerprint_bytes": suspect.nbytes, "card_base_model": suspect.model.get("card", {})
                    .get("base_model", [])},
        "index": {"path": str(index.path), "models": int(len(ids)), "compared": len(tested)},
        "identical": identical,
        "related": bool(related),
        "relation": verdict["relation"] if verdict else "independent",
        "method": verdict.get("method") if verdict else None,
        "parents": verdict["parents"] if verdict else [],
        "base": verdict.get("base") if verdict else None,
        "hits": hits[:top],
        "summary": _summary(verdict, hits, adj, family, identical) + _disguise_text(al, verdict),
        "disguise": {"evidence": al.mode, "undone": al.notes} if al is not None and al.notes else None,
        "verdict": verdict,
        "audit_command": _audit_command(suspect, verdict, fps, chosen) if verdict else None,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    from modeltrace.tree.graph import ancestry  # ancestors of ancestors, from the family tree when it was built

    out["ancestry"] = ancestry(index, [p["model"] for p in out["parents"]])
    declared = out["suspect"]["card_base_model"]
    if verdict and verdict["relation"] not in ("independent",) and not declared:
        out["undisclosed"] = "the model card names no base_model although ancestors were found"
    return out


def _pair_evidence(suspect: Fingerprint, fps: dict[str, Fingerprint], names: list[str]
                   ) -> tuple[dict[str, PairEvidence], dict[str, DisguiseEvidence | None]]:
    """Coordinate and disguise-robust evidence (v2 fingerprints) of the suspect against each shortlisted model, on
    two threads: the work is numpy products of a few MB that release the GIL, and the suspect's side of each test is
    computed once (undisguise._memo)."""
    def one(n: str) -> tuple[PairEvidence, DisguiseEvidence | None]:
        e = compare(suspect, fps[n])
        return e, evidence(suspect, fps[n], e)

    workers = min(2, os.cpu_count() or 1, max(1, len(names)))
    if workers > 1:
        got = [one(names[0])]  # fills the suspect's memo before the threads share it
        with ThreadPoolExecutor(max_workers=workers) as pool:
            got += pool.map(one, names[1:])
    else:
        got = [one(n) for n in names]
    return ({n: g[0] for n, g in zip(names, got, strict=True)}, {n: g[1] for n, g in zip(names, got, strict=True)})


def _log10_p(e: PairEvidence, d: DisguiseEvidence | None) -> float:
    """Coordinate evidence, or the disguise-robust tests where the fingerprints carry them (Bonferroni over both)."""
    if d is None:
        return e.log10_p
    return min(0.0, min(e.log10_p, d.log10_p) + math.log10(2))


def _invariant_verdict(parents: list[str], al: Aligned, adj: dict[str, float]) -> dict[str, Any]:
    """What identify can say when only disguise-invariant evidence relates the suspect: who, not how."""
    p = format_p(max(adj[n] for n in parents))
    return {"relation": "related", "method": None, "base": None,
            "parents": [{"model": n, "evidence": "invariant"} for n in parents],
            "summary": f"derived from {', '.join(parents)} or their relatives through a disguise "
                       f"({'; '.join(al.notes)}); {p}. Fingerprints hold no coordinates that survive it: run the "
                       "`modeltrace audit` below for relation and recipe"}


def _disguise_text(al: Aligned | None, verdict: dict[str, Any] | None) -> str:
    if al is None or not al.notes or not verdict or verdict["relation"] in ("independent", "related"):
        return ""
    return f" (disguise undone: {'; '.join(al.notes)})"


def _diverse(ordered: list[str], sketches: dict[str, np.ndarray]) -> list[str]:
    """The strongest related models, keeping room for every family: a merge across families needs both parents,
    however many relatives the stronger family has in the index. Families are groups of alike summary vectors."""
    families: list[list[str]] = []
    for n in ordered:
        home = next((f for f in families if float(sketches[n] @ sketches[f[0]]) >= FAMILY_COSINE), None)
        if home is None:
            families.append([n])
        else:
            home.append(n)
    picked = [n for f in families for n in f[:MIN_PER_FAMILY]][:MAX_RELATED]
    picked += [n for n in ordered if n not in picked][:MAX_RELATED - len(picked)]
    return sorted(picked, key=ordered.index)


# ---- lineage -> verdict ----------------------------------------------------------------------------------------
def _audit_on(suspect: Fingerprint, label: str, fps: dict[str, Fingerprint], cands: list[str],
              base: str | None) -> dict[str, Any]:
    """The audit's layer map, streaming slot fits and verdict, on fingerprint samples."""
    from modeltrace.audit import run_views
    from modeltrace.verdict import decide

    views = fingerprint_views([suspect, *(fps[c] for c in cands)], [label, *cands])
    base_idx = cands.index(base) + 1 if base is not None else None
    return decide(run_views(views, base_idx))  # type: ignore[arg-type]


def _audit_tokens(suspect: Fingerprint, label: str, fps: dict[str, Fingerprint], cands: list[str],
                  base: str | None) -> dict[str, Any]:
    """`_audit_on` for fingerprints reduced to token rows (a residual stream re-based): no layers to map."""
    from modeltrace.audit import run_views
    from modeltrace.verdict import decide

    views = fingerprint_views([suspect, *(fps[c] for c in cands)], [label, *cands])
    base_idx = cands.index(base) + 1 if base is not None else None
    return decide(run_views(views, base_idx, layer_matches=[]))  # type: ignore[arg-type]


def _lineage_verdict(suspect: Fingerprint, label: str, fps: dict[str, Fingerprint], gs, pool: list[int],
                     gnames: list[str], audit=_audit_on) -> tuple[dict[str, Any] | None, list[int]]:
    def run(members: list[int], base: int | None) -> dict[str, Any]:
        return audit(suspect, label, fps, [gnames[m] for m in members], gnames[base] if base is not None else None)

    if not pool:
        return None, []
    stack = stack_sources(gs, pool)
    if stack:
        return run(stack, None), stack
    exp = explain(gs, 0, pool)
    if exp is not None:
        members = sorted(exp.weights, key=lambda m: -abs(exp.weights[m]))
        base = exp.base
        if exp.kind == "exact" and base is None and len(members) == 3:
            base = centre(gs, members)
        if exp.kind == "sparse":
            members = [*members, exp.base]  # type: ignore[list-item]
        return run(members, base), members
    if len(pool) >= 3:  # no exact or sparse signature: let the audit's detectors judge the three strongest
        three = pool[:3]
        base = centre(gs, three)
        if base is not None:
            v = run(three, base)
            if v["relation"] == "merge":
                return v, three
    parent = min(pool, key=lambda m: fit(gs, 0, (m,)).rho)  # a fine-tune: the closest non-merge relative
    return run([parent], None), [parent]


# ---- presentation ----------------------------------------------------------------------------------------------
def _rank(verdict: dict | None, chosen: list[str], related: list[str], merges: dict[str, Explanation],
          gnames: list[str], tested: list[str], adj: dict[str, float], ev: dict[str, PairEvidence],
          sims: dict[str, float], fps: dict[str, Fingerprint]) -> list[dict[str, Any]]:
    roles: dict[str, tuple[str, str]] = {}
    if verdict:
        weights = {p["model"]: p for p in verdict.get("parents", [])}
        parents = sorted(weights, key=lambda m: -abs(weights[m].get("weight") or weights[m].get("layers") or 0))
        for p in parents:
            w = weights[p]
            note = (f"weight {w['weight']:.4f} [{w['interval'][0]:.4f}, {w['interval'][1]:.4f}]" if "weight" in w
                    else f"{w['layers']} layers" if "layers" in w else "")
            roles[p] = ("parent", note)
        if verdict.get("base") and verdict["base"] not in roles:
            roles[verdict["base"]] = ("base", f"base model of the {verdict.get('method') or 'merge'}")
        for c in chosen:
            roles.setdefault(c, ("parent" if verdict["relation"] != "independent" else "related", ""))
    for n in related:
        if n in merges:
            e = merges[n]
            parts = [gnames[m] for m in e.members]
            kind = "descendant" if 0 in e.members else "merge"
            what = "a merge of the suspect and " + ", ".join(p for p in parts if p != gnames[0]) \
                if kind == "descendant" else "a merge of " + ", ".join(parts)
            roles.setdefault(n, (kind, what + f" ({e.kind})"))
        else:
            roles.setdefault(n, ("related", ""))
    first = [n for n in roles if roles[n][0] in ("parent", "base")]
    middle = [n for n in related if n not in first and roles[n][0] == "related"]
    later = [n for n in related if n not in first and n not in middle]
    rest = sorted((n for n in tested if n not in roles), key=lambda n: (adj[n], -sims[n]))
    out = []
    for rank, n in enumerate([*first, *middle, *later, *rest], 1):
        role, note = roles.get(n, ("unrelated", ""))
        e = ev[n]
        out.append({"rank": rank, "model": n, "spec": fps[n].spec, "role": role, "similarity": round(sims[n], 4),
                    "corr": round(e.corr, 4), "log10_p": round(adj[n], 2), "p": format_p(adj[n]), "note": note})
    return out


def _summary(verdict: dict | None, hits: list[dict], adj: dict[str, float], family: int, identical: str | None
             ) -> str:
    prefix = f"identical to indexed {identical}; " if identical else ""
    if not verdict or verdict["relation"] == "independent":
        later = [h["model"] for h in hits if h["role"] == "descendant"]
        if later:
            return prefix + f"no ancestor in the index; made from the suspect: {', '.join(later)}"
        best = hits[0] if hits else None
        closest = f" (closest: {best['model']}, {best['p']} after Holm over {family} models)" if best else ""
        return prefix + f"no ancestor in the index{closest}"
    rel, method = verdict["relation"], verdict.get("method")
    parents = [p["model"] for p in verdict["parents"]]
    named = parents + ([verdict["base"]] if verdict.get("base") and verdict["base"] not in parents else [])
    p_text = format_p(max(adj.get(n, 0.0) for n in named)) if named else ""
    if rel == "merge":
        base = verdict.get("base")
        if base and method not in ("linear", "slerp"):
            terms = " + ".join(f"{p['weight']:.2f} × ({p['model']} − {base})" for p in verdict["parents"])
            recipe = f"{base} + {terms}"
        else:
            recipe = " + ".join(f"{p['weight']:.2f} × {p['model']}" for p in verdict["parents"])
        if method == "slerp":
            t = verdict.get("parameters", {}).get("t", {}).get("value")
            recipe = f"slerp({', '.join(parents)}, t = {t})"
        return prefix + f"{recipe}, {method}; {p_text}"
    if rel == "finetune":
        return prefix + f"fine-tune of {parents[0]}; {p_text}"
    if rel == "stack":
        return prefix + f"layer stack of {' and '.join(parents)}: " + verdict["summary"].split(": ", 1)[-1] \
            .rstrip(".") + f"; {p_text}"
    if rel in ("copy", "recast"):
        kind = "byte-identical copy" if rel == "copy" else "re-encoded copy"
        return prefix + f"{kind} of {parents[0]}; {p_text}"
    return prefix + verdict.get("summary", rel)


def _audit_command(suspect: Fingerprint, verdict: dict, fps: dict[str, Fingerprint], chosen: list[str] | None = None
                   ) -> str | None:
    """The exact `modeltrace audit` that confirms the finding on the full weights (against the models the verdict
    was worked out from where it names no parents, as a partial one does)."""
    if verdict["relation"] == "independent":
        return None
    base = verdict.get("base")
    parents = [p["model"] for p in verdict["parents"] if p["model"] != base] or [c for c in chosen or [] if c != base]
    if not parents:
        return None
    cmd = ["modeltrace", "audit", suspect.spec]
    for p in parents:
        cmd += ["-c", fps[p].spec]
    if base:
        cmd += ["--base", fps[base].spec]
    return " ".join(shlex.quote(c) for c in cmd)
