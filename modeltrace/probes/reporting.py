"""Probe results as modeltrace reports (modeltrace/report): the same JSON, Markdown, HTML, CycloneDX and SPDX
outputs as `inspect` and `audit`, so behavioural evidence sits next to the weights' evidence.

identity: the subject's `probes` entry (shares with intervals, plotted in HTML) carries the full probe result,
raw answers included. compare: the suspect's `compare` section, and a finding per candidate it behaves like.
"""

from __future__ import annotations

from typing import Any

from modeltrace.probes.identity import WEAK
from modeltrace.report.build import new_report
from modeltrace.report.model import Finding, ProbeResult, ProbeShare, Report, Subject


def identity_report(rep: dict[str, Any], spec: str) -> Report:
    m = rep["model"]
    label = _name(m, spec)
    shares = [ProbeShare(name=r["name"], share=round(r["share"], 4),
                         interval=[round(r["interval"][0], 4), round(r["interval"][1], 4)], count=r["mentions"])
              for r in rep["names"]]
    extra = {k: rep[k] for k in ("model", "settings", "counts", "names", "expected", "warnings", "answers")}
    note = rep["summary"].replace(WEAK, "").strip()  # the report's own caption says identity is weak evidence
    probe = ProbeResult(probe="identity", questions=rep["counts"]["answers"], shares=shares, note=note, **extra)
    findings = []
    named = [r for r in rep["names"] if not r["expected"] and r["mentions"]]
    for e in rep["expected"]:
        if named and named[0]["interval"][0] > e["interval"][1]:
            top = named[0]
            findings.append(Finding(
                code="identity-mismatch", severity="medium", category="provenance", subject=label,
                title=f"Calls itself {top['name']}, not {e['name']}",
                detail=f"{top['name']} {top['text']} of answers vs {e['name']} {e['text']} (system prompt: "
                       f"{rep['settings']['system_prompt']}). Identity alone is weak evidence; audit the weights.",
                data={"expected": e["name"], "named": top["name"]}))
    subject = Subject(name=label, location=_location(m, spec), probes=[probe])
    return new_report("probe identity", [subject], findings)


def compare_report(rep: dict[str, Any], spec: str) -> Report:
    label = _name(rep["suspect"], spec)
    findings = [Finding(
        code="behaves-like", severity="medium", category="provenance", subject=label,
        title=f"Behaves like {r['model']}",
        detail=f"closer to the suspect than every unrelated reference on {rep['metric']} similarity over "
               f"{rep['settings']['prompts']} prompts ({r['p_text']}, Holm-adjusted). Similarity cannot tell a "
               "parent from a sibling or a child; audit the weights.",
        data={"candidate": r["model"], "p_adjusted": r["p_adjusted"], "metric": rep["metric"]})
        for r in rep["models"] if r.get("related")]
    subject = Subject(name=label, location=_location(rep["suspect"], spec), compare=rep)
    return new_report("probe compare", [subject], findings)


def _name(desc: dict[str, Any], spec: str) -> str:
    """A short name for headings: the folder's name, or the endpoint's model id."""
    model = str(desc.get("model") or spec)
    return model if desc.get("backend") == "endpoint" else model.rstrip("/").rsplit("/", 1)[-1] or model


def _location(desc: dict[str, Any], spec: str) -> str:
    """Where the model was asked: the folder, or the endpoint without credentials or query."""
    if desc.get("backend") == "endpoint":
        return f"{desc.get('endpoint')}#{desc.get('model')}"
    return spec
