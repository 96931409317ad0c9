"""The CI gate: which findings make `--fail-on` exit 1.

Only findings of severity medium or above trip a gate: low and info findings (a card without front matter, a
declared base that was not among the candidates) are shown but never fail a build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modeltrace.errors import InputError

if TYPE_CHECKING:  # the report model (pydantic) is imported when a report is gated, not when flags are checked
    from modeltrace.report.model import Finding, Report

GATES = {"undisclosed": ("disclosure",), "license": ("license",), "any": ("disclosure", "license", "card",
                                                                          "provenance")}
MIN_SEVERITY = "medium"


def check_gates(values: list[str] | None) -> list[str]:
    out = []
    for v in values or []:
        for part in v.split(","):
            part = part.strip().lower()
            if part not in GATES:
                raise InputError(f"--fail-on {part!r}: choose undisclosed, license or any")
            out.append(part)
    return out


def tripped(report: Report, gates: list[str]) -> list[Finding]:
    from modeltrace.report.model import SEVERITY_RANK

    cats = {c for g in gates for c in GATES[g]}
    return [f for f in report.findings if f.category in cats and SEVERITY_RANK[f.severity] >= SEVERITY_RANK[
        MIN_SEVERITY]]
