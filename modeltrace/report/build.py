"""Fill the report model from what a command computed: inspect's description, audit's run and verdict."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from modeltrace import __version__
from modeltrace.card import parse_card
from modeltrace.errors import ModelTraceError
from modeltrace.redact import scrub
from modeltrace.report import card_audit
from modeltrace.report.evidence import collect
from modeltrace.report.licenses import parse_licence
from modeltrace.report.model import (
    SEVERITY_RANK,
    Description,
    Finding,
    ProbeResult,
    ProbeShare,
    Report,
    Subject,
    ToolInfo,
    Verdict,
)
from modeltrace.sources import open_source
from modeltrace.sources.base import Source

PACKAGES = ("numpy", "scipy", "safetensors", "gguf", "huggingface_hub", "pydantic", "cyclonedx-python-lib")


def tool_info() -> ToolInfo:
    pkgs = {}
    for name in PACKAGES:
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ToolInfo(version=__version__, python=platform.python_version(), platform=platform.platform(terse=True),
                    packages=pkgs)


def now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def new_report(command: str, subjects: list[Subject], findings: list[Finding], argv: list[str] | None = None
               ) -> Report:
    findings = sorted(findings, key=lambda f: -SEVERITY_RANK[f.severity])  # stable: worst first, then found order
    args = [scrub(a) or "" for a in (sys.argv[1:] if argv is None else argv)]  # ?api-key=... in an endpoint URL
    return Report(command=command, created=now(), tool=tool_info(), argv=args, subjects=subjects, findings=findings)


def _card_of(spec: str | None, allow_pickle: bool) -> str | None:
    """A model's card text, or None when it has none or cannot be opened (the finding then says so)."""
    if not spec:
        return None
    try:
        with open_source(spec, allow_pickle=allow_pickle) as src:
            return src.card_text()
    except ModelTraceError:
        return None


def inspect_subject(label: str, spec: str, description: dict[str, Any], source: Source,
                    hashes: bool = False) -> tuple[Subject, list[Finding]]:
    card, _body, findings = card_audit.card_only(label, source.card_text())
    # describe() already hashed the weight files with --hashes: reuse those instead of reading everything twice
    evidence = collect([(label, "model", spec, source, False)], parameters={"hashes": hashes})
    known = {f["name"]: f["sha256"] for f in description.get("files", []) if f.get("sha256")}
    for f in evidence.sources[0].files:
        f.sha256 = f.sha256 or known.get(f.name)
    subject = Subject(name=label, location=spec, description=Description.model_validate(description), card=card,
                      evidence=evidence)
    return subject, findings


def audit_subject(run: Any, verdict: dict[str, Any], parameters: dict[str, Any], full_hashes: bool = False,
                  allow_pickle: bool = False, seeds: dict | None = None, evidence: bool = True
                  ) -> tuple[Subject, list[Finding]]:
    """One audited model: verdict, plot data, card audit against the findings, ancestors' licences, evidence
    (`evidence=False`: no hashing, for `verify`, which re-derives the rest and checks the files on its own)."""
    from modeltrace.describe import describe
    from modeltrace.report.detail import audit_detail

    views = run.views
    suspect = views[0]
    if "mergekit_yaml" not in verdict:  # the CLI adds it; library callers (demo, tests) may not have
        from modeltrace.recipe import to_mergekit, to_yaml

        cfg = to_mergekit(verdict, verdict["sources"])
        verdict = {**verdict, "mergekit_yaml": to_yaml(cfg) if cfg else None}
    v = Verdict.model_validate(verdict)
    try:
        with open_source(suspect.spec, allow_pickle=allow_pickle) as src:
            description = Description.model_validate(describe(src))
            card_text = src.card_text()
    except ModelTraceError:  # it was readable a moment ago; keep the report rather than fail on a side detail
        description, card_text = None, None
    card, body, findings = card_audit.card_only(suspect.label, card_text)

    roles = {0: "suspect"}
    for i in range(1, len(views)):
        roles[i] = "base" if run.base == i else "candidate"
    bundle = collect([(vw.label, roles[i], vw.spec, vw.source, full_hashes or i == 0)
                      for i, vw in enumerate(views)], parameters=parameters, seeds=seeds) if evidence else None
    hashes = {s.label: {f.name: f.sha256 or f.lfs_sha256 for f in s.files if f.sha256 or f.lfs_sha256}
              for s in (bundle.sources if bundle else [])}
    ancestors = card_audit.ancestors_from(v)
    for a in ancestors:
        info = parse_card(_card_of(a.location, allow_pickle))
        a.card_present = bool(info["present"])
        a.license = info["license"]
        lic = parse_licence(info["license"])
        a.license_spdx = lic.ref if lic else None
        a.card_base_model = info["base_model"]
        a.sha256 = {k: val for k, val in hashes.get(a.model, {}).items() if val}
    findings += card_audit.disclosure_findings(suspect.label, card, body, v, ancestors)
    findings += card_audit.licence_findings(suspect.label, card, body, ancestors)
    subject = Subject(name=suspect.label, location=suspect.spec, description=description, audit=v,
                      detail=audit_detail(run, verdict), card=card, ancestors=ancestors, evidence=bundle)
    return subject, findings


def audit_parameters(candidates: list[str], base: str | None, sample: float | None, chunk_bytes: int,
                     allow_pickle: bool, hashes: bool) -> dict[str, Any]:
    from modeltrace.verdict import ALPHA

    return {"candidates": list(candidates), "base": base, "sample": sample, "chunk_bytes": chunk_bytes,
            "allow_pickle": allow_pickle, "alpha": ALPHA, "hashes": hashes}


def probe_result(probe: str, counts: dict[str, int], questions: int, note: str = "") -> ProbeResult:
    """A behavioural probe's shares for the report: how many of `questions` answers named each identity, with 95%
    Wilson intervals (small counts and shares near 0 or 1 keep honest bounds)."""
    from modeltrace.stats import wilson

    shares = []
    for name, k in sorted(counts.items(), key=lambda kv: -kv[1]):
        p, lo, hi = wilson(int(k), int(questions))
        shares.append(ProbeShare(name=name, share=round(p, 4), interval=[round(lo, 4), round(hi, 4)], count=int(k)))
    return ProbeResult(probe=probe, questions=int(questions), shares=shares, note=note)
