"""The one report every command fills (inspect, audit, demo; later identify and probes), versioned.

Every output format (JSON, Markdown, HTML, CycloneDX, SPDX) renders this model, and `modeltrace verify` reads it back,
so a finding means the same thing wherever it lands. Sections owned by other modules (the audit verdict, the inspect
description) are typed for the fields the renderers use and let every other field through (`extra="allow"`), so the
report never drops what the library computed. The JSON Schema is published at docs/report.schema.json.

Versioning: `schema_version` is MAJOR.MINOR (one constant, modeltrace/schema.py, for the report and the verdict,
identify and inspect documents in it). A reader accepts any minor version of its own major, "1" included (unknown
fields are kept), and refuses other majors with a message that says what to do.

The verdict types (Verdict, Parent, PValue, LayerRow, LayerMapEntry) are frozen: the public API (modeltrace/api.py)
returns them as they are, and no step after `verdict.decide` may change a verdict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modeltrace.errors import InputError
from modeltrace.schema import SCHEMA_VERSION, major

DOCUMENT = "modeltrace-report"

Severity = Literal["info", "low", "medium", "high", "critical"]
#: What a suspect is to its candidates (modeltrace/verdict.py decides it; docs/api.md says what each one means).
Relation = Literal["copy", "recast", "finetune", "merge", "stack", "partial", "related", "independent"]
RELATIONS: tuple[str, ...] = ("copy", "recast", "finetune", "merge", "stack", "partial", "related", "independent")
SEVERITY_RANK: dict[str, int] = {"info": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
Pair = list[float | None]


class Loose(BaseModel):
    """Keeps fields it does not know: sections grow, and a report must never lose data on a round trip."""

    model_config = ConfigDict(extra="allow")


class Frozen(BaseModel):
    """A Loose model that cannot be changed once built (results handed to library users)."""

    model_config = ConfigDict(extra="allow", frozen=True)


# ---- what the library computed ------------------------------------------------------------------------------------
class Parent(Frozen):
    model: str
    weight: float | None = Field(None, description="mean recipe weight across matrix tensors")
    interval: Pair | None = Field(None, description="95% t-interval of the weight across tensors")
    layers: int | None = Field(None, description="stacks: how many suspect layers come from this parent")


class PValue(Frozen):
    log10_p: float
    p: float
    text: str


class LayerRow(Frozen):
    layer: int = Field(description="-1 = embeddings, final norm and lm_head")
    method: str
    share: float | None = None
    weights: dict[str, float | None] = {}
    r2_min: float | None = None
    z: dict[str, float | None] = {}


class LayerMapEntry(Frozen):
    layer: int
    model: str
    source_layer: int


class Verdict(Frozen):
    """`modeltrace audit`'s verdict (modeltrace/verdict.py); see docs/inspect.md for every key."""

    suspect: str
    candidates: list[str] = []
    base: str | None = None
    relation: Relation = Field(description="copy, recast, finetune, merge, stack, partial, related (a relative "
                                           "through training whose direction the weights cannot give) or "
                                           "independent")
    method: str | None = None
    summary: str = ""
    parents: list[Parent] = []
    p_values: dict[str, PValue] = {}
    layers: list[LayerRow] = []
    layer_map: list[LayerMapEntry] | None = None
    parameters: dict[str, Any] | None = None
    by_role: dict[str, dict[str, float | None]] | None = None
    warnings: list[str] = []
    bytes_read: int = 0
    elapsed_s: float = 0.0
    sample: float | None = None
    sources: dict[str, str] = {}
    mergekit_yaml: str | None = None
    verify: dict[str, Any] | None = None


class Description(Frozen):
    """`modeltrace inspect`'s description (modeltrace/describe.py); see docs/inspect.md."""

    location: str
    format: str
    architecture: dict[str, Any] = {}
    parameters: int | None = None
    layers: int | None = None
    files: list[dict[str, Any]] = []


class WeightPoint(BaseModel):
    layer: int
    weight: float | None
    interval: Pair
    tensors: int = Field(description="tensors of this layer whose fit agrees with the layer's method")


class LayerWeights(BaseModel):
    """One parent's recipe weight per layer with a 95% interval across that layer's tensors."""

    model: str
    points: list[WeightPoint]


class SimilarityGrid(BaseModel):
    """Similarity of the suspect to one candidate per layer and tensor role (mean over experts)."""

    candidate: str
    measure: str = "centred correlation of the weights (1 = identical up to scale, ~0 = unrelated)"
    layers: list[int]
    roles: list[str]
    values: list[list[float | None]] = Field(description="values[i][j]: layer layers[i], role roles[j]")


class AuditDetail(BaseModel):
    """Per-layer and per-role numbers behind the plots, computed from the audit's per-tensor fits."""

    weights: list[LayerWeights] = []
    similarity: list[SimilarityGrid] = []


class ProbeShare(BaseModel):
    name: str
    share: float
    interval: Pair
    count: int = 0


class ProbeResult(Loose):
    """A behavioural probe, e.g. identity questions: how often the model names each identity (Wilson intervals)."""

    probe: str
    questions: int
    shares: list[ProbeShare]
    note: str = ""


class CardInfo(Loose):
    present: bool = False
    front_matter: bool = False
    base_model: list[str] = []
    base_model_relation: str | None = None
    license: str | None = None
    tags: list[str] = []
    problems: list[str] = []


class Ancestor(BaseModel):
    """A model the suspect was found to derive from, with what its own card says (licence, attribution)."""

    model: str
    location: str | None = None
    relation: str = Field(description="merge-parent, finetune-parent, stack-source, copy-source, relative "
                                      "(direction unknown) or base")
    weight: float | None = None
    interval: Pair | None = None
    layers: int | None = None
    p_text: str | None = None
    license: str | None = Field(None, description="licence as written in the ancestor's card")
    license_spdx: str | None = Field(None, description="the same, as an SPDX id or LicenseRef-")
    card_present: bool = False
    card_base_model: list[str] = []
    sha256: dict[str, str] = Field({}, description="weight file -> SHA-256, where known")


