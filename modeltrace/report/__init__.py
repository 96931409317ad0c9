"""Reports people act on: one versioned report model (model.py) rendered as JSON, Markdown, HTML, CycloneDX or SPDX
(formats/), a model-card audit (card_audit.py), an evidence bundle (evidence.py) and `verify` (verify.py)."""

from modeltrace.report.model import SCHEMA_VERSION, Report, load_report

__all__ = ["Report", "SCHEMA_VERSION", "load_report"]
