"""`modeltrace verify REPORT`: re-check a report's conclusions against the same sources, and say what differs.

For each subject: (1) every recorded file is re-hashed the way it was hashed (full, sampled or the Hub's LFS hash)
and hf:// sources are pinned to the recorded commit; (2) the command is re-run with the recorded parameters (remote
ranges re-hashed as they are read); (3) the new conclusions are compared with the recorded ones: relation, method,
parents and their weights (within a tolerance), which candidates are related, the layer map; (4) everything else that
follows from the evidence is re-derived with the code that wrote the report and compared field by field
(rederive.py): card findings and their severities, summary, per-layer table, intervals, recipe, plotted per-layer
weights, ancestors, the parsed card. Every difference becomes one sentence naming the field; nothing fails silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modeltrace import __version__
from modeltrace.errors import ModelTraceError
from modeltrace.report.evidence import describe_file_change, local_file_evidence, match_ranges
from modeltrace.report.model import Finding, Report, SourceEvidence, Subject, Verdict
from modeltrace.report.rederive import compare_findings, compare_subject, renamed

DEFAULT_TOLERANCE = 0.02
#: re-derived numbers other than the recipe weights (intervals, per-layer values, R², z, numbers in text) must agree
#: within this share of the tolerance: a re-run on the same evidence reproduces them to their printed precision
DERIVED_SHARE = 0.1


@dataclass
class Check:
    subject: str
    what: str
    ok: bool
    message: str


@dataclass
class VerifyResult:
    report_tool_version: str
    tool_version: str
    tolerance: float
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def mismatches(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"status": "verified" if self.ok else "mismatch", **asdict(self)}

    def add(self, subject: str, what: str, ok: bool, message: str) -> None:
        self.checks.append(Check(subject, what, ok, message))


def _pinned(spec: str, ev: SourceEvidence | None) -> str:
    """hf:// specs re-read at the commit the report's reads were pinned to."""
    if ev is None or not spec.startswith("hf://") or not ev.commit:
        return spec
    return spec.split("@")[0] + "@" + ev.commit


def verify_report(report: Report, tolerance: float = DEFAULT_TOLERANCE, allow_pickle: bool = False) -> VerifyResult:
    res = VerifyResult(report.tool.version, __version__, tolerance)
    if report.tool.version != __version__:
        res.add("*", "tool", True, f"report written by modeltrace {report.tool.version}, re-checked with "
                                   f"{__version__}: differences below may come from the tool, not the models")
    for s in report.subjects:
        if s.evidence is None:
            res.add(s.name, "evidence", False, f"{s.name}: the report records no evidence, so it cannot be re-checked")
            continue
        for src in s.evidence.sources:
            _check_files(res, s.name, src)
        recorded = [f for f in report.findings if f.subject == s.name]
        try:
            if s.audit is not None:
                _recheck_audit(res, s, recorded, tolerance, allow_pickle)
            elif s.description is not None:
                _recheck_inspect(res, s, recorded, tolerance, allow_pickle)
        except ModelTraceError as exc:
            res.add(s.name, "rerun", False, f"{s.name}: could not re-run the check: {exc}")
    return res


def _check_files(res: VerifyResult, subject: str, src: SourceEvidence) -> None:
    if src.spec.startswith("hf://"):
        return  # checked against the re-run's listing and ranges
    path = Path(src.spec).expanduser()
    if not path.exists():
        res.add(subject, "source", False, f"{src.label}: {src.spec} no longer exists")
        return
    root = path.parent if path.is_file() else path
    changed = []
    for old in src.files:
        new = local_file_evidence(root / old.name, old.name, full=old.sha256 is not None)
        msg = describe_file_change(old, new)
        if msg:
            changed.append(msg)
    if changed:
        res.add(subject, "files", False, f"{src.label}: " + "; ".join(changed))
    else:
        kinds = sorted({"full" if f.sha256 else "sampled" for f in src.files})
        res.add(subject, "files", True, f"{src.label}: {len(src.files)} files unchanged ({', '.join(kinds)} hashes)")


def _recheck_audit(res: VerifyResult, s: Subject, recorded: list[Finding], tol: float, allow_pickle: bool) -> None:
    from modeltrace.audit import DEFAULT_AUDIT_CHUNK
    from modeltrace.options import AuditOptions
    from modeltrace.report.pipeline import audit_pipeline

    ev = s.evidence
    assert ev is not None and s.audit is not None
    by_spec = {x.spec: x for x in ev.sources}
    params = ev.parameters
    cands = list(params.get("candidates") or [])
    base = params.get("base")
    suspect = s.location
    options = AuditOptions(sample=params.get("sample"), chunk_bytes=int(params.get("chunk_bytes") or
                                                                        DEFAULT_AUDIT_CHUNK),
                           allow_pickle=bool(params.get("allow_pickle", allow_pickle)))
    done = audit_pipeline(_pinned(suspect, by_spec.get(suspect)), [_pinned(c, by_spec.get(c)) for c in cands],
                          _pinned(base, by_spec.get(base)) if base else None, options, parameters=dict(params),
                          evidence=False)
    run, new = done.run, done.verdict
    # labels of the re-run (pinned specs) -> labels in the report
    pinned_to_old = {_pinned(x.spec, x): x.label for x in ev.sources}
    rename = {vw.label: pinned_to_old.get(vw.spec, vw.label) for vw in run.views}
    for vw in run.views:
        old = next((x for x in ev.sources if x.label == rename[vw.label]), None)
        if old is not None and old.spec.startswith("hf://"):
            _check_remote(res, s.name, old, vw.source)
    compare_verdicts(res, s.name, s.audit, Verdict.model_validate(new), rename, tol)
    subject, findings = done.subject, done.findings
    subject = Subject.model_validate(renamed(subject.model_dump(), rename))
    compare_findings(res, s.name, recorded, [Finding.model_validate(renamed(f.model_dump(), rename))
                                             for f in findings], tol * DERIVED_SHARE)
    compare_subject(res, s.name, s, subject, tol * DERIVED_SHARE)


