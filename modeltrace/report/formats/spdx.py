"""SPDX 3.0.1 with the AI profile (JSON-LD), written with spdx-python-model: each model an `ai_AIPackage` with its
hashes and declared licence, ancestors as AI packages linked by `ancestorOf`, the merge recipe as hyperparameters.

spdx-python-model checks property types on assignment and required properties on serialisation; it does not run
the SHACL shapes, so "valid" here means: typed by the official bindings and read back by their deserialiser.
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from typing import Any

from modeltrace.report.formats import ReportFormat
from modeltrace.report.licenses import parse_licence
from modeltrace.report.model import Report, Subject
from modeltrace.report.plain import plain_verdict


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in text)


class SpdxFormat(ReportFormat):
    name = "spdx"
    suffixes = (".spdx.json", ".spdx3.json")

    def render(self, report: Report) -> str:
        from spdx_python_model import v3_0_1 as spdx

        self.spdx = spdx
        digest = hashlib.sha256(report.to_json().encode()).hexdigest()[:16]
        self.base = f"https://spdx.modeltrace.invalid/{digest}"
        created = datetime.fromisoformat(report.created.replace("Z", "+00:00")) if report.created else \
            datetime.now(UTC)
        self.ci = spdx.CreationInfo(specVersion="3.0.1", created=created)
        agent = spdx.SoftwareAgent(_id=f"{self.base}/agent/modeltrace", creationInfo=self.ci, name="modeltrace")
        tool = spdx.Tool(_id=f"{self.base}/tool/modeltrace", creationInfo=self.ci,
                         name=f"modeltrace {report.tool.version}")
        self.ci.createdBy.append(agent)
        self.ci.createdUsing.append(tool)
        self.elements: list[Any] = [agent, tool]
        self._licences: dict[str, Any] = {}
        roots = [self._subject(report, s) for s in report.subjects]
        names = ", ".join(s.name for s in report.subjects)
        doc = spdx.SpdxDocument(_id=f"{self.base}/document", creationInfo=self.ci,
                                name=f"modeltrace {report.command} report: {names}",
                                dataLicense=self._licence("CC0-1.0"), rootElement=roots, element=self.elements,
                                profileConformance=[spdx.ProfileIdentifierType.core,
                                                    spdx.ProfileIdentifierType.software,
                                                    spdx.ProfileIdentifierType.ai,
                                                    spdx.ProfileIdentifierType.simpleLicensing])
        objset = spdx.SHACLObjectSet()
        objset.add(doc)
        for e in self.elements:
            objset.add(e)
        buf = io.BytesIO()
        spdx.JSONLDSerializer().write(objset, buf, indent=2)
        return buf.getvalue().decode("utf-8") + "\n"

    def _licence(self, expression: str) -> Any:
        lic = self._licences.get(expression)
        if lic is None:
            lic = self.spdx.simplelicensing_LicenseExpression(
                _id=f"{self.base}/license/{_safe(expression)}", creationInfo=self.ci, simplelicensing_licenseExpression=
                expression)
            self._licences[expression] = lic
            self.elements.append(lic)
        return lic

    def _declare(self, pkg: Any, raw: str | None, key: str) -> None:
        for part in (raw or "").split(","):
            lic = parse_licence(part)
            if lic is None:
                continue
            rel = self.spdx.Relationship(_id=f"{self.base}/rel/{key}-license-{_safe(lic.ref)}", creationInfo=self.ci,
                                         from_=pkg, to=[self._licence(lic.ref)],
                                         relationshipType=self.spdx.RelationshipType.hasDeclaredLicense)
            self.elements.append(rel)

    def _package(self, key: str, name: str, location: str | None, shas: list[str]) -> Any:
        spdx = self.spdx
        pkg = spdx.ai_AIPackage(_id=f"{self.base}/model/{_safe(key)}", creationInfo=self.ci, name=name,
                                software_primaryPurpose=spdx.software_SoftwarePurpose.model)
        if location and location.startswith("hf://"):
            repo = location[5:].split("@")[0]
            pkg.software_downloadLocation = f"https://huggingface.co/{repo}"
        for h in shas:
            pkg.verifiedUsing.append(spdx.Hash(algorithm=spdx.HashAlgorithm.sha256, hashValue=h))
        self.elements.append(pkg)
        return pkg

    def _subject(self, report: Report, s: Subject) -> Any:
        spdx = self.spdx
        ev = s.evidence
        src = ev.sources[0] if ev and ev.sources else None
        weights = [f for f in (src.files if src else []) if f.name.endswith((".safetensors", ".gguf", ".bin"))]
        shas = [f.sha256 or f.lfs_sha256 for f in weights if f.sha256 or f.lfs_sha256]
        pkg = self._package(s.name, s.name, s.location, shas)
        d = s.description
        if d is not None:
            mt = d.architecture.get("model_type") or d.architecture.get("family")
            if mt:
                pkg.ai_typeOfModel.append(str(mt))
        v = s.audit
        if v is not None:
            pkg.description = plain_verdict(v)
            pkg.comment = v.summary
            pkg.ai_informationAboutTraining = (f"modeltrace found from the weights: {v.relation}"
                                               + (f" ({v.method})" if v.method else "") + ". " + v.summary
                                               + (f"\nRecovered recipe (mergekit YAML):\n{v.mergekit_yaml}"
                                                  if v.mergekit_yaml else ""))
            for p in v.parents:
                if p.weight is not None:
                    pkg.ai_hyperparameter.append(spdx.DictionaryEntry(key=f"merge_weight:{p.model}",
                                                                      value=f"{p.weight:.4f}"))
            params = v.parameters or {}
            for k, val in params.items():
                if isinstance(val, dict) and "value" in val:
                    pkg.ai_hyperparameter.append(spdx.DictionaryEntry(key=f"merge_{k}", value=str(val["value"])))
        limits = [f"{f.severity}: {f.title}. {f.detail}" for f in report.findings if f.subject == s.name
                  and f.severity in ("medium", "high", "critical")]
        if limits:
            pkg.ai_limitation = " | ".join(limits)
        if s.card and s.card.base_model:
            pkg.software_attributionText.append("base_model: " + ", ".join(s.card.base_model))
        self._declare(pkg, s.card.license if s.card else None, _safe(s.name))
        for a in s.ancestors:
            anc = self._package(f"{s.name}/ancestor/{a.model}", a.model, a.location, list(a.sha256.values())[:1]
                                if len(a.sha256) == 1 else [])
            self._declare(anc, a.license, _safe(f"{s.name}-{a.model}"))
            note = a.relation + (f", weight {a.weight:.4f}" if a.weight is not None else "") + \
                (f", 95% interval [{a.interval[0]:.4f}, {a.interval[1]:.4f}]" if a.interval and None not in a.interval
                 else "") + (f", independence {a.p_text}" if a.p_text else "")
            rel = spdx.Relationship(_id=f"{self.base}/rel/{_safe(s.name)}-ancestor-{_safe(a.model)}",
                                    creationInfo=self.ci, from_=anc, to=[pkg],
                                    relationshipType=spdx.RelationshipType.ancestorOf, comment=note)
            self.elements.append(rel)
        return pkg
