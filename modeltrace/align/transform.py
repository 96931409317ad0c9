"""Reading a candidate tensor in the suspect's coordinates: row gathers, column permutations, folded gains and
residual rotations, applied chunk by chunk so the streaming Gram fits see aligned values.

A `SlotTransform` says, for one suspect slot, which candidate slot it compares with and how that candidate's
rows and columns map onto the suspect's. Permutations cost a gather; a rotation of the residual stream along rows
(o_proj, down_proj) needs every row of the candidate tensor, so such a tensor is held whole while it is compared
(the one exception to chunk-bounded memory, and only under a rotation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modeltrace.align.core import ResidualMap
from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot

__all__ = ["GAP", "WHOLE_BYTES", "AlignedReader", "ResidualMap", "SlotTransform", "gather", "gather_spans"]

#: Row indices closer than this are read as one span (fewer, larger reads for locally shuffled rows).
GAP = 8
#: Candidate tensors up to this many float32 bytes are read whole once per slot and gathered in memory.
WHOLE_BYTES = 8 * 1024 * 1024


@dataclass
class SlotTransform:
    """Candidate slot and index maps for one suspect slot (None = identity along that axis)."""

    slot: Slot
    rows: np.ndarray | None = None  # candidate row per suspect row
    cols: np.ndarray | None = None  # candidate column per suspect column
    col_scale: np.ndarray | None = None  # multiplies candidate columns (candidate order), e.g. a folded norm gain
    col_mat: np.ndarray | None = None  # (candidate cols x suspect cols): rotated residual along columns
    row_mat: np.ndarray | None = None  # (suspect rows x candidate rows): rotated residual along rows
    selected: bool = False  # some map here was chosen by matching: correlations on it are not a valid null

    def shape(self, view: ModelView) -> tuple[int, int]:
        p = view.parts[self.slot]
        rows = len(self.rows) if self.rows is not None else (self.row_mat.shape[0] if self.row_mat is not None
                                                             else p.rows)
        cols = len(self.cols) if self.cols is not None else (self.col_mat.shape[1] if self.col_mat is not None
                                                             else p.cols)
        return rows, cols

    @property
    def identity(self) -> bool:
        return all(x is None for x in (self.rows, self.cols, self.col_scale, self.col_mat, self.row_mat))


def gather_spans(idx: np.ndarray) -> list[tuple[int, int]]:
    """The row spans [lo, hi) `gather` reads for rows `idx` (so a caller can announce exactly those reads)."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == 0:
        return []
    s = np.sort(idx)
    breaks: np.ndarray = np.nonzero(np.diff(s) > GAP)[0] + 1
    return [(int(g[0]), int(g[-1]) + 1) for g in np.split(s, breaks)]


def gather(view: ModelView, slot: Slot, idx: np.ndarray, whole: np.ndarray | None = None) -> np.ndarray:
    """Rows `idx` (any order, repeats allowed) of a part, read as few contiguous spans as the order allows."""
    idx = np.asarray(idx, dtype=np.int64)
    cols = view.parts[slot].cols
    if len(idx) == 0:
        return np.zeros((0, cols), dtype=np.float32)
    if whole is not None:
        return whole[idx]
    if idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
        return view.read(slot, int(idx[0]), int(idx[-1]) + 1)
    order = np.argsort(idx, kind="stable")
    s = idx[order]
    out: np.ndarray = np.empty((len(idx), cols), dtype=np.float32)
    start = 0
    for lo, hi in gather_spans(s):
        block = view.read(slot, lo, hi)
        n = int(np.searchsorted(s, hi - 1, side="right")) - start
        g = np.arange(start, start + n)
        out[order[g]] = block[s[g] - lo]
        start += n
    return out


class AlignedReader:
    """Reads suspect-row ranges of one candidate slot through a transform; small tensors are read once."""

    def __init__(self, view: ModelView, tf: SlotTransform) -> None:
        self.view, self.tf = view, tf
        part = view.parts[tf.slot]
        self._whole: np.ndarray | None = None
        if tf.row_mat is not None or (not tf.identity and part.numel * 4 <= WHOLE_BYTES):
            self._whole = view.read(tf.slot)

    def read(self, a: int, b: int, srows: np.ndarray | None = None) -> np.ndarray:
        """Rows [a, b) of the suspect (or positions [a, b) of `srows`, the suspect rows compared) in suspect
        coordinates."""
        tf = self.tf
        sidx = np.arange(a, b) if srows is None else srows[a:b]
        if tf.row_mat is not None:
            assert self._whole is not None
            x = (tf.row_mat[sidx] @ self._whole).astype(np.float32)
        elif tf.rows is not None:
            x = gather(self.view, tf.slot, tf.rows[sidx], self._whole)
        elif self._whole is not None:
            x = self._whole[sidx]
        elif srows is None:
            x = self.view.read(tf.slot, a, b)
        else:
            x = gather(self.view, tf.slot, sidx)
        if tf.col_scale is not None:
            x = x * tf.col_scale[None, :]
        if tf.col_mat is not None:
            x = x @ tf.col_mat
        elif tf.cols is not None:
            x = x[:, tf.cols]
        return np.ascontiguousarray(x, dtype=np.float32)
