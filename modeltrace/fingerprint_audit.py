"""The audit on fingerprints: the audit's layer map, slot fits and verdict run on fingerprint samples presented as
models (fingerprint/view.py). identify and the family tree use it to recover relation and recipe without the
weights. It sits beside the packages it joins (fingerprint and the audit), so neither imports the other's way back.
Memory: the fingerprints themselves (a few MB each).
"""

from __future__ import annotations

from modeltrace.fingerprint.core import Fingerprint
from modeltrace.fingerprint.view import fingerprint_views

__all__ = ["audit_fingerprints"]


def audit_fingerprints(suspect: Fingerprint, label: str, cands: list[Fingerprint], labels: list[str],
                       base: str | None, layers: bool = True) -> dict:
    """The audit's layer map, streaming slot fits and verdict, run on fingerprint samples (identify and the family
    tree use it). `layers=False` for fingerprints reduced to token rows (a residual stream re-based): no layer map."""
    from modeltrace.audit import run_views
    from modeltrace.verdict import decide

    views = fingerprint_views([suspect, *cands], [label, *labels])
    base_idx = labels.index(base) + 1 if base is not None else None
    kw: dict[str, list] = {} if layers else {"layer_matches": []}
    return decide(run_views(views, base_idx, **kw))  # type: ignore[arg-type]

