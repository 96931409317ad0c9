"""What the public API returns (modeltrace/api.py): typed, frozen results.

The audit's answer is the report's own `Verdict` (modeltrace/report/model.py: relation as a Literal, parents with
weights and 95% intervals, per-layer rows, p-values), frozen; the results here add what a caller needs next to it:
the recipe as mergekit configuration, its replay, and the whole report (to render as HTML, CycloneDX, SPDX...).
Every result keeps the document it was built from (`document()`), which is what `--json` prints.

Data flow: library dicts (verdict.decide, identify.identify, describe.describe, probes) -> `model_validate` here ->
frozen objects. Nothing is recomputed: a result says exactly what the report and the command line say.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modeltrace.report.model import (
    RELATIONS,
    Description,
    Finding,
    LayerMapEntry,
    LayerRow,
    Parent,
    PValue,
    Relation,
    Report,
    Verdict,
)

__all__ = ["RELATIONS", "AuditResult", "CompareProbe", "CompareRow", "Description", "Finding", "Hit",
           "IdentifyResult", "IdentityProbe", "InspectResult", "LayerMapEntry", "LayerRow", "NameShare", "PValue",
           "Parent", "Recipe", "Relation", "Replay", "Report", "Verdict"]


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)


class _Open(BaseModel):
    """Frozen, and keeps the fields it does not declare (library documents grow)."""

    model_config = ConfigDict(frozen=True, extra="allow")


class Recipe(_Result):
    """A recovered merge (or stack) recipe as a mergekit configuration: `yaml` is what `mergekit-yaml` runs."""

    method: str = Field(description="mergekit's merge_method, e.g. linear, slerp, ties, passthrough")
    config: dict[str, Any]
    yaml: str


class Replay(_Open):
    """The recipe re-run with modeltrace's own merge code against the suspect (`AuditOptions(verify=True)`)."""

    method: str | None = None
    replayed: bool
    reason: str | None = Field(None, description="why it was not replayed")
    tensors: int | None = None
    skipped: int | None = None
    median_rel_error: float | None = None
    max_rel_error: float | None = None
    worst_tensor: str | None = None


class AuditResult(_Result):
    """`modeltrace.audit(...)`: the verdict, the recipe and the report that holds both with their evidence."""

    verdict: Verdict
    recipe: Recipe | None = None
    replay: Replay | None = None
    report: Report

    @property
    def relation(self) -> Relation:
        return self.verdict.relation

    @property
    def method(self) -> str | None:
        return self.verdict.method

    @property
    def summary(self) -> str:
        return self.verdict.summary

    @property
    def parents(self) -> list[Parent]:
        return self.verdict.parents

    @property
    def p_values(self) -> dict[str, PValue]:
        return self.verdict.p_values

    @property
    def layers(self) -> list[LayerRow]:
        return self.verdict.layers

    @property
    def findings(self) -> list[Finding]:
        return self.report.findings

    def document(self) -> dict[str, Any]:
        """The verdict as modeltrace/verdict.py wrote it (the `audit` section of the JSON report)."""
        return self.verdict.model_dump(mode="json", exclude_unset=True)


class InspectResult(_Result):
    """`modeltrace.inspect(...)`: what a checkpoint is, from its headers (and with `hashes`, its content digest)."""

    description: Description
    report: Report

    @property
    def parameters(self) -> int | None:
        return self.description.parameters

    @property
    def layers(self) -> int | None:
        return self.description.layers

    @property
    def findings(self) -> list[Finding]:
        return self.report.findings

    def document(self) -> dict[str, Any]:
        """The description as `modeltrace inspect --json` wrote it before reports existed (modeltrace/describe.py)."""
        return self.description.model_dump(mode="json", exclude_unset=True)


class Hit(_Open):
    """One indexed model ranked by evidence that it is an ancestor of the suspect (Holm-adjusted p-value)."""

    rank: int
    model: str
    spec: str = ""
    role: str = Field(description="parent, base, merge-parent, identical, copy, relative, unrelated, ...")
    similarity: float | None = None
    log10_p: float | None = None
    p: str = ""
    note: str = ""


class IdentifyResult(_Result):
    """`modeltrace.identify(...)`: which indexed models the suspect is made from, and how, from fingerprints."""

    relation: Relation
    method: str | None = None
    parents: list[Parent] = []
    base: str | None = None
    summary: str
    hits: list[Hit] = []
    audit_command: str | None = Field(None, description="the `modeltrace audit` that confirms it on the weights")
    data: dict[str, Any] = Field(description="the whole answer, as `modeltrace identify --json` prints it")

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> IdentifyResult:
        return cls(relation=doc["relation"], method=doc.get("method"), parents=doc.get("parents") or [],
                   base=doc.get("base"), summary=doc.get("summary", ""), hits=doc.get("hits") or [],
                   audit_command=doc.get("audit_command"), data=doc)

    def document(self) -> dict[str, Any]:
        return self.data


class NameShare(_Open):
    """A name (model or company) a probed model gives, and the share of its answers that give it (95% interval)."""

    name: str
    kind: str = ""
    mentions: int = 0
    n: int = 0
    share: float
    interval: list[float]
    expected: bool = False


class IdentityProbe(_Result):
    """`modeltrace.probe_identity(...)`: who a model says it is. Identity alone is weak evidence (models imitate)."""

    summary: str
    names: list[NameShare]
    warnings: list[str] = []
    report: Report
    data: dict[str, Any]

    def document(self) -> dict[str, Any]:
        return self.data


class CompareRow(_Open):
    """One model's behavioural similarity to the suspect; candidates carry a Holm-adjusted p-value."""

    model: str
    role: str = Field(description="candidate or reference")
    related: bool | None = None
    p_adjusted: float | None = None


class CompareProbe(_Result):
    """`modeltrace.probe_compare(...)`: which candidate the suspect behaves like, against unrelated references."""

    summary: str
    models: list[CompareRow]
    warnings: list[str] = []
    report: Report
    data: dict[str, Any]

    def document(self) -> dict[str, Any]:
        return self.data
