"""`modeltrace verify REPORT --bundle BUNDLE --key PUBKEY [--recompute]`: is this the signed finding about this model?

Data flow: the bundle is opened and its signature verified (attest.check_signature) against the trusted key or root;
nothing else is believed before that. Then (1) the report in hand must be the attested one (its SHA-256 is in the
predicate; when it differs, the findings that changed are named); (2) each attested model is read where the report
says it is (or `--model`), its content digest computed (content.py) and compared with the statement's subject,
naming the tensors that differ from the signed manifest; (3) with `recompute`, the finding itself is re-derived
from the weights (report/verify.py). Each step is one `Check`; any failed check makes `verify` exit 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modeltrace.errors import ModelTraceError
from modeltrace.provenance.attest import (
    MODEL_DIGEST,
    AttestationError,
    check_signature,
    load_public_key,
    open_bundle,
)
from modeltrace.provenance.content import PREFIX, ContentDigest, compare, content_digest

__all__ = ["Check", "BundleResult", "verify_bundle"]


@dataclass(frozen=True)
class Check:
    subject: str
    what: str
    ok: bool
    message: str


@dataclass(frozen=True)
class BundleResult:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def mismatches(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {"status": "verified" if self.ok else "mismatch", "checks": [asdict(c) for c in self.checks]}


def verify_bundle(report_path: Path, bundle_path: Path, key: Path | None = None, trust_roots: list[Path] | None = None,
                  model: str | None = None, recompute: bool = False, tolerance: float = 0.02,
                  allow_pickle: bool = False) -> BundleResult:
    from modeltrace.report.model import load_report, parse_report

    checks: list[Check] = []
    bundle = open_bundle(bundle_path)
    public_key = load_public_key(key) if key is not None else None
    try:
        signed = check_signature(bundle, public_key, trust_roots)
    except AttestationError as exc:
        return BundleResult((Check("*", "signature", False, str(exc)),))
    checks.append(Check("*", "signature", True, f"valid signature by {signed.signer}"))
    pred = signed.statement.get("predicate") or {}
    report_doc = load_report(report_path)  # readable at all (one line otherwise)
    report_bytes = Path(report_path).read_bytes()
    sha = hashlib.sha256(report_bytes).hexdigest()
    attested_sha = (pred.get("report") or {}).get("sha256")
    if attested_sha == sha:
        checks.append(Check("*", "report", True, f"the report is the attested one (SHA-256 {sha[:16]}…)"))
    else:
        checks.append(Check("*", "report", False, f"the report is not the attested one (SHA-256 {sha[:16]}…, "
                            f"attested {str(attested_sha)[:16]}…)" + _finding_changes(pred, report_doc)))
    report = parse_report(report_bytes.decode("utf-8", errors="replace"), str(report_path))
    subjects = {s["name"]: s for s in signed.statement.get("subject", []) if isinstance(s, dict)}
    attested = [m for m in pred.get("models", []) if isinstance(m, dict)]
    if model is not None and len(attested) != 1:
        raise ModelTraceError(f"--model names one model, but the attestation is about {len(attested)}")
    for m in attested:
        checks.append(_check_model(m, subjects.get(str(m.get("name"))), report, model, allow_pickle))
    if recompute:
        checks.extend(_recompute(report, tolerance, allow_pickle))
    return BundleResult(tuple(checks))


def _finding_changes(pred: dict[str, Any], report: Any) -> str:
    """The findings that differ between the attested predicate and the report in hand, as one clause."""
    names = {s.name: s for s in report.subjects}
    diffs = []
    for m in pred.get("models", []):
        s = names.get(m.get("name"))
        if s is None:
            diffs.append(f"{m.get('name')} is not in the report")
            continue
        f = m.get("finding") or {}
        v = s.audit
        if v is None:
            continue
        if f.get("relation") != v.relation or f.get("method") != v.method:
            diffs.append(f"relation {f.get('relation')}/{f.get('method')} attested, {v.relation}/{v.method} reported")
        old = {p["model"]: p.get("weight") for p in f.get("parents") or []}
        new = {p.model: p.weight for p in v.parents}
        if old != new:
            diffs.append(f"parents {old} attested, {new} reported")
    return ": " + "; ".join(diffs) if diffs else ""


def _check_model(m: dict[str, Any], subject: dict[str, Any] | None, report: Any, override: str | None,
                 allow_pickle: bool) -> Check:
    from modeltrace.sources import open_source

    name = str(m.get("name"))
    if subject is None:
        return Check(name, "subject", False, f"{name}: the statement has no subject for this model")
    want = (subject.get("digest") or {}).get(MODEL_DIGEST)
    try:
        manifest = ContentDigest.from_dict(m.get("content") or {}, f"{name}: attested manifest")
    except ModelTraceError as exc:
        return Check(name, "subject", False, str(exc))
    if manifest.model != want:
        return Check(name, "subject", False, f"{name}: the statement's subject ({PREFIX}{str(want)[:16]}…) is not "
                     f"the digest of its own manifest ({manifest.model_id[:21]}…): the subject was swapped")
    where = override or next((s.location for s in report.subjects if s.name == name), None) or m.get("location")
    if not where:
        return Check(name, "subject", False, f"{name}: no location to read the model from (give --model)")
    try:
        with open_source(where, allow_pickle=allow_pickle) as src:
            got = content_digest(src)
    except ModelTraceError as exc:
        return Check(name, "subject", False, f"{name}: cannot read the model at {where}: {exc}")
    if got.model == want:
        return Check(name, "subject", True, f"{name}: the model at {where} has the attested content digest "
                     f"{got.model_id[:21]}…")
    c = compare(got, manifest)
    return Check(name, "subject", False, f"{name}: the model at {where} is not the attested one "
                 f"({got.model_id[:21]}…, attested {PREFIX}{str(want)[:16]}…): {c.text}")


def _recompute(report: Any, tolerance: float, allow_pickle: bool) -> list[Check]:
    from modeltrace.report.verify import verify_report

    res = verify_report(report, tolerance=tolerance, allow_pickle=allow_pickle)
    return [Check(c.subject, f"recompute {c.what}", c.ok, c.message) for c in res.checks]
