"""A repository's history: every checked revision with its result, in words, and what changed between two.

Data flow: the `results` rows of one repository (joined with their jobs, in arrival order) -> `Revision`s numbered
1, 2, ... -> `lineage` ("revision 3 is a fine-tune of revision 1, which is a merge of org/a and org/b": parents
come from identify's ranking, confirmed by the audit's relation; a parent that is an earlier revision of the same
repository is named by its number) and `diff` (content, relation, method, parents and recipe weights, card fields,
findings and weight files between two revisions, and whether the later one derives from the earlier).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select

from modeltrace.service.store import jobs, results

__all__ = ["Revision", "diff", "lineage", "load_history"]

PHRASE = {"copy": "a byte copy of", "recast": "a re-encoded copy of", "finetune": "a fine-tune of",
          "stack": "a layer stack of", "partial": "partly derived from", "related": "related to"}


@dataclass(frozen=True)
class Revision:
    number: int
    result_id: int
    job_id: int
    repo_id: str
    commit_sha: str
    index_name: str
    content_hash: str | None
    created_at: float
    relation: str
    method: str | None
    summary: str
    contradicted: bool
    worst: str | None
    identify: dict[str, Any] = field(repr=False)
    report: dict[str, Any] = field(repr=False)

    @property
    def short(self) -> str:
        return self.commit_sha[:12]

    def parents(self) -> list[tuple[str, str, str]]:
        """(index name, role, spec) of the models the result derives from ([] when independent)."""
        if self.relation == "independent":
            return []
        same = self.identify.get("identical")
        if same:  # the same content was already indexed: that is what the audit confirmed
            return [(same, "parent", "")]
        hits = self.identify.get("hits") or []
        out = [(h["model"], h["role"], h.get("spec") or "") for h in hits if h.get("role") in ("parent", "base")]
        if not out:
            out = [(h["model"], h["role"], h.get("spec") or "") for h in hits if h.get("role") == "related"][:3]
        return out


def load_history(conn: Connection, repo_id: str) -> list[Revision]:
    rows = conn.execute(select(results, jobs.c.created_at.label("queued_at")).join(jobs, jobs.c.id == results.c.job_id)
                        .where(results.c.repo_id == repo_id).order_by(jobs.c.id)).mappings().all()
    return [Revision(number=i, result_id=r["id"], job_id=r["job_id"], repo_id=r["repo_id"],
                     commit_sha=r["commit_sha"], index_name=r["index_name"], content_hash=r["content_hash"],
                     created_at=r["created_at"], relation=r["relation"], method=r["method"], summary=r["summary"],
                     contradicted=bool(r["contradicted"]), worst=r["worst"], identify=json.loads(r["identify_json"]),
                     report=json.loads(r["report_json"])) for i, r in enumerate(rows, 1)]


def _name(index_name: str, spec: str, by_name: dict[str, Revision], of: Revision) -> str:
    """How a parent is called in `of`'s history: "revision N" when it is an earlier revision of the same repository
    (its index entry, or the indexed model it was a copy of), else its repository id or index name."""
    rev = by_name.get(index_name)
    if rev is not None and rev.repo_id == of.repo_id and rev.number < of.number:
        return f"revision {rev.number}"
    if spec.startswith("hf://"):
        return spec[len("hf://"):].split("@")[0]
    return index_name.split("@")[0] if "@" in index_name else index_name


def _by_name(history: list[Revision]) -> dict[str, Revision]:
    out: dict[str, Revision] = {}
    for r in history:
        out.setdefault(r.index_name, r)  # the earliest revision holding that content
    return out


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _phrase(rev: Revision, names: list[str]) -> str:
    if rev.relation == "independent" or not names:
        return "independent of every model in the index"
    if rev.relation == "merge":
        return f"a {rev.method + ' ' if rev.method else ''}merge of {_and(names)}"
    return f"{PHRASE.get(rev.relation, rev.relation)} {_and(names)}"


def lineage(history: list[Revision], rev: Revision, depth: int = 3) -> str:
    """One sentence: what this revision is, following earlier revisions of the same repository it derives from."""
    by_name = _by_name(history)
    text = f"revision {rev.number} is {_describe(rev, by_name, depth)}"
    return text[0].upper() + text[1:]


def _describe(rev: Revision, by_name: dict[str, Revision], depth: int) -> str:
    parents = [(n, s) for n, role, s in rev.parents() if role != "base"]
    names = [_name(n, s, by_name, rev) for n, s in parents]
    text = _phrase(rev, names)
    if depth <= 1:
        return text
    for n, _s in parents:
        earlier = by_name.get(n)
        if earlier is not None and earlier.repo_id == rev.repo_id and earlier.number < rev.number \
                and earlier.relation != "independent":
            text += f" (revision {earlier.number} is {_describe(earlier, by_name, depth - 1)})"
    return text


def _verdict(rev: Revision) -> dict[str, Any]:
    subjects = rev.report.get("subjects") or [{}]
    return subjects[0].get("audit") or {}


def _card(rev: Revision) -> dict[str, Any]:
    subjects = rev.report.get("subjects") or [{}]
    return subjects[0].get("card") or {}


def _files(rev: Revision) -> dict[str, str | None]:
    subjects = rev.report.get("subjects") or [{}]
    ev = subjects[0].get("evidence") or {}
    src = (ev.get("sources") or [{}])[0]
    return {f["name"]: f.get("sha256") or f.get("lfs_sha256") or f.get("sample_sha256") for f in src.get("files", [])}


def diff(a: Revision, b: Revision) -> dict[str, Any]:
    """What changed from revision `a` to revision `b` (both of one repository), as data and in sentences."""
    pa = {n for n, _role, _s in a.parents()}
    pb = {n for n, _role, _s in b.parents()}
    wa = {p["model"]: p.get("weight") for p in _verdict(a).get("parents", [])}
    wb = {p["model"]: p.get("weight") for p in _verdict(b).get("parents", [])}
    ca, cb = _card(a), _card(b)
    fa, fb = {f["code"] for f in a.report.get("findings", [])}, {f["code"] for f in b.report.get("findings", [])}
    files_a, files_b = _files(a), _files(b)
    derives = any(n == a.index_name for n, _r, _s in b.parents()) or b.identify.get("identical") == a.index_name
    out: dict[str, Any] = {
        "a": {"revision": a.number, "commit": a.commit_sha, "relation": a.relation},
        "b": {"revision": b.number, "commit": b.commit_sha, "relation": b.relation},
        "same_content": bool(a.content_hash and a.content_hash == b.content_hash),
        "b_derives_from_a": derives,
        "relation": [a.relation, b.relation], "method": [a.method, b.method],
        "parents_added": sorted(set(pb) - set(pa)), "parents_removed": sorted(set(pa) - set(pb)),
        "weights": {m: [wa.get(m), wb.get(m)] for m in sorted(set(wa) | set(wb)) if wa.get(m) != wb.get(m)},
        "card": {k: [ca.get(k), cb.get(k)] for k in ("license", "base_model", "base_model_relation")
                 if ca.get(k) != cb.get(k)},
        "findings_added": sorted(fb - fa), "findings_removed": sorted(fa - fb),
        "files_changed": sorted(n for n in set(files_a) & set(files_b) if files_a[n] != files_b[n]),
        "files_added": sorted(set(files_b) - set(files_a)), "files_removed": sorted(set(files_a) - set(files_b)),
    }
    out["sentences"] = _sentences(out, a, b)
    return out


def _sentences(d: dict[str, Any], a: Revision, b: Revision) -> list[str]:
    ra, rb = f"revision {a.number}", f"revision {b.number}"
    s = []
    if d["same_content"]:
        s.append(f"{rb} has the same weights as {ra}.")
    elif d["b_derives_from_a"]:
        s.append(f"{rb} is derived from {ra} ({b.relation}).")
    if d["relation"][0] != d["relation"][1] or d["method"][0] != d["method"][1]:
        s.append(f"The verdict changed from {a.relation}{' (' + a.method + ')' if a.method else ''} to "
                 f"{b.relation}{' (' + b.method + ')' if b.method else ''}.")
    if d["parents_added"]:
        s.append(f"New ancestors: {', '.join(d['parents_added'])}.")
    if d["parents_removed"]:
        s.append(f"No longer derived from: {', '.join(d['parents_removed'])}.")
    for m, (x, y) in d["weights"].items():
        if x is not None and y is not None:
            s.append(f"Weight of {m} in the recipe: {x:.2f} -> {y:.2f}.")
    for k, (x, y) in d["card"].items():
        s.append(f"Card {k}: {x or 'none'} -> {y or 'none'}.")
    if d["findings_removed"]:
        s.append(f"Resolved findings: {', '.join(d['findings_removed'])}.")
    if d["findings_added"]:
        s.append(f"New findings: {', '.join(d['findings_added'])}.")
    changed = len(d["files_changed"]) + len(d["files_added"]) + len(d["files_removed"])
    if changed:
        s.append(f"{changed} weight file(s) changed, added or removed.")
    return s or [f"Nothing that modeltrace checks changed between {ra} and {rb}."]
