"""Every output format from one report: CycloneDX 1.6 (schema-validated), SPDX 3.0.1 AI, Markdown, JSON; the
--format / --output / --json options of the commands and `render`."""

from __future__ import annotations

import json

import pytest
from report_helpers import cli

from modeltrace.report import formats
from modeltrace.report.model import parse_report


def cdx_errors(text: str):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    return JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)


def test_cyclonedx_ml_bom_is_valid_and_complete(rio_report):
    text = formats.render(rio_report, "cyclonedx")
    assert cdx_errors(text) is None
    doc = json.loads(text)
    assert doc["specVersion"] == "1.6" and doc["bomFormat"] == "CycloneDX"
    model = doc["metadata"]["component"]
    assert model["type"] == "machine-learning-model" and model["name"] == "rio"
    assert model["hashes"][0]["alg"] == "SHA-256" and len(model["hashes"][0]["content"]) == 64
    assert model["licenses"][0]["license"]["id"] == "MIT"
    props = {p["name"]: p["value"] for p in model["properties"]}
    assert props["modeltrace:relation"] == "merge" and props["modeltrace:method"] == "linear"
    assert "merge_method: linear" in props["modeltrace:recipe:mergekit_yaml"]
    assert "modeltrace:finding:undisclosed-merge" in props
    ancestors = {a["name"]: a for a in model["pedigree"]["ancestors"]}
    assert set(ancestors) == {"nex", "qwen"}
    nex = ancestors["nex"]
    assert nex["type"] == "machine-learning-model" and nex["licenses"][0]["license"]["id"] == "Apache-2.0"
    ap = {p["name"]: p["value"] for p in nex["properties"]}
    assert ap["modeltrace:relation"] == "merge-parent" and abs(float(ap["modeltrace:weight"]) - 0.6) < 0.01
    assert ap["modeltrace:declared_in_card"] == "false" and ap["modeltrace:card:base_model"] == "org/base_a"
    assert "merge_method: linear" in model["pedigree"]["notes"]
    card = model["modelCard"]
    cprops = {p["name"]: p["value"] for p in card["properties"]}
    assert cprops["hf:license"] == "mit" and cprops["modeltrace:parameters"] == "217664"
    assert card["modelParameters"]["modelArchitecture"]
    # the validator really checks modelCard: a field the schema does not know makes the document invalid
    card["modelParameters"]["bogus"] = 1
    assert cdx_errors(json.dumps(doc)) is not None


def test_spdx3_ai_document_round_trips(rio_report):
    from spdx_python_model import v3_0_1 as spdx

    text = formats.render(rio_report, "spdx")
    doc = json.loads(text)
    assert doc["@context"] == "https://spdx.org/rdf/3.0.1/spdx-context.jsonld"
    objs = spdx.SHACLObjectSet()
    spdx.JSONLDDeserializer().read(__import__("io").StringIO(text), objs)
    pkgs = {p.name: p for p in objs.foreach_type(spdx.ai_AIPackage)}
    assert set(pkgs) == {"rio", "nex", "qwen"}
    rio = pkgs["rio"]
    assert rio.verifiedUsing[0].hashValue and "merge" in rio.ai_informationAboutTraining
    hyper = {e.key: e.value for e in rio.ai_hyperparameter}
    assert abs(float(hyper["merge_weight:nex"]) - 0.6) < 0.01
    rels = list(objs.foreach_type(spdx.Relationship))
    ancestor_of = [r for r in rels if r.relationshipType == spdx.RelationshipType.ancestorOf]
    assert {r.from_.name for r in ancestor_of} == {"nex", "qwen"} and all(r.to[0] is rio for r in ancestor_of)
    licences = {r.from_.name: r.to[0].simplelicensing_licenseExpression for r in rels
                if r.relationshipType == spdx.RelationshipType.hasDeclaredLicense}
    assert licences == {"rio": "MIT", "nex": "Apache-2.0", "qwen": "Apache-2.0"}


def test_markdown_and_stack(rio_report, stack_report):
    md = formats.render(rio_report, "md")
    assert md.startswith("# modeltrace audit report")
    assert "60% nex and 40% qwen" in md and "undisclosed-merge" in md and "| nex | merge-parent | apache-2.0" in md
    md = formats.render(stack_report, "md")
    assert "### Layer map" in md and "| 2 | base_b | 2 |" in md


def test_cli_formats_output_and_json_alias(rio_models, tmp_path):
    rio, nex, qwen = (str(rio_models[k]) for k in ("rio", "nex", "qwen"))
    a = cli("audit", rio, "-c", nex, "-c", qwen, "--json")
    b = cli("audit", rio, "-c", nex, "-c", qwen, "--format", "json")
    assert a.exit_code == b.exit_code == 0
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    for d in (da, db):
        d.pop("created")
        for s in d["subjects"]:
            s["audit"].pop("elapsed_s")
            s["evidence"].pop("hash_seconds")
    assert da == db
    out = tmp_path / "rio.cdx.json"
    r = cli("audit", rio, "-c", nex, "-c", qwen, "-o", out)
    assert r.exit_code == 0 and "wrote cyclonedx report" in r.stderr and "MERGE" in r.stdout
    assert cdx_errors(out.read_text()) is None
    # render: one saved JSON report into every other format, no model read again
    saved = tmp_path / "rio.json"
    saved.write_text(a.stdout)
    for name in ("report.md", "report.html", "report.spdx.json", "again.json"):
        r = cli("render", saved, "-o", tmp_path / name)
        assert r.exit_code == 0, r.stderr
    assert parse_report((tmp_path / "again.json").read_text()).subjects[0].name == "rio"


@pytest.mark.parametrize("args, words", [
    (["--format", "pdf"], "unknown report format 'pdf'"),
    (["--json", "--format", "md"], "--json and --format md contradict"),
    (["-o", "{tmp}/report.txt"], "cannot tell the report format"),
    (["-o", "{tmp}/no/such/dir/r.json"], "does not exist"),
])
def test_bad_format_options_are_one_line(rio_models, tmp_path, args, words):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = cli("inspect", rio_models["nex"], *args)
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inspect_report(rio_models):
    r = cli("inspect", rio_models["nex"], "-f", "json")
    d = json.loads(r.stdout)
    s = d["subjects"][0]
    assert d["command"] == "inspect" and s["description"]["parameters"] == 217664
    assert s["card"]["license"] == "apache-2.0" and s["evidence"]["sources"][0]["files"]
    assert cdx_errors(cli("inspect", rio_models["nex"], "-f", "cyclonedx").stdout) is None
