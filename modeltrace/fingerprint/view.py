"""Fingerprints seen as models: the audit's layer map, slot fits and verdict run on them unchanged
(modeltrace/fingerprint_audit.py runs them; this package does not import the audit).

Each sampled tensor is presented as a small part (its sample's rows and columns) whose `numel` is the real tensor's,
so `is_structured` classifies it exactly as the audit classifies the full tensor. Only coordinates sampled
identically in every model are shown: a candidate part is kept when the suspect has the same role at the same tensor
shape, and columns are cut to the shortest sample of that shape in the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modeltrace.architectures import Part, Slot
from modeltrace.fingerprint.core import Fingerprint
from modeltrace.sources.base import ReadStats


@dataclass(frozen=True)
class SamplePart(Part):
    tensor_numel: int = 0

    @property
    def numel(self) -> int:  # the sampled tensor's size, not the sample's
        return self.tensor_numel


class _FingerprintSource:
    """The little of a Source the audit machinery asks for."""

    format = "fingerprint"
    can_map = False  # samples live in memory: the audit reads them, never maps stored bytes

    def __init__(self, location: str) -> None:
        self.location = location
        self.stats = ReadStats()

    def close(self) -> None:
        pass


class FingerprintView:
    """A ModelView over a fingerprint's samples (duck-typed: label, spec, parts, read, dtype, source, n_layers)."""

    #: samples keep a subset of columns: a quantized tensor's sub-blocks are not whole, so its grid cells are unknown
    stored_rows = False

    def __init__(self, fp: Fingerprint, label: str, keep: dict[Slot, int]) -> None:
        self.fp = fp
        self.label = label
        self.spec = fp.spec
        self.source = _FingerprintSource(str(fp.model.get("location") or fp.spec))
        self.config = {"model_type": fp.model.get("model_type")}
        self.parts: dict[Slot, Part] = {}
        self._values: dict[Slot, np.ndarray] = {}
        for slot, ncols in keep.items():
            s = fp.slots[slot]
            self._values[slot] = s.values[:, :ncols]
            self.parts[slot] = SamplePart(slot, slot.key, 0, s.values.shape[0], ncols, False, s.rows * s.cols)

    @property
    def n_layers(self) -> int:
        layers = [s.layer for s in self.parts if s.layer >= 0]
        return max(layers) + 1 if layers else 0

    def read(self, slot: Slot, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._values[slot][start:stop]

    def dtype(self, slot: Slot) -> str:
        return self.fp.slots[slot].dtype

    def close(self) -> None:
        pass


def fingerprint_views(fps: list[Fingerprint], labels: list[str]) -> list[FingerprintView]:
    """Views of a suspect (first) and its candidates restricted to coordinates they share."""
    s = fps[0]
    shapes = {(k.role, v.rows, v.cols) for k, v in s.slots.items()}
    width: dict[tuple[str, int, int], int] = {}
    for fp in fps:
        for k, v in fp.slots.items():
            key = (k.role, v.rows, v.cols)
            if key in shapes:
                width[key] = min(width.get(key, v.values.shape[1]), v.values.shape[1])
    views = []
    for fp, label in zip(fps, labels, strict=True):
        keep = {k: width[(k.role, v.rows, v.cols)] for k, v in fp.slots.items() if (k.role, v.rows, v.cols) in shapes}
        views.append(FingerprintView(fp, label, keep))
    return views
