"""The report itself as JSON (schema: docs/report.schema.json); the input of `modeltrace verify` and `render`."""

from __future__ import annotations

from modeltrace.report.formats import ReportFormat
from modeltrace.report.model import Report


class JsonFormat(ReportFormat):
    name = "json"
    suffixes = (".json",)

    def render(self, report: Report) -> str:
        return report.to_json()
