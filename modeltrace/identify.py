"""`modeltrace identify`: which indexed models a suspect is made from, and how, from fingerprints alone.

1. rank: cosine of summary vectors against the whole index (one matrix product);
2. test: the SHORTLIST best are compared sample by sample (the audit's independence statistic); p-values are
   Holm-adjusted over every indexed model, so a larger index asks for stronger evidence;
3. lineage: related models that are plausible merges of others (the suspect included) are descendants or siblings,
   not ancestors; a stack, copy or recipe is looked for among the rest, else the closest one is the parent;
4. verdict: the audit's own layer map, slot fits and verdict run on the chosen fingerprints, so relation, method and
   weights with intervals mean what they mean in `modeltrace audit`, which confirms them on the full weights.

Index entries that fail their checksums are never used: they are listed in `damaged`. A numerical failure while
comparing one candidate (an SVD that does not converge, a non-finite statistic) drops that candidate and is listed
in `failed`; one while working out the recipe leaves the answer at `related`; numpy's warnings are not printed.
How the answer reads (ranked hits, summary line, the confirming audit command) is identify_text.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from modeltrace.errors import InputError
from modeltrace.fingerprint.compare import PairEvidence, compare, fit, gram_stack
from modeltrace.fingerprint.copies import copy_groups, copy_notes, copy_verdict, own_copies
from modeltrace.fingerprint.core import Fingerprint
from modeltrace.fingerprint.lineage import Explanation, centre, explain, merges_among, stack_sources
from modeltrace.fingerprint.undisguise import Aligned, DisguiseEvidence, align_group, evidence
from modeltrace.fingerprint_audit import audit_fingerprints
from modeltrace.identify_text import _audit_command, _rank, _summary
from modeltrace.index.store import Index
from modeltrace.schema import SCHEMA_VERSION
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
#: what numerical trouble raises inside numpy and the fits (one candidate's, not the run's)
NUMERICAL = (np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError, OverflowError, ValueError)


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


def identify(suspect: Fingerprint, index: Index, top: int = 5, digest: Any = None) -> dict[str, Any]:
    """Rank `index` by evidence that its models are ancestors of `suspect`; relation and recipe among the top.
    With the suspect's content `digest` (provenance/content.py), an indexed model with the same digest is
    answered at once; "identical" is only ever claimed from such a full digest."""
    if digest is not None:
        from modeltrace.index.digests import matches

        same, same_values = matches(index, digest)
        if same:
            return _identical(suspect, index, same, digest)
    with _one_blas_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-finite numbers are checked, and reported, per model
        out = _identify(suspect, index, top)
    if digest is not None:
        out["content_digest"] = digest.model_id
        if same_values:
            out["same_values"] = same_values
            out["summary"] = f"same values as indexed {', '.join(same_values)} in another dtype; " + out["summary"]
    return out


def _identical(suspect: Fingerprint, index: Index, same: list[str], digest: Any) -> dict[str, Any]:
    """The answer when indexed models hold exactly the suspect's content (same model digest): no comparison needed."""
    specs = {e.name: e.spec for e in index.entries() if e.name in same}
    hits = [{"rank": i, "model": n, "spec": specs.get(n, ""), "role": "identical", "similarity": 1.0, "corr": 1.0,
             "log10_p": None, "p": "-", "note": f"same content digest {digest.model_id[:21]}…"}
            for i, n in enumerate(same, 1)]
    return {"schema_version": SCHEMA_VERSION,
            "suspect": {"label": suspect.label, "spec": suspect.spec, "content_hash": suspect.content_hash,
                        "bytes_read": suspect.bytes_read, "total_bytes": suspect.model.get("total_bytes"),
                        "fingerprint_bytes": suspect.nbytes,
                        "card_base_model": suspect.model.get("card", {}).get("base_model", [])},
            "index": {"path": str(index.path), "models": index.count(), "compared": 0},
            "identical": same[0], "identical_by": "content digest", "content_digest": digest.model_id,
            "related": True, "relation": "copy", "method": None,
            "parents": [{"model": same[0]}], "base": None, "hits": hits,
            "summary": f"identical to indexed {', '.join(same)} (same content digest {digest.model_id[:21]}…: every "
                       "tensor, dtype and value)",
            "disguise": None, "verdict": None, "audit_command": None, "elapsed_s": 0.0}


