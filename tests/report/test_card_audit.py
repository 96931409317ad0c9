"""Model-card audit: the card's disclosure and licence against what the weights show, and malformed cards."""

from __future__ import annotations

import pytest
from report_helpers import carded_copy, cli

from modeltrace.report.card_audit import ancestors_from, card_only, disclosure_findings, licence_findings
from modeltrace.report.model import Verdict


def codes(findings) -> dict[str, str]:
    return {f.code: f.severity for f in findings}


def test_rio_case_undisclosed_merge_licence_change_and_claim(rio_report):
    got = codes(rio_report.findings)
    assert got["undisclosed-merge"] == "high"
    assert got["claims-original"] == "high"
    assert got["license-changed"] == "high"  # MIT child of Apache-2.0 parents, no notice in the card
    f = next(f for f in rio_report.findings if f.code == "license-changed")
    assert "MIT" in f.detail.upper() and "apache-2.0" in f.detail
    anc = {a.model: a for a in rio_report.subjects[0].ancestors}
    assert anc["nex"].license == "apache-2.0" and anc["nex"].license_spdx == "Apache-2.0"
    assert anc["nex"].card_base_model == ["org/base_a"]
    assert abs(anc["nex"].weight - 0.6) < 0.01 and anc["nex"].relation == "merge-parent"
    # findings are ordered worst first
    ranks = ["critical", "high", "medium", "low", "info"]
    assert [ranks.index(f.severity) for f in rio_report.findings] == sorted(ranks.index(f.severity)
                                                                           for f in rio_report.findings)


MERGE = Verdict(suspect="rio", candidates=["org/nex", "org/qwen", "org/other"], relation="merge", method="linear",
                summary="", parents=[{"model": "org/nex", "weight": 0.6, "interval": [0.59, 0.61]},
                                     {"model": "org/qwen", "weight": 0.4, "interval": [0.39, 0.41]}],
                p_values={"org/nex": {"log10_p": -400, "p": 1e-300, "text": "p < 1e-300"},
                          "org/qwen": {"log10_p": -300, "p": 1e-300, "text": "p < 1e-300"},
                          "org/other": {"log10_p": -0.2, "p": 0.6, "text": "p = 0.6"}},
                sources={"org/nex": "hf://org/nex", "org/qwen": "hf://org/qwen", "org/other": "hf://org/other"})


def audit_card(card_text: str, verdict: Verdict = MERGE, licences: dict | None = None):
    card, body, found = card_only("rio", card_text)
    ancestors = ancestors_from(verdict)
    for a in ancestors:
        a.license = (licences or {}).get(a.model, "apache-2.0")
        a.card_present = True
    found += disclosure_findings("rio", card, body, verdict, ancestors)
    found += licence_findings("rio", card, body, ancestors)
    return codes(found), found


def test_full_disclosure_is_clean():
    got, _ = audit_card("---\nlicense: apache-2.0\nbase_model: [org/nex, org/qwen]\nbase_model_relation: merge\n---\n")
    assert got == {}


def test_partial_attribution_wrong_relation_and_declared_base_not_found():
    got, found = audit_card("---\nlicense: apache-2.0\nbase_model: [org/nex, org/other, org/elsewhere]\n"
                            "base_model_relation: finetune\n---\n")
    assert got["missing-attribution"] == "medium"  # org/qwen is a parent the card does not name
    assert got["relation-mismatch"] == "medium"
    assert got["declared-base-not-found"] == "high"  # org/other was audited: independent
    assert got["declared-base-unchecked"] == "info"  # org/elsewhere was not among the candidates
    assert "undisclosed-merge" not in got
    assert any("p = 0.6" in f.detail for f in found if f.code == "declared-base-not-found")


def test_mentioned_in_text_only_lowers_severity():
    got, found = audit_card("---\nlicense: apache-2.0\n---\nA merge of nex and qwen.\n")
    assert got["undisclosed-merge"] == "medium"
    assert "model tree will not show it" in next(f.detail for f in found if f.code == "undisclosed-merge")


def test_copy_and_finetune_undisclosed():
    copy = Verdict.model_validate(MERGE.model_dump() | {
        "relation": "copy", "method": None, "parents": [{"model": "org/nex", "weight": 1.0, "interval": [1, 1]}]})
    got, _ = audit_card("---\nlicense: apache-2.0\n---\n", copy)
    assert got["undisclosed-copy"] == "critical"
    ft = Verdict.model_validate(MERGE.model_dump() | {
        "relation": "finetune", "method": None, "parents": [{"model": "org/nex", "weight": 1.0, "interval": [1, 1]}]})
    got, _ = audit_card("---\nlicense: apache-2.0\n---\n", ft)
    assert got["undisclosed-finetune"] == "high"
    got, _ = audit_card("---\nlicense: apache-2.0\nbase_model: org/nex\n---\n", ft)
    assert got == {}


