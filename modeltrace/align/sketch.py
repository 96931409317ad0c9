"""Sketches of one model's tensors in the suspect's residual coordinates (a candidate's through its residual map and
folded gains), whatever way round a family stores them.

Data flow: align/units.py and align/residual.py ask for a matrix's units at a sample of suspect residual coordinates
(`Sketcher.cols` for a reader, `Sketcher.rows` for a writer); which stored axis is the residual stream comes from the
family's role semantics (align/roles.py), so GPT-2's Conv1D [in, out] layout is read like nn.Linear's. Memory: a
reader stored [units, residual] is streamed in `chunk_bytes` blocks and only units x k values are kept; a part with
the residual along rows is gathered at k rows, or held whole under a rotation (the one exception, as in
align/transform.py).
"""

from __future__ import annotations

import numpy as np

from modeltrace.align.core import ResidualMap
from modeltrace.align.layers import sample_row_ids
from modeltrace.align.roles import roles_of
from modeltrace.align.transform import gather
from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot

__all__ = ["RES_SAMPLE", "RES_SAMPLE_WIDE", "TOKEN_SAMPLE", "WIDE_LAYER", "Sketcher", "res_coords"]

#: Residual coordinates sampled for unit features (rows of output-side, columns of input-side matrices); layers
#: with more units than `WIDE_LAYER` use `RES_SAMPLE_WIDE` (the n^2 k similarity product is the alignment's cost).
RES_SAMPLE, RES_SAMPLE_WIDE, WIDE_LAYER = 128, 64, 8192
#: Token rows of the embeddings sampled for the residual alignment.
TOKEN_SAMPLE = 2048


def res_coords(h: int, k: int = RES_SAMPLE) -> np.ndarray:
    return sample_row_ids(h, 0x5EED, k) if h > k else np.arange(h)


class Sketcher:
    """Sketches of one model's tensors in the suspect's residual coordinates (a candidate through its map)."""

    def __init__(self, view: ModelView, res: ResidualMap | None = None, gains: dict[Slot, np.ndarray] | None = None,
                 chunk_bytes: int = 4 << 20) -> None:
        self.view, self.res, self.gains = view, res or ResidualMap(), gains or {}
        self.chunk = chunk_bytes
        self.roles = roles_of(view.family)

    def has(self, slot: Slot) -> bool:
        return slot in self.view.parts

    def gain(self, slot: Slot) -> np.ndarray | None:
        g = self.roles.gain_slot(slot)
        return None if g is None else self.gains.get(g)

    def _streamed(self, slot: Slot, coords: np.ndarray, gain: np.ndarray | None) -> np.ndarray:
        """Every stored row of a part whose columns are the residual stream, at suspect coordinates: rows x k."""
        part = self.view.parts[slot]
        per = max(1, self.chunk // max(1, part.cols * 4))
        out = [self.res.cols(self.view.read(slot, a, a + per), coords, gain) for a in range(0, part.rows, per)]
        return np.concatenate(out) if out else np.zeros((0, len(coords)), np.float32)

    def _at_rows(self, slot: Slot, coords: np.ndarray, gain: np.ndarray | None) -> np.ndarray:
        """A part whose rows are the residual stream, at suspect residual rows `coords`: k x cols."""
        if self.res.rot is not None:
            return self.res.rows(self.view.read(slot), coords, gain)
        idx = np.asarray(coords if self.res.perm is None else self.res.perm[coords])
        x = gather(self.view, slot, idx)
        return x if gain is None else (x * gain[idx][:, None]).astype(np.float32)

    def cols(self, slot: Slot, coords: np.ndarray) -> np.ndarray:
        """A residual reader's units (rows of an nn.Linear) at suspect residual coordinates `coords`: units x k,
        its input gain folded in where gains are."""
        g = self.gain(slot)
        if self.roles.residual_axis(slot.role) == 0:  # stored [residual, units] (Conv1D)
            return np.ascontiguousarray(self._at_rows(slot, coords, g).T)
        return self._streamed(slot, coords, g)

    def rows(self, slot: Slot, coords: np.ndarray) -> np.ndarray:
        """A residual writer at suspect residual rows `coords`: k x units (cheap unless the residual is rotated or
        the part is stored [units, residual])."""
        if self.roles.residual_axis(slot.role) == 1:  # stored [units, residual] (Conv1D)
            return np.ascontiguousarray(self._streamed(slot, coords, None).T)
        return self._at_rows(slot, coords, None)

    def token_rows(self, slot: Slot, tokens: np.ndarray) -> np.ndarray:
        return gather(self.view, slot, tokens)