def _numerical(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"numerical failure ({type(exc).__name__}{': ' + first if first else ''})"


def _identify(suspect: Fingerprint, index: Index, top: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ids, names, mat, sizes = index.sketches()
    if not len(ids):
        if index.damaged:
            raise InputError(f"{index.path}: every index entry is damaged ({', '.join(sorted(index.damaged))}); "
                             "see `modeltrace index check`")
        raise InputError(f"{index.path}: the index is empty; add models with `modeltrace index add MODEL`")
    # equal fingerprints: equal in every *sampled* value, which does not make the models identical
    identical = index.by_hash(suspect.content_hash)
    sim = mat @ suspect.sketch()
    order: list[int] = []
    budget = 0
    for i in np.argsort(-sim, kind="stable"):
        if len(order) >= SHORTLIST or (len(order) >= MIN_SHORTLIST and budget + sizes[i] > SHORTLIST_BYTES):
            break
        order.append(int(i))
        budget += int(sizes[i])
    row = {names[i]: i for i in order}
    loaded = index.load([int(ids[i]) for i in order])
    sims = {names[i]: float(sim[i]) for i in order}
    fps = dict(loaded)
    ev, dv, failed = _pair_evidence(suspect, fps, list(fps))
    tested = [n for n in fps if n not in failed]
    family = len(ids) - (1 if identical else 0)
    adj = dict(zip(tested, holm_log10([_log10_p(ev[n], dv[n]) for n in tested], family), strict=True))
    alpha = _alpha_log10()
    # how close, for ranking related models (the disguise tests' calibrated z saturates for any close relative)
    zs = {n: max(ev[n].z, _strength(dv[n])) for n in tested}
    strong = sorted((n for n in tested if adj[n] < alpha), key=lambda n: -zs[n])
    # copies are one model: the suspect's own copies answer "copy"; the others' copies are grouped with them, and
    # only each group's original takes part in the lineage (a copy is never a parent of its original or of a child)
    own = own_copies(suspect, fps, strong, identical)
    groups = copy_groups(fps, [n for n in strong if n not in own])
    strong = [n for n in strong if n in groups]
    related = _diverse(strong, {n: mat[row[n]] for n in strong})
    label = suspect.label if suspect.label not in fps else f"{suspect.label} (suspect)"

    try:
        verdict, merges, chosen, al, related = _lineage(suspect, fps, related, ev, dv, alpha, zs, adj, label)
    except NUMERICAL as exc:  # the models are related (tested above), but how could not be worked out
        verdict, merges, chosen, al = _unresolved(related, adj, _numerical(exc)), {}, list(related[:3]), None
    gnames = [label, *related]
    lineage = verdict
    copies = copy_notes(own, groups, fps)
    # The answer: a copy when other entries hold the suspect's weights (re-encoded, or equal under another hash),
    # or when its own entry is all the index knows of it; else the lineage (its own entry noted, never a parent).
    others = {n: link for n, link in own.items() if n != identical}
    copy_answer = bool(others) or (identical in own and (lineage is None or lineage["relation"] == "independent"))
    hits = _rank(verdict, chosen, related, merges, gnames, tested, adj, ev, sims, fps, copies, copy_answer)
    if copy_answer:
        verdict = copy_verdict(others or own, fps)
        chosen = [verdict["parents"][0]["model"]]
    if al is not None and al.notes:
        for h in hits:
            undone = al.per_candidate.get(h["model"]) or (al.notes if h["model"] in chosen else [])
            if undone and h["role"] != "unrelated":
                h["note"] = "; ".join(x for x in [h["note"], *undone] if x)
    out = _result(suspect, index, ids, tested, identical, related, verdict, hits, top, adj, family, al, fps, chosen)
    out["summary"] = _summary(verdict if copy_answer else None, lineage, hits, adj, family, copies, fps,
                              identical if identical in own else None) + _disguise_text(al, lineage)
    out["copies"] = [{"model": n, "of": of, "note": note} for n, (of, note) in copies.items()]
    out["lineage"] = None if not copy_answer or lineage is None else {k: lineage.get(k) for k in (
        "relation", "method", "parents", "base")}
    out["damaged"] = [{"model": n, "problem": p} for n, p in sorted(index.damaged.items())]
    out["failed"] = [{"model": n, "problem": p} for n, p in failed.items()]
    out["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return out


def _lineage(suspect: Fingerprint, fps: dict[str, Fingerprint], related: list[str], ev: dict, dv: dict,
             alpha: float, zs: dict[str, float], adj: dict[str, float], label: str
             ) -> tuple[dict[str, Any] | None, dict[str, Explanation], list[str], Aligned | None, list[str]]:
    """Steps 3 and 4 on the related models: (verdict, merges among them, the models the verdict used, alignment,
    the related models that took part)."""
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
    return verdict, merges, chosen, al, related


def _unresolved(related: list[str], adj: dict[str, float], why: str) -> dict[str, Any]:
    """The verdict when the related models are known but a numerical failure stopped the recipe search."""
    parents = related[:3]
    p = format_p(max(adj[n] for n in parents))
    return {"relation": "related", "method": None, "base": None,
            "parents": [{"model": n, "evidence": "coordinates"} for n in parents],
            "summary": f"derived from {', '.join(parents)}; {p}. The recipe could not be worked out from the "
                       f"fingerprints ({why}): run the `modeltrace audit` below"}


def _result(suspect: Fingerprint, index: Index, ids: np.ndarray, tested: list[str], identical: str | None,
            related: list[str], verdict: dict[str, Any] | None, hits: list[dict[str, Any]], top: int,
            adj: dict[str, float], family: int, al: Aligned | None, fps: dict[str, Fingerprint], chosen: list[str]
            ) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "suspect": {"label": suspect.label, "spec": suspect.spec, "content_hash": suspect.content_hash,
                    "bytes_read": suspect.bytes_read, "total_bytes": suspect.model.get("total_bytes"),
                    "fingerprint_bytes": suspect.nbytes, "card_base_model": suspect.model.get("card", {})
                    .get("base_model", [])},
        "index": {"path": str(index.path), "models": int(len(ids)), "compared": len(tested)},
        "identical": identical,
        "identical_by": "sampled values" if identical else None,
        "related": bool(related),
        "relation": verdict["relation"] if verdict else "independent",
        "method": verdict.get("method") if verdict else None,
        "parents": verdict["parents"] if verdict else [],
        "base": verdict.get("base") if verdict else None,
        "hits": hits[:top],
        "summary": "",
        "disguise": {"evidence": al.mode, "undone": al.notes} if al is not None and al.notes else None,
        "verdict": verdict,
        "audit_command": _audit_command(suspect, verdict, fps, chosen) if verdict else None,
    }
    from modeltrace.tree.graph import ancestry  # ancestors of ancestors, from the family tree when it was built

    out["ancestry"] = ancestry(index, [p["model"] for p in out["parents"]])
    declared = out["suspect"]["card_base_model"]
    if verdict and verdict["relation"] not in ("independent",) and not declared:
        out["undisclosed"] = "the model card names no base_model although ancestors were found"
    return out


def _pair_evidence(suspect: Fingerprint, fps: dict[str, Fingerprint], names: list[str]
                   ) -> tuple[dict[str, PairEvidence], dict[str, DisguiseEvidence | None], dict[str, str]]:
    """Coordinate and disguise-robust evidence (v2 fingerprints) of the suspect against each shortlisted model, on
    two threads: the work is numpy products of a few MB that release the GIL, and the suspect's side of each test is
    computed once (undisguise._memo). A model whose comparison fails numerically is left out: {name: why}."""
    def one(n: str) -> tuple[PairEvidence, DisguiseEvidence | None] | str:
        try:
            with np.errstate(all="ignore"):
                e = compare(suspect, fps[n])
                d = evidence(suspect, fps[n], e)
        except NUMERICAL as exc:
            return _numerical(exc)
        if not (math.isfinite(e.z) and math.isfinite(e.log10_p)) or \
                (d is not None and not (math.isfinite(d.log10_p) and math.isfinite(d.strength))):
            return "numerical failure (a non-finite statistic)"
        return e, d

    workers = min(2, os.cpu_count() or 1, max(1, len(names)))
    if workers > 1:
        got = [one(names[0])]  # fills the suspect's memo before the threads share it
        with ThreadPoolExecutor(max_workers=workers) as pool:
            got += pool.map(one, names[1:])
    else:
        got = [one(n) for n in names]
    ok = {n: g for n, g in zip(names, got, strict=True) if not isinstance(g, str)}
    failed = {n: g for n, g in zip(names, got, strict=True) if isinstance(g, str)}
    return {n: g[0] for n, g in ok.items()}, {n: g[1] for n, g in ok.items()}, failed


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
    return audit_fingerprints(suspect, label, [fps[c] for c in cands], cands, base)


def _audit_tokens(suspect: Fingerprint, label: str, fps: dict[str, Fingerprint], cands: list[str],
                  base: str | None) -> dict[str, Any]:
    return audit_fingerprints(suspect, label, [fps[c] for c in cands], cands, base, layers=False)


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


def _strength(d: DisguiseEvidence | None) -> float:
    return d.strength if d is not None else 0.0
