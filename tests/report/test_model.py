"""The report model: published schema is current, JSON round-trips, and every unreadable report gets one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from modeltrace.errors import InputError
from modeltrace.report.model import SCHEMA_VERSION, json_schema, load_report, parse_report, schema_text

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "report.schema.json"


def test_published_schema_is_current():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "docs/report.schema.json is stale: run `python -m modeltrace.report.schema`")


def test_report_round_trips_and_validates_against_published_schema(rio_report):
    text = rio_report.to_json()
    doc = json.loads(text)
    jsonschema.validate(doc, json_schema())
    assert doc["document"] == "modeltrace-report" and doc["schema_version"] == SCHEMA_VERSION
    again = parse_report(text)
    assert again.model_dump() == rio_report.model_dump()
    # fields the renderers do not know survive the round trip (the verdict grows independently)
    assert again.subjects[0].audit.model_extra.get("method_info")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version="0.3"), "older than this modeltrace"),
    (lambda d: d.update(schema_version="2.0"), "newer than this modeltrace"),
    (lambda d: d.update(schema_version="x"), "no valid schema_version"),
    (lambda d: d.pop("document"), "not a modeltrace report"),
    (lambda d: d["subjects"][0].update(name=None), "invalid report at subjects.0.name"),
])
def test_bad_reports_get_one_clear_line(rio_report, tmp_path, mutate, message):
    doc = json.loads(rio_report.to_json())
    mutate(doc)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=message) as exc:
        load_report(p)
    assert "\n" not in str(exc.value)


def test_bare_verdict_and_non_json(rio_report, tmp_path):
    bare = tmp_path / "verdict.json"
    bare.write_text(json.dumps(rio_report.subjects[0].audit.model_dump() | {"schema_version": "1"}))
    with pytest.raises(InputError, match="bare audit verdict .*re-run the audit with --format json"):
        load_report(bare)
    junk = tmp_path / "junk.json"
    junk.write_text("<html>")
    with pytest.raises(InputError, match="not a JSON report"):
        load_report(junk)
    with pytest.raises(InputError, match="no such report file"):
        load_report(tmp_path / "missing.json")
