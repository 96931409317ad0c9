"""How identify's answer reads: the ranked hits with their roles, the one-line summary and the confirming audit.

Data flow: `identify._identify` has tested the shortlist (Holm-adjusted log10 p-values `adj`, pair evidence `ev`,
summary-vector similarities `sims`), worked out the lineage (a verdict, the models it used, merges among the related
models) and grouped copies; `_rank` turns that into the ordered hits (parents and base first, then related models,
descendants and merges, each copy right after its original, then the rest by p-value), `_summary` and
`_lineage_text` into the summary line (recipe, relation and p-value), and `_audit_command` into the exact
`modeltrace audit` that confirms the finding on the full weights.
"""

from __future__ import annotations

import shlex
from typing import Any

from modeltrace.fingerprint.compare import PairEvidence
from modeltrace.fingerprint.copies import with_copies
from modeltrace.fingerprint.core import Fingerprint
from modeltrace.fingerprint.lineage import Explanation
from modeltrace.stats import format_p


def _rank(verdict: dict | None, chosen: list[str], related: list[str], merges: dict[str, Explanation],
          gnames: list[str], tested: list[str], adj: dict[str, float], ev: dict[str, PairEvidence],
          sims: dict[str, float], fps: dict[str, Fingerprint], copies: dict[str, tuple[str | None, str]],
          copy_answer: bool = False) -> list[dict[str, Any]]:
    roles: dict[str, tuple[str, str]] = {}
    for n, (of, note) in copies.items():
        if of is None:  # the suspect's own copies
            roles[n] = ("copy", note)
    if verdict:
        weights = {p["model"]: p for p in verdict.get("parents", [])}
        parents = sorted(weights, key=lambda m: -abs(weights[m].get("weight") or weights[m].get("layers") or 0))
        for p in parents:
            if p in roles:
                continue
            w = weights[p]
            iv = w.get("interval")
            note = (f"weight {w['weight']:.4f}" + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv and None not in iv else "")
                    if w.get("weight") is not None else f"{w['layers']} layers" if "layers" in w else "")
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
    own = [n for n, (of, _) in copies.items() if of is None]
    first = [n for n in roles if roles[n][0] in ("parent", "base")]
    first = [*own, *first] if copy_answer else [*first, *own]
    middle = [n for n in related if n not in first and roles[n][0] == "related"]
    later = [n for n in related if n not in first and n not in middle]
    for n, (of, note) in copies.items():  # another model's copies: right after it, in its role
        if of is not None and of in roles:
            roles[n] = ("copy", note)
    listed = [*first, *middle, *later]
    for n, (of, _) in copies.items():
        if of is not None and of in listed and n not in listed:
            at = listed.index(of) + 1
            while at < len(listed) and copies.get(listed[at], (None, ""))[0] == of:
                at += 1
            listed.insert(at, n)
    rest = sorted((n for n in tested if n not in listed), key=lambda n: (adj[n], -sims[n]))
    out = []
    for rank, n in enumerate([*listed, *rest], 1):
        role, note = roles.get(n, ("unrelated", ""))
        pe = ev[n]
        out.append({"rank": rank, "model": n, "spec": fps[n].spec, "role": role, "similarity": round(sims[n], 4),
                    "corr": round(pe.corr, 4), "log10_p": round(adj[n], 2), "p": format_p(adj[n]), "note": note})
    return out


def _summary(answer: dict | None, lineage: dict | None, hits: list[dict], adj: dict[str, float], family: int,
             copies: dict[str, tuple[str | None, str]], fps: dict[str, Fingerprint], itself: str | None) -> str:
    """One line per outcome: a copy (`answer`, with the lineage of those weights after it), else the lineage."""
    own = [n for n, (of, _) in copies.items() if of is None and n != itself]
    entry = f"; indexed itself as {itself}" if itself else ""
    if answer is not None:
        head = answer["parents"][0]["model"]
        if head == itself:
            text = f"identical in every sampled value to indexed {head}"
        elif answer["relation"] == "copy":
            text = f"identical in every sampled value to indexed {head}{entry}"
        else:
            text = f"the same weights as indexed {head}, stored in {copies[head][1].removeprefix('same weights in ')}"
        rest = [n for n in own if n != head]
        if rest:
            text += "; also indexed as " + ", ".join(
                f"{n} ({copies[n][1].removeprefix('same weights in ')})" for n in rest)
        if answer["relation"] != "copy" and head != itself:
            text += entry
        if lineage is not None and lineage["relation"] not in ("independent",):
            text += ". Lineage of these weights: " + _lineage_text(lineage, adj, copies, fps)
        return text
    if not lineage or lineage["relation"] == "independent":
        later = [h["model"] for h in hits if h["role"] == "descendant"]
        if later:
            return f"no ancestor in the index; made from the suspect: {', '.join(later)}{entry}"
        best = hits[0] if hits else None
        closest = f" (closest: {best['model']}, {best['p']} after Holm over {family} models)" if best else ""
        return f"no ancestor in the index{closest}{entry}"
    if itself:  # the suspect's own entry first, then what those weights descend from
        return (f"identical in every sampled value to indexed {itself}. Lineage of these weights: "
                + _lineage_text(lineage, adj, copies, fps))
    return _lineage_text(lineage, adj, copies, fps)


def _lineage_text(verdict: dict, adj: dict[str, float], copies: dict[str, tuple[str | None, str]],
                  fps: dict[str, Fingerprint]) -> str:
    rel, method = verdict["relation"], verdict.get("method")
    parents = [p["model"] for p in verdict["parents"]]
    named = parents + ([verdict["base"]] if verdict.get("base") and verdict["base"] not in parents else [])
    p_text = format_p(max(adj.get(n, 0.0) for n in named)) if named else ""
    grouped = [with_copies(n, copies, fps) for n in named if with_copies(n, copies, fps) != n]
    also = f"; {'; '.join(grouped)}" if grouped else ""
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
        return f"{recipe}, {method}; {p_text}{also}"
    if rel == "finetune":
        return f"fine-tune of {with_copies(parents[0], copies, fps)}; {p_text}"
    if rel == "related" and verdict.get("direction") == "unknown":  # a training lineage with no base indexed
        return (f"related to {with_copies(parents[0], copies, fps)} through training (its parent, a sibling or a "
                f"child: no common base indexed to tell); {p_text}")
    if rel == "stack":
        return f"layer stack of {' and '.join(parents)}: " + verdict["summary"].split(": ", 1)[-1] \
            .rstrip(".") + f"; {p_text}{also}"
    if rel in ("copy", "recast"):
        kind = "copy (identical in every sampled value)" if rel == "copy" else "re-encoded copy"
        return f"{kind} of {with_copies(parents[0], copies, fps)}; {p_text}"
    return verdict.get("summary", rel)


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