def _check_remote(res: VerifyResult, subject: str, old: SourceEvidence, source: Any) -> None:
    store = getattr(source, "store", None)
    lfs = getattr(store, "lfs_sha256", {}) or {}
    diffs = [f"{f.name}: Hub SHA-256 {f.lfs_sha256[:12]}... -> {lfs[f.name][:12]}..." for f in old.files
             if f.lfs_sha256 and lfs.get(f.name) and lfs[f.name] != f.lfs_sha256]
    pairs = match_ranges(old.ranges, source.stats.digests)
    bad = [(e, now) for e, now in pairs if now is not None and now != e.sha256]
    for e, now in bad[:5]:
        what = "bytes" if e.count == 1 else f"{e.count} ranges within bytes"
        diffs.append(f"{what} [{e.offset}, {e.offset + e.length}) of {e.file} differ ({e.sha256[:12]}... -> "
                     f"{now[:12]}...)")
    if len(bad) > 5:
        diffs.append(f"and {len(bad) - 5} more ranges")
    missing = sum(e.count for e, now in pairs if now is None)
    if diffs:
        res.add(subject, "remote", False, f"{old.label}: " + "; ".join(diffs))
    else:
        same = sum(e.count for e, now in pairs if now is not None)
        note = (f"; {missing} recorded ranges were not re-read (a different read plan)" if missing else "")
        res.add(subject, "remote", True, f"{old.label}: commit {str(old.commit)[:12]}, {same} byte ranges re-read "
                                         f"with identical SHA-256{note}")


def compare_verdicts(res: VerifyResult, subject: str, old: Verdict, new: Verdict, rename: dict[str, str],
                     tol: float) -> None:
    """Every recorded conclusion against the re-run's, one check each."""
    def nm(x: str) -> str:
        return rename.get(x, x)

    if new.relation != old.relation or new.method != old.method:
        res.add(subject, "relation", False,
                f"relation changed: recorded {old.relation}{'/' + old.method if old.method else ''}, now "
                f"{new.relation}{'/' + new.method if new.method else ''} ({new.summary})")
    else:
        res.add(subject, "relation", True, f"relation {old.relation}{'/' + old.method if old.method else ''} "
                                           "reproduced")
    old_w = {p.model: p for p in old.parents}
    new_w = {nm(p.model): p for p in new.parents}
    if set(old_w) != set(new_w):
        res.add(subject, "parents", False, f"parents changed: recorded {sorted(old_w)}, now {sorted(new_w)}")
    else:
        worst = []
        for m, p in old_w.items():
            a, b = p.weight, new_w[m].weight
            if a is not None and b is not None and abs(a - b) > tol:
                worst.append(f"{m} {a:.4f} -> {b:.4f} (|change| {abs(a - b):.4f} > tolerance {tol})")
        if worst:
            res.add(subject, "weights", False, "weights moved beyond tolerance: " + "; ".join(worst))
        elif old_w:
            res.add(subject, "weights", True, f"parents and weights reproduced within {tol}")
    alpha = 1e-6
    old_rel = {k for k, p in old.p_values.items() if p.p < alpha}
    new_rel = {nm(k) for k, p in new.p_values.items() if p.p < alpha}
    if old_rel != new_rel:
        gone, came = sorted(old_rel - new_rel), sorted(new_rel - old_rel)
        res.add(subject, "independence", False, "related candidates changed: "
                + (f"no longer related: {', '.join(gone)}" if gone else "")
                + ("; " if gone and came else "") + (f"now related: {', '.join(came)}" if came else ""))
    else:
        res.add(subject, "independence", True, f"independence decisions reproduced ({len(old_rel)} related)")
    if old.layer_map or new.layer_map:
        a = [(e.layer, e.model, e.source_layer) for e in old.layer_map or []]
        b = [(e.layer, nm(e.model), e.source_layer) for e in new.layer_map or []]
        res.add(subject, "layer_map", a == b, "layer map reproduced" if a == b else f"layer map changed: {a} -> {b}")


def _recheck_inspect(res: VerifyResult, s: Subject, recorded: list[Finding], tol: float, allow_pickle: bool) -> None:
    from modeltrace.describe import describe
    from modeltrace.report.card_audit import card_only
    from modeltrace.sources import open_source

    assert s.description is not None
    with open_source(s.location, allow_pickle=allow_pickle) as src:
        d = describe(src)
        card, _body, findings = card_only(s.name, src.card_text())
    compare_findings(res, s.name, recorded, findings, tol * DERIVED_SHARE)
    compare_subject(res, s.name, s, Subject(name=s.name, location=s.location, card=card), tol * DERIVED_SHARE)
    diffs = []
    old = s.description.model_dump()
    for key in ("format", "parameters", "active_parameters", "layers", "hidden_size", "vocab_size", "architecture"):
        if key in old and old.get(key) != d.get(key):
            diffs.append(f"{key}: {old.get(key)} -> {d.get(key)}")
    res.add(s.name, "description", not diffs, "description reproduced" if not diffs else
            "description changed: " + "; ".join(diffs))
