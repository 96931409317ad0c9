"""CycloneDX 1.6 ML-BOM: each model a `machine-learning-model` component with hashes and licences, its detected
ancestors in `pedigree` (relation, weight, interval and the recovered recipe as properties), and its card as
`modelCard`.

cyclonedx-python-lib 11 models components, hashes and pedigree but not `modelCard`; the card is added to the JSON
after serialisation (the document still validates against the 1.6 schema, which the tests check).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from modeltrace.report.formats import ReportFormat
from modeltrace.report.licenses import parse_licence
from modeltrace.report.model import Ancestor, Report, Subject
from modeltrace.report.plain import plain_verdict

NS = "modeltrace"


def _ref(*parts: str) -> str:
    return ":".join(p.replace(" ", "_") for p in parts)


class CycloneDXFormat(ReportFormat):
    name = "cyclonedx"
    suffixes = (".cdx.json",)

    def render(self, report: Report) -> str:
        from cyclonedx.model.bom import Bom
        from cyclonedx.model.component import Component, ComponentType
        from cyclonedx.output.json import JsonV1Dot6

        bom = Bom()
        bom.metadata.tools.components.add(Component(type=ComponentType.APPLICATION, name="modeltrace",
                                                    version=report.tool.version, bom_ref=_ref("tool", "modeltrace")))
        bom.metadata.properties.add(self._prop("report:schema_version", report.schema_version))
        bom.metadata.properties.add(self._prop("report:command", report.command))
        cards: dict[str, dict] = {}
        for i, s in enumerate(report.subjects):
            comp = self._model(report, s)
            cards[str(comp.bom_ref)] = self._model_card(s)
            if i == 0:
                bom.metadata.component = comp
            else:
                bom.components.add(comp)
        with warnings.catch_warnings():  # pedigree ancestors are not dependencies; the library warns about that
            warnings.filterwarnings("ignore", message=".*has no defined dependencies.*")
            doc = json.loads(JsonV1Dot6(bom).output_as_string())
        comps = ([doc["metadata"]["component"]] if "component" in doc.get("metadata", {}) else []) + \
            doc.get("components", [])
        for c in comps:
            card = cards.get(c.get("bom-ref"))
            if card:
                c["modelCard"] = card
        return json.dumps(doc, indent=2) + "\n"

    # ---- pieces ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _prop(name: str, value: Any) -> Any:
        from cyclonedx.model import Property

        return Property(name=f"{NS}:{name}", value=str(value))

    @staticmethod
    def _licences(raw: str | None) -> list:
        from cyclonedx.model.license import DisjunctiveLicense

        out = []
        for part in (raw or "").split(","):
            lic = parse_licence(part)
            if lic is None:
                continue
            out.append(DisjunctiveLicense(id=lic.spdx) if lic.spdx else DisjunctiveLicense(name=lic.raw))
        return out

    @staticmethod
    def _hashes(shas: list[str]) -> list:
        from cyclonedx.model import HashAlgorithm, HashType

        return [HashType(alg=HashAlgorithm.SHA_256, content=h) for h in shas]

    @staticmethod
    def _hub(location: str | None, commit: str | None = None) -> tuple[Any, list]:
        """purl (pkg:huggingface/owner/name@commit) and a website link for hf:// models."""
        from cyclonedx.model import ExternalReference, ExternalReferenceType, XsUri
        from packageurl import PackageURL

        if not location or not location.startswith("hf://"):
            return None, []
        repo = location[5:].split("@")[0]
        rev = commit or (location.split("@")[1] if "@" in location else None)
        owner, _, name = repo.rpartition("/")
        purl = PackageURL(type="huggingface", namespace=owner or None, name=name, version=rev)
        ref = ExternalReference(type=ExternalReferenceType.WEBSITE, url=XsUri(f"https://huggingface.co/{repo}"))
        return purl, [ref]

    def _model(self, report: Report, s: Subject) -> Any:
        from cyclonedx.model.component import Component, ComponentType, Pedigree

        ev = s.evidence
        src = ev.sources[0] if ev and ev.sources else None
        files = src.files if src else []
        weights = [f for f in files if f.name.endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth"))]
        shas = [f.sha256 or f.lfs_sha256 for f in weights]
        purl, refs = self._hub(s.location, src.commit if src else None)
        props = []
        v = s.audit
        if v is not None:
            props += [self._prop("relation", v.relation), self._prop("summary", v.summary),
                      self._prop("verdict", plain_verdict(v))]
            if v.method:
                props.append(self._prop("method", v.method))
            if v.mergekit_yaml:
                props.append(self._prop("recipe:mergekit_yaml", v.mergekit_yaml))
            for name, p in v.p_values.items():
                props.append(self._prop(f"independence_p:{name}", p.text))
        for f in report.findings:
            if f.subject == s.name:
                props.append(self._prop(f"finding:{f.code}", f"{f.severity}: {f.title}. {f.detail}"))
        subfiles = [Component(type=ComponentType.FILE, name=f.name, bom_ref=_ref("file", s.name, f.name),
                              hashes=self._hashes([f.sha256 or f.lfs_sha256] if (f.sha256 or f.lfs_sha256) else []),
                              properties=[self._prop("sampled_sha256", f.sample_sha256)] if f.sample_sha256 else [])
                    for f in files]
        pedigree = None
        if s.ancestors:
            notes = (v.summary if v else "") + (f"\nRecipe (mergekit YAML):\n{v.mergekit_yaml}" if v and
                                                v.mergekit_yaml else "")
            pedigree = Pedigree(ancestors=[self._ancestor(s, a) for a in s.ancestors], notes=notes or None)
        d = s.description
        return Component(
            type=ComponentType.MACHINE_LEARNING_MODEL, name=s.name, bom_ref=_ref("model", s.name),
            version=(src.commit if src and src.commit else None),
            description=(plain_verdict(v) if v else f"{d.architecture.get('model_type')} model" if d else None),
            hashes=self._hashes([h for h in shas if h]) if len(weights) == 1 and all(shas) else [],
            licenses=self._licences(s.card.license if s.card else None), purl=purl, external_references=refs,
            properties=props, pedigree=pedigree, components=subfiles)

    def _ancestor(self, s: Subject, a: Ancestor) -> Any:
        from cyclonedx.model.component import Component, ComponentType

        declared = bool(s.card) and any(_same(d, a) for d in s.card.base_model)
        props = [self._prop("relation", a.relation), self._prop("declared_in_card", str(declared).lower())]
        if a.weight is not None:
            props.append(self._prop("weight", f"{a.weight:.4f}"))
        if a.interval and None not in a.interval:
            props.append(self._prop("weight_interval_95", f"[{a.interval[0]:.4f}, {a.interval[1]:.4f}]"))
        if a.layers is not None:
            props.append(self._prop("layers", a.layers))
        if a.p_text:
            props.append(self._prop("independence_p", a.p_text))
        if a.location:
            props.append(self._prop("location", a.location))
        for b in a.card_base_model:
            props.append(self._prop("card:base_model", b))
        purl, refs = self._hub(a.location)
        shas = list(a.sha256.values())
        return Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=a.model, bom_ref=_ref("ancestor", s.name,
                                                                                                a.model),
                         hashes=self._hashes(shas) if len(shas) == 1 else [], licenses=self._licences(a.license),
                         purl=purl, external_references=refs, properties=props)

    @staticmethod
    def _model_card(s: Subject) -> dict:
        card: dict[str, Any] = {"bom-ref": _ref("model-card", s.name)}
        params: dict[str, Any] = {}
        d = s.description
        if d is not None:
            arch = d.architecture
            params["architectureFamily"] = "transformer" if arch.get("family") else "unknown"
            names = arch.get("architectures") or []
            params["modelArchitecture"] = ", ".join(names) or str(arch.get("model_type") or arch.get("family"))
        c = s.card
        extra = (c.model_extra or {}) if c else {}
        if extra.get("pipeline_tag"):
            params["task"] = str(extra["pipeline_tag"])
        if extra.get("datasets"):
            params["datasets"] = [{"type": "dataset", "name": str(x)} for x in extra["datasets"]]
        if params:
            card["modelParameters"] = params
        props = []
        if c is not None:
            props += [{"name": "hf:card_present", "value": str(c.present).lower()}]
            props += [{"name": "hf:base_model", "value": b} for b in c.base_model]
            if c.base_model_relation:
                props.append({"name": "hf:base_model_relation", "value": c.base_model_relation})
            if c.license:
                props.append({"name": "hf:license", "value": c.license})
            props += [{"name": "hf:tag", "value": t} for t in c.tags]
            props += [{"name": "modeltrace:card_problem", "value": p} for p in c.problems]
        if d is not None:
            for key in ("parameters", "layers"):
                if getattr(d, key, None) is not None:
                    props.append({"name": f"modeltrace:{key}", "value": str(getattr(d, key))})
            dx = d.model_extra or {}
            for key in ("active_parameters", "hidden_size", "vocab_size"):
                if dx.get(key) is not None:
                    props.append({"name": f"modeltrace:{key}", "value": str(dx[key])})
        if s.audit is not None:
            card["considerations"] = {"technicalLimitations": [
                "Provenance established by modeltrace from the weights: " + plain_verdict(s.audit)]}
        if props:
            card["properties"] = props
        return card


def _same(declared: str, a: Ancestor) -> bool:
    from modeltrace.report.card_audit import refers_to

    return refers_to(declared, a.model, a.location)
