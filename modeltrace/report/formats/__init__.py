"""Output formats: one module per format, each a `ReportFormat` that turns a `Report` into text.

Adding a format is one module with a `ReportFormat` subclass plus a line in FORMATS; modules are imported only when
their format is asked for (CycloneDX and SPDX pull in their libraries). Every rendered document goes through
modeltrace.redact before it is printed or written: no credential reaches a report, whatever field carried it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from modeltrace.errors import InputError
from modeltrace.redact import scrub

if TYPE_CHECKING:  # flags are checked (format_for) before any report exists: no pydantic for that
    from modeltrace.report.model import Report


class ReportFormat(ABC):
    #: the --format value
    name: str
    #: file suffixes that select this format for --output when --format is not given (longest match wins)
    suffixes: tuple[str, ...] = ()

    @abstractmethod
    def render(self, report: Report) -> str:
        """The whole document as text."""


#: --format value -> "module:class"
FORMATS = {
    "json": "modeltrace.report.formats.json:JsonFormat",
    "md": "modeltrace.report.formats.markdown:MarkdownFormat",
    "html": "modeltrace.report.formats.html:HtmlFormat",
    "cyclonedx": "modeltrace.report.formats.cyclonedx:CycloneDXFormat",
    "spdx": "modeltrace.report.formats.spdx:SpdxFormat",
}
SUFFIXES = {".cdx.json": "cyclonedx", ".spdx.json": "spdx", ".spdx3.json": "spdx", ".json": "json", ".md": "md",
            ".html": "html", ".htm": "html"}


def get_format(name: str) -> ReportFormat:
    target = FORMATS.get(name)
    if target is None:
        raise InputError(f"unknown report format {name!r}; choose one of {', '.join(FORMATS)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


def format_for(output: Path) -> str:
    """The format an --output file name implies, e.g. report.cdx.json -> cyclonedx."""
    name = output.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    raise InputError(f"{output}: cannot tell the report format from the file name; pass --format "
                     f"({', '.join(FORMATS)})")


def render(report: Report, fmt: str) -> str:
    return scrub(get_format(fmt).render(report)) or ""


def write(report: Report, fmt: str, output: Path) -> int:
    """Write the rendered report atomically; returns its size in bytes."""
    text = render(report, fmt)
    data = text.encode("utf-8")
    if output.parent and not output.parent.exists():
        raise InputError(f"{output}: folder {output.parent} does not exist")
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{output}: cannot write the report ({exc.strerror})") from None
    return len(data)
