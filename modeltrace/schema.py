"""The one schema version of every document modeltrace writes: the report, and the verdict, identify and inspect
documents inside it (and printed by `--json`).

MAJOR.MINOR: a reader accepts any minor version of its own major, written with or without the minor ("1" is what
verdicts, identify answers and inspect descriptions said before the versions were unified; it reads as "1.0"), and
refuses other majors.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "major", "readable"]

SCHEMA_VERSION = "1.0"


def major(version: object) -> int | None:
    """The major number of a version string ("1", "1.0", "1.3" -> 1), or None when it is not one."""
    head = str(version).split(".")[0]
    return int(head) if head.isdigit() else None


def readable(version: object) -> bool:
    """True when a document of this version can be read by this modeltrace (same major)."""
    return major(version) == major(SCHEMA_VERSION)
