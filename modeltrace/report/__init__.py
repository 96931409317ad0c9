"""Reports people act on: one versioned report model (model.py) rendered as JSON, Markdown, HTML, CycloneDX or SPDX
(formats/), a model-card audit (card_audit.py), an evidence bundle (evidence.py) and `verify` (verify.py).

The names below are imported on first use: a command that only checks its flags (report.gate) pays nothing."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Report", "SCHEMA_VERSION", "load_report"]

if TYPE_CHECKING:
    from modeltrace.report.model import SCHEMA_VERSION, Report, load_report


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("modeltrace.report.model"), name)
    raise AttributeError(f"module 'modeltrace.report' has no attribute {name!r}")
