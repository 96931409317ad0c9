"""`verify` re-derives every part of a report that follows from the evidence: a tampered report (findings emptied or
lowered, summary rewritten, per-layer weights, intervals or the recipe changed) fails with a message naming the
field, and an untouched one passes."""

from __future__ import annotations

import copy
import json

import pytest
from report_helpers import cli


def _audit(doc):
    return doc["subjects"][0]["audit"]


def _detail(doc):
    return doc["subjects"][0]["detail"]


def _empty_findings(doc):
    doc["findings"] = []


def _lower_to_info(doc):
    for f in doc["findings"]:
        f["severity"] = "info"


def _drop_one(doc):
    doc["findings"] = [f for f in doc["findings"] if f["code"] != "license-changed"]


def _invent_one(doc):
    doc["findings"].append({"code": "license-missing", "severity": "medium", "category": "license",
                            "subject": "rio", "title": "No licence declared", "detail": "", "data": {}})


def _rewrite_summary(doc):
    _audit(doc)["summary"] = "rio is independent of every candidate."


def _layer_weight(doc):
    row = _audit(doc)["layers"][1]
    row["weights"]["nex"] = round(row["weights"]["nex"] + 0.3, 4)


def _parent_interval(doc):
    _audit(doc)["parents"][0]["interval"] = [0.1, 0.9]


def _detail_weight(doc):
    _detail(doc)["weights"][0]["points"][2]["weight"] += 0.05


def _detail_interval(doc):
    point = _detail(doc)["weights"][1]["points"][0]
    point["interval"] = [point["interval"][0] - 0.01, point["interval"][1] + 0.01]


def _recipe(doc):
    _audit(doc)["mergekit_yaml"] = _audit(doc)["mergekit_yaml"].replace("weight: 0.6", "weight: 0.5")


def _ancestor_licence(doc):
    doc["subjects"][0]["ancestors"][0]["license"] = "mit"


def _card(doc):
    doc["subjects"][0]["card"]["license"] = "apache-2.0"


CASES = [
    (_empty_findings, "findings", "findings differs from the evidence: the evidence gives undisclosed-merge (high: "
                                  "Undisclosed merge), which the report lacks"),
    (_lower_to_info, "findings", "undisclosed-merge: severity recorded info, re-derived high"),
    (_drop_one, "findings", "the evidence gives license-changed (high"),
    (_invent_one, "findings", "the report has license-missing (medium: No licence declared), which the evidence does "
                              "not give"),
    (_rewrite_summary, "audit.summary", "audit.summary: recorded 'rio is independent of every candidate.', "
                                        "re-derived 'rio ≈ 0.60·nex + 0.40·qwen"),
    (_layer_weight, "audit.layers", "audit.layers[1].weights.nex: recorded 0.9"),
    (_parent_interval, "audit.parents", "audit.parents[0].interval[0]: recorded 0.1000, re-derived 0.6"),
    (_detail_weight, "detail.weights", "detail.weights[0].points[2].weight: recorded 0.6"),
    (_detail_interval, "detail.weights", "detail.weights[1].points[0].interval[0]: recorded 0.3"),
    (_recipe, "audit.mergekit_yaml", "audit.mergekit_yaml: recorded 'merge_method: linear"),
    (_ancestor_licence, "ancestors", "ancestors[0].license: recorded 'mit', re-derived 'apache-2.0'"),
    (_card, "card", "card.license: recorded 'apache-2.0', re-derived 'mit'"),
]


@pytest.fixture(scope="module")
def checks_of(rio_report, tmp_path_factory):
    """verify --json of the report with one change applied: {field: message} of the checks that differ."""
    base = json.loads(rio_report.to_json())
    where = tmp_path_factory.mktemp("tampered")

    def run(change):
        doc = copy.deepcopy(base)
        if change is not None:
            change(doc)
        p = where / f"{getattr(change, '__name__', 'none')}.json"
        p.write_text(json.dumps(doc))
        r = cli("verify", p, "--json")
        out = json.loads(r.stdout)
        return r.exit_code, {c["what"]: c["message"] for c in out["checks"] if not c["ok"]}

    return run


def test_untouched_report_verifies(checks_of):
    code, bad = checks_of(None)
    assert (code, bad) == (0, {})


@pytest.mark.parametrize("change, field, message", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_tampered_report_fails_naming_the_field(checks_of, change, field, message):
    code, bad = checks_of(change)
    assert code == 1
    assert field in bad, bad
    assert message in bad[field], bad[field]
    assert set(bad) <= {field, "findings", "audit.summary", "weights", "relation"}  # nothing unrelated blamed


def test_text_output_names_each_difference(rio_report, tmp_path):
    doc = json.loads(rio_report.to_json())
    _lower_to_info(doc)
    _rewrite_summary(doc)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(doc))
    r = cli("verify", p)
    assert r.exit_code == 1
    diffs = [line for line in r.stdout.splitlines() if line.startswith("DIFF")]
    assert [d.split(":")[1].strip() for d in diffs] == ["findings", "audit.summary"], r.stdout
