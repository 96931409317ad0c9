"""What a comparison covers, in words: layer ranges, why suspect tensors were not compared, stack summaries.

Data flow: canonical slots of the suspect and a candidate (align/view.py) and the audit's lists of slots without a
counterpart -> short sentences: "layers 6-11 missing in candidate X (it has 6 layers)", "X has no pooler tensor",
"no same-shape counterpart" only for tensors whose counterpart exists with another shape; the reason no tensor at
all could be compared (an architecture mismatch only when the families differ); "layers 0-3 from A (0-3), 4-7 from
B (2-5)" for a layer stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot

__all__ = ["no_overlap_message", "runs", "skip_warnings", "span", "stack_summary"]


def span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def runs(values: Iterable[int]) -> str:
    """Sorted integers as ranges: [0, 1, 2, 3, 6, 8, 9] -> '0-3, 6, 8-9'."""
    vals = sorted(set(values))
    out: list[str] = []
    start = prev = None
    for v in vals:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(span(start, prev))
            start = prev = v
    if start is not None:
        out.append(span(start, prev))
    return ", ".join(out)


def stack_summary(smap: Sequence[tuple[int, int, int]], names: Mapping[int, str]) -> str:
    """(suspect layer, candidate index, candidate layer) triples -> 'layers 0-3 from A (0-3), 4-7 from B (2-5)'.
    `names` maps candidate index + 1 (the view index) to its label."""
    pieces: list[str] = []
    start = 0
    for k in range(1, len(smap) + 1):
        if k == len(smap) or smap[k][1] != smap[start][1] or smap[k][2] != smap[k - 1][2] + 1 \
                or smap[k][0] != smap[k - 1][0] + 1:
            s0, c, j0 = smap[start]
            s1, _, j1 = smap[k - 1]
            pieces.append(f"{span(s0, s1)} from {names[c + 1]} ({span(j0, j1)})")
            start = k
    if not pieces:
        return ""
    word = "layers" if len(smap) > 1 else "layer"
    return f"{word} " + ", ".join(pieces)


def _layers(view: ModelView) -> set[int]:
    return {s.layer for s in view.parts if s.layer >= 0}


def skip_warnings(suspect: ModelView, cand: ModelView, missing: Sequence[Slot], misshapen: Sequence[Slot]
                  ) -> list[str]:
    """Why suspect tensors were not compared with `cand`: its layers are missing, it lacks the role, or the shapes
    differ (each said only of the tensors it applies to)."""
    out: list[str] = []
    have = _layers(cand)
    no_layer = [s for s in missing if s.layer >= 0 and s.layer not in have]
    no_role = [s for s in missing if not (s.layer >= 0 and s.layer not in have)]
    if no_layer:
        gone = sorted({s.layer for s in no_layer})
        word = "layers" if len(gone) > 1 else "layer"
        out.append(f"{word} {runs(gone)} missing in candidate {cand.label} (it has {len(have)} layers): "
                   f"{len(no_layer)} suspect tensors not compared with it")
    if no_role:
        roles = sorted({s.role for s in no_role})
        shown = ", ".join(roles[:6]) + (f" and {len(roles) - 6} more" if len(roles) > 6 else "")
        out.append(f"{cand.label} has no {shown} tensor{'s' if len(roles) > 1 else ''}: "
                   f"{len(no_role)} suspect tensors not compared with it")
    if misshapen:
        out.append(f"{cand.label}: {len(misshapen)} suspect tensors have a counterpart of another shape; "
                   "compared the rest")
    return out


def no_overlap_message(suspect: ModelView, cands: Sequence[ModelView]) -> str:
    """Why not one suspect tensor could be compared with any candidate, in one line."""
    if not suspect.parts:
        return (f"{suspect.label}: no tensor has a canonical role ({len(suspect.unknown)} unrecognised, e.g. "
                f"{', '.join(sorted(suspect.unknown)[:3]) or 'none'}); nothing to compare")
    reasons: list[str] = []
    for c in cands:
        if not c.parts:
            reasons.append(f"{c.label}: no tensor has a canonical role ({len(c.unknown)} unrecognised)")
        elif c.family.name != suspect.family.name:
            reasons.append(f"{c.label} is a different architecture ({c.family.name} family; the suspect is "
                           f"{suspect.family.name})")
        elif not (set(c.parts) & set(suspect.parts)):
            reasons.append(f"{c.label} shares no tensor role with the suspect")
        else:
            reasons.append(f"{c.label} has the same roles in other shapes (a different size of the "
                           f"{c.family.name} family)")
    return "no tensor of the suspect could be compared with any candidate: " + "; ".join(reasons)