class Finding(BaseModel):
    code: str = Field(description="stable id, e.g. undisclosed-merge, license-changed")
    severity: Severity
    category: Literal["disclosure", "license", "card", "provenance"]
    subject: str
    title: str
    detail: str = ""
    data: dict[str, Any] = {}


# ---- evidence -----------------------------------------------------------------------------------------------------
class FileEvidence(BaseModel):
    name: str
    size: int | None = None
    sha256: str | None = Field(None, description="SHA-256 of the whole file")
    header_sha256: str | None = Field(None, description="safetensors: SHA-256 of the 8-byte length and JSON header")
    sample_sha256: str | None = Field(None, description="SHA-256 over the sampled blocks (see Evidence.hashing)")
    lfs_sha256: str | None = Field(None, description="hf://: the Hub's content hash from the file listing")


class RangeEvidence(BaseModel):
    """One byte range read (count 1: sha256 of its bytes) or a block of `count` consecutive ranges of one file
    (offset/length span them; sha256 over their "offset:length:sha256" lines), so big remote audits stay small."""

    file: str
    offset: int
    length: int
    sha256: str
    count: int = 1


class SourceEvidence(BaseModel):
    label: str
    role: Literal["suspect", "candidate", "base", "model"]
    spec: str
    location: str
    format: str | None = None
    revision: str | None = None
    commit: str | None = Field(None, description="hf://: the commit the reads were pinned to")
    files: list[FileEvidence] = []
    ranges: list[RangeEvidence] = Field([], description="hf://: every byte range read, with its SHA-256")
    bytes_read: int = 0


class Evidence(BaseModel):
    """What a re-check needs: the exact parameters and what each source was when it was read."""

    parameters: dict[str, Any] = {}
    seeds: dict[str, Any] = {}
    hashing: str = ""
    hash_seconds: float = 0.0
    sources: list[SourceEvidence] = []


class Subject(BaseModel):
    """One model the report is about, with everything each command found for it."""

    model_config = ConfigDict(extra="allow")

    name: str
    location: str
    description: Description | None = None
    audit: Verdict | None = None
    detail: AuditDetail | None = None
    card: CardInfo | None = None
    ancestors: list[Ancestor] = []
    probes: list[ProbeResult] = []
    identify: dict[str, Any] | None = None
    evidence: Evidence | None = None


class ToolInfo(BaseModel):
    name: str = "modeltrace"
    version: str
    python: str
    platform: str
    packages: dict[str, str] = {}


class Report(BaseModel):
    """A modeltrace report: header, one subject per model examined, and the findings a person or gate acts on."""

    model_config = ConfigDict(extra="allow")

    document: Literal["modeltrace-report"] = "modeltrace-report"
    schema_version: str = SCHEMA_VERSION
    command: str
    created: str = Field(description="UTC time, ISO 8601")
    tool: ToolInfo
    argv: list[str] = []
    subjects: list[Subject]
    findings: list[Finding] = []

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=False) + "\n"

    def worst(self, category: str | None = None) -> str | None:
        levels = [f.severity for f in self.findings if category is None or f.category == category]
        return max(levels, key=SEVERITY_RANK.__getitem__) if levels else None


def json_schema() -> dict[str, Any]:
    schema = Report.model_json_schema()
    schema["$id"] = f"https://modeltrace.dev/schema/report-{SCHEMA_VERSION}.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def load_report(path: str | Path) -> Report:
    """Read a report written by `--format json`; every way it can be wrong is one clear sentence."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{p}: no such report file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read the report ({type(exc).__name__})") from None
    return parse_report(text, str(p))


def parse_report(text: str, where: str = "report") -> Report:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not a JSON report ({exc.msg} at line {exc.lineno}); write one with "
                         "--format json") from None
    if not isinstance(doc, dict):
        raise InputError(f"{where}: not a modeltrace report (expected a JSON object)")
    if doc.get("document") != DOCUMENT:
        if "relation" in doc and "p_values" in doc:
            raise InputError(f"{where}: a bare audit verdict (schema {doc.get('schema_version', '?')}, from `audit "
                             "--json` before reports existed); it records no evidence to verify: re-run the audit "
                             "with --format json")
        if "architecture" in doc and "location" in doc:
            raise InputError(f"{where}: a bare inspect description (schema {doc.get('schema_version', '?')}); "
                             "re-run inspect with --format json to get a report")
        raise InputError(f"{where}: not a modeltrace report (no \"document\": \"{DOCUMENT}\" field)")
    version = str(doc.get("schema_version", ""))
    theirs, mine = major(version), major(SCHEMA_VERSION)
    if theirs is None or mine is None:
        raise InputError(f"{where}: report has no valid schema_version ({version!r})")
    if theirs < mine:
        raise InputError(f"{where}: report schema {version} is older than this modeltrace's {SCHEMA_VERSION} "
                         f"(written by modeltrace {_tool_version(doc)}); re-run the command to write a current one")
    if theirs > mine:
        raise InputError(f"{where}: report schema {version} is newer than this modeltrace's {SCHEMA_VERSION} "
                         f"(written by modeltrace {_tool_version(doc)}); upgrade modeltrace to read it")
    try:
        return Report.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise InputError(f"{where}: invalid report at {loc or 'top level'}: {err['msg']}") from None


def _tool_version(doc: dict) -> str:
    tool = doc.get("tool")
    return str(tool.get("version", "?")) if isinstance(tool, dict) else "?"
