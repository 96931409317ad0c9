"""What a worker found out about one uploaded revision (service/worker.py makes it; the store records it and
alerts.py turns a contradicted card into an outgoing webhook). A module of its own, so that neither of those imports
the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Analysis"]


@dataclass(frozen=True)
class Analysis:
    repo_id: str
    commit_sha: str
    spec: str
    index_name: str
    content_hash: str
    relation: str
    method: str | None
    summary: str
    contradicted: bool
    worst: str | None
    identify: dict[str, Any]
    report_json: str
    findings: list[dict[str, Any]]