@pytest.mark.parametrize("child, parent, severity", [
    ("mit", "apache-2.0", "high"),
    ("apache-2.0", "llama3.1", "critical"),  # restrictive terms bind derivatives
    ("mit", "cc-by-nc-4.0", "critical"),
    ("mit", "gpl-3.0", "critical"),
    ("Apache-2.0", "apache-2.0", None),  # case differences are the same licence
])
def test_licence_changes(child, parent, severity):
    got, _ = audit_card(f"---\nlicense: {child}\nbase_model: [org/nex, org/qwen]\nbase_model_relation: merge\n---\n",
                        licences={"org/nex": parent, "org/qwen": parent})
    assert got.get("license-changed") == severity


def test_licence_dropped_and_ancestor_unknown():
    got, _ = audit_card("---\nbase_model: [org/nex, org/qwen]\nbase_model_relation: merge\n---\n",
                        licences={"org/nex": "apache-2.0", "org/qwen": None})
    assert got["license-dropped"] == "high" and got["license-missing"] == "medium"
    assert got["ancestor-license-unknown"] == "info"


@pytest.mark.parametrize("text, code, severity, words", [
    (None, "card-missing", "low", "no README.md"),
    ("# just a readme\n", "card-no-front-matter", "low", "no YAML front matter"),
    ("---\nlicense: [mit\n---\n", "card-bad-yaml", "medium", "not valid YAML (line"),
    ("---\nlicense: mit\n", "card-bad-yaml", "medium", "not closed"),
    ("---\n- a\n- b\n---\n", "card-bad-yaml", "medium", "not a mapping"),
    ("---\nlicense: [mit, apache-2.0]\n---\n", "card-field-type", "medium", "license should be one identifier"),
    ("---\nlicense: mit\nbase_model_relation: [merge]\nbase_model: a/b\n---\n", "card-field-type", "medium",
     "base_model_relation should be one string"),
    ("---\nlicense: mit\nbase_model: {a: b}\n---\n", "card-field-type", "medium", "base_model should be"),
    ("---\nlicense: mit\ntags: llm\n---\n", "card-field-type", "medium", "tags should be a list"),
    ("---\nlicense: mit\nbase_model_relation: merged\nbase_model: a/b\n---\n", "card-field-value", "low",
     "'merged' is not one of"),
    ("---\nlicense: apache2\n---\n", "license-unknown-id", "low", "did you mean 'apache-2.0'"),
    ("---\nlicense: other\n---\n", "license-unspecified", "low", "without license_name"),
    ("---\ntags: [x]\n---\n", "license-missing", "medium", "no `license`"),
])
def test_malformed_cards_get_clear_findings(text, code, severity, words):
    _card, _body, found = card_only("m", text)
    hit = [f for f in found if f.code == code]
    assert hit, [f.code for f in found]
    assert hit[0].severity == severity and words in hit[0].detail and "\n" not in hit[0].detail


def test_fail_on_gates_and_exit_codes(rio_models, corpus, tmp_path):
    rio, nex, qwen = (str(rio_models[k]) for k in ("rio", "nex", "qwen"))
    r = cli("audit", rio, "-c", nex, "-c", qwen, "--fail-on", "undisclosed")
    assert r.exit_code == 1 and "undisclosed-merge" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("audit", rio, "-c", nex, "-c", qwen, "--fail-on", "license", "-f", "json")
    assert r.exit_code == 1 and '"license-changed"' in r.stdout
    # a properly disclosed merge passes both gates
    good = carded_copy(corpus, "m_linear_rio", tmp_path / "good",
                       "---\nlicense: apache-2.0\nbase_model: [nex, qwen]\nbase_model_relation: merge\n---\n")
    r = cli("audit", good, "-c", nex, "-c", qwen, "--fail-on", "undisclosed,license")
    assert r.exit_code == 0, r.stderr
    # an independent model with a clean card passes "any"
    indie = carded_copy(corpus, "indep_00", tmp_path / "indie", "---\nlicense: mit\n---\n")
    assert cli("audit", indie, "-c", nex, "--fail-on", "any").exit_code == 0
    r = cli("audit", rio, "-c", nex, "--fail-on", "everything")
    assert r.exit_code == 2 and r.stderr.strip().startswith("modeltrace: error: --fail-on 'everything'")
    # inspect: card-only findings gate too
    r = cli("inspect", rio_models["qwen"].parent / "rio", "--fail-on", "any")
    assert r.exit_code == 0  # MIT card without problems: nothing medium or above from the card alone
    broken = carded_copy(corpus, "ft_a1", tmp_path / "broken", "---\nlicense: [mit\n---\n")
    r = cli("inspect", broken, "--fail-on", "any")
    assert r.exit_code == 1 and "card-bad-yaml" in r.stderr
