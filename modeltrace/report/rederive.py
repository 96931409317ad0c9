"""What `verify` re-derives beyond the verdict: every part of a report that follows from the evidence.

Data flow: verify.py re-runs the audit (or re-reads the card for inspect), rebuilds the subject and its findings
with the same code that wrote the report (report/build.py, card_audit.py, detail.py), renames the re-run's labels
back to the recorded ones, and hands both sides here. `compare_subject` then diffs, field by field, the card
findings (codes, severities, titles, details), the verdict's summary, per-layer table, intervals, parameters,
p-values and mergekit recipe, the plotted per-layer weights and similarities, the ancestors and the parsed card;
each field is one check named by its place in the report (`audit.summary`, `detail.weights`, `findings`, ...) and
each difference one clause ("audit.layers[3].weights.nex: recorded 0.9000, re-derived 0.6000"). Numbers, also those
inside text, agree within the tolerance; everything else must be equal.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol

from modeltrace.report.model import Finding, Subject

__all__ = ["compare_findings", "compare_subject", "diff", "renamed"]

#: verdict keys checked elsewhere (relation, parents' weights, layer map), or not derived from the evidence
#: (timings, bytes read, the sources' locations, the optional replay and run-time warnings)
VERDICT_SKIP = {"relation", "method", "layer_map", "elapsed_s", "bytes_read", "sources", "verify", "warnings",
                "suspect", "candidates", "base", "sample"}
#: ancestors' locations and file hashes come from the evidence section, which verify checks on its own
ANCESTOR_SKIP = {"location", "sha256"}
MAX_CLAUSES = 4
SAME = "as re-derived from the evidence"
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


class Checks(Protocol):
    def add(self, subject: str, what: str, ok: bool, message: str) -> None: ...


def renamed(doc: Any, names: dict[str, str]) -> Any:
    """`doc` with every re-run label replaced by the recorded one (in values, keys and inside text)."""
    pairs = sorted(((a, b) for a, b in names.items() if a != b), key=lambda p: -len(p[0]))
    if not pairs:
        return doc

    def text(s: str) -> str:
        for a, b in pairs:
            s = s.replace(a, b)
        return s

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return text(x)
        if isinstance(x, dict):
            return {text(k) if isinstance(k, str) else k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(doc)


def _close(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= tol or abs(a - b) <= tol * max(abs(a), abs(b))


def _same_text(a: str, b: str, tol: float) -> bool:
    if a == b:
        return True
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    return all(_close(float(x), float(y), tol) for x, y in zip(_NUMBER.findall(a), _NUMBER.findall(b), strict=True))


def _show(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3g}"
    text = repr(x) if isinstance(x, str) else str(x)
    return text if len(text) <= 120 else text[:117] + "..."


def diff(old: Any, new: Any, path: str, tol: float) -> list[str]:
    """Every difference between a recorded and a re-derived value, as "path: recorded X, re-derived Y"."""
    if isinstance(old, bool) or isinstance(new, bool) or old is None or new is None:
        return [] if old == new else [f"{path}: recorded {_show(old)}, re-derived {_show(new)}"]
    if isinstance(old, int | float) and isinstance(new, int | float):
        return [] if _close(float(old), float(new), tol) else [f"{path}: recorded {_show(old)}, re-derived "
                                                                f"{_show(new)}"]
    if isinstance(old, str) and isinstance(new, str):
        return [] if _same_text(old, new, tol) else [f"{path}: recorded {_show(old)}, re-derived {_show(new)}"]
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            if k not in new:
                out.append(f"{path}.{k}: recorded {_show(old[k])}, not re-derived")
            elif k not in old:
                out.append(f"{path}.{k}: re-derived {_show(new[k])}, missing from the report")
            else:
                out += diff(old[k], new[k], f"{path}.{k}", tol)
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{path}: recorded {len(old)} entries, re-derived {len(new)}"]
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in diff(a, b, f"{path}[{i}]", tol)]
    return [] if old == new else [f"{path}: recorded {_show(old)}, re-derived {_show(new)}"]


def _report(res: Checks, subject: str, what: str, diffs: list[str], ok_text: str) -> None:
    if not diffs:
        res.add(subject, what, True, ok_text)
        return
    more = f"; and {len(diffs) - MAX_CLAUSES} more" if len(diffs) > MAX_CLAUSES else ""
    res.add(subject, what, False, f"{what} differs from the evidence: " + "; ".join(diffs[:MAX_CLAUSES]) + more)


def compare_findings(res: Checks, subject: str, old: list[Finding], new: list[Finding], tol: float) -> None:
    """The card findings: none missing, none added, each with the severity, category, title and detail the
    evidence gives."""
    def key(f: Finding) -> tuple[str, str]:
        return f.code, _NUMBER.sub("#", f.title)

    was = {key(f): f for f in old}
    now = {key(f): f for f in new}
    diffs = []
    for k, f in now.items():
        if k not in was:
            diffs.append(f"the evidence gives {f.code} ({f.severity}: {f.title}), which the report lacks")
    for k, f in was.items():
        if k not in now:
            diffs.append(f"the report has {f.code} ({f.severity}: {f.title}), which the evidence does not give")
            continue
        g = now[k]
        if f.severity != g.severity:
            diffs.append(f"{f.code}: severity recorded {f.severity}, re-derived {g.severity}")
        for d in diff({"category": f.category, "title": f.title, "detail": f.detail, "data": f.data},
                      {"category": g.category, "title": g.title, "detail": g.detail, "data": g.data}, f.code, tol):
            diffs.append(d)
    _report(res, subject, "findings", diffs, f"{len(new)} findings, severities and details {SAME}")


def compare_subject(res: Checks, subject: str, old: Subject, new: Subject, tol: float) -> None:
    """Everything of an audited subject that follows from the evidence, one check per report field."""
    if old.audit is not None and new.audit is not None:
        a = old.audit.model_dump()
        b = new.audit.model_dump()
        a["parents"] = [{k: v for k, v in p.items() if k != "weight"} for p in a.get("parents") or []]
        b["parents"] = [{k: v for k, v in p.items() if k != "weight"} for p in b.get("parents") or []]
        for field in [k for k in a if k not in VERDICT_SKIP] + [k for k in b if k not in a and k not in VERDICT_SKIP]:
            what = f"audit.{field}"
            _report(res, subject, what, diff(a.get(field), b.get(field), what, tol), SAME)
    if old.detail is not None or new.detail is not None:
        a = old.detail.model_dump() if old.detail else {"weights": [], "similarity": []}
        b = new.detail.model_dump() if new.detail else {"weights": [], "similarity": []}
        for field in ("weights", "similarity"):
            what = f"detail.{field}"
            _report(res, subject, what, diff(a.get(field), b.get(field), what, tol), SAME)
    a_anc = [{k: v for k, v in x.model_dump().items() if k not in ANCESTOR_SKIP} for x in old.ancestors]
    b_anc = [{k: v for k, v in x.model_dump().items() if k not in ANCESTOR_SKIP} for x in new.ancestors]
    _report(res, subject, "ancestors", diff(a_anc, b_anc, "ancestors", tol), f"{len(b_anc)} ancestors {SAME}")
    if old.card is not None or new.card is not None:
        _report(res, subject, "card", diff(old.card.model_dump() if old.card else None,
                                           new.card.model_dump() if new.card else None, "card", tol),
                SAME)
