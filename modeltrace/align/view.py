"""A model seen through canonical slots: the unit every comparison works in."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modeltrace.architectures import Family, Part, Slot, canonical_parts, detect_family
from modeltrace.describe import text_config
from modeltrace.sources import open_source
from modeltrace.sources.base import DEFAULT_CHUNK_BYTES, Source


@dataclass
class ModelView:
    label: str
    spec: str
    source: Source
    family: Family
    parts: dict[Slot, Part]
    config: dict
    unknown: list[str] = field(default_factory=list)

    #: rows are read whole and in stored order (a quantized tensor's sub-blocks intact: detectors/quant_cells.py)
    stored_rows = True

    @property
    def n_layers(self) -> int:
        layers = [s.layer for s in self.parts if s.layer >= 0]
        return max(layers) + 1 if layers else 0

    def read(self, slot: Slot, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a canonical part (relative to the part), float32 (rows, cols)."""
        p = self.parts[slot]
        stop = p.rows if stop is None else min(stop, p.rows)
        return self.source.read_rows(p.name, p.row_start + start, p.row_start + stop)

    def mapped(self, slot: Slot, start: int, stop: int) -> AbstractContextManager[np.ndarray | None]:
        """Stored bytes of rows [start, stop) of a canonical part, mapped without a copy (None if not mappable)."""
        p = self.parts[slot]
        stop = min(stop, p.rows)
        return self.source.mapped_rows(p.name, p.row_start + start, p.row_start + stop)

    def rows_per_chunk(self, slot: Slot, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
        return max(1, chunk_bytes // max(1, self.parts[slot].cols * 4))

    def dtype(self, slot: Slot) -> str:
        return self.source.tensors()[self.parts[slot].name].dtype

    def close(self) -> None:
        self.source.close()


def label_for(spec: str) -> str:
    text = spec.rstrip("/")
    if text.startswith("hf://"):
        return text[5:]
    path = Path(text)
    if path.name in ("model", "weights", "checkpoint") and path.parent.name:
        return path.parent.name
    return path.name or text


def open_view(spec: str, label: str | None = None, allow_pickle: bool = False) -> ModelView:
    src = open_source(spec, allow_pickle=allow_pickle)
    try:
        tensors = src.tensors()
        cfg = text_config(src.config())
        mt = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None
        fam = detect_family(list(tensors), mt)
        parts, unknown = canonical_parts(tensors, fam, cfg)
    except BaseException:
        src.close()
        raise
    return ModelView(label or label_for(spec), spec, src, fam, parts, cfg, unknown)
