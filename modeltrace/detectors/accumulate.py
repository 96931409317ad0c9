"""Streaming sufficient statistics for one canonical slot across the suspect and its candidates.

Every recipe fit in the detectors is a function of these sums, so a tensor of any size is read once, chunk by chunk,
with memory bounded by the chunk and by O(models^2 x rows) per-row Gram entries (rows, not elements).

Index 0 is always the suspect; 1..k are the candidates; `base` (optional) is a candidate index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: log2|x| histogram bins for magnitude-vs-survival analysis of sparse merges (1/8 octave).
HIST_EDGES = np.arange(-48.0, 16.0001, 0.125)
NBINS = len(HIST_EDGES) - 1


def rounding_variance(x: np.ndarray, dtype: str) -> float:
    """Expected squared rounding error of storing float32 `x` in `dtype` (uniform error within half an ulp)."""
    mant = {"BF16": 7, "F16": 10, "F8_E4M3": 3, "F8_E5M2": 2}.get(dtype)
    if mant is None:
        return 0.0
    ax = np.abs(x[np.isfinite(x)])
    ax = ax[ax > 0]
    if ax.size == 0:
        return 0.0
    ulp = np.exp2(np.floor(np.log2(ax)) - mant)
    return float(np.sum(ulp.astype(np.float64) ** 2) / 12.0)


@dataclass
class SlotAccumulator:
    n: int  # number of models (suspect + candidates)
    cols: int
    block_rows: int  # rows per leading-axis block (slerp's unit); 1 for 2-D tensors
    base: int | None = None
    suspect_dtype: str = "F32"
    sparse: bool = True

    G: np.ndarray = field(init=False)
    RR: np.ndarray = field(init=False)
    K: np.ndarray = field(init=False)
    blocks: list[np.ndarray] = field(init=False)
    rows: int = field(init=False, default=0)
    equal: np.ndarray = field(init=False)
    nonfinite: np.ndarray = field(init=False)
    noise_floor: float = field(init=False, default=0.0)
    zero_delta: int = field(init=False, default=0)
    active_all: int = field(init=False, default=0)
    zero_active_all: int = field(init=False, default=0)
    hist_kept: np.ndarray = field(init=False)
    hist_dropped: np.ndarray = field(init=False)
    hist_all: np.ndarray = field(init=False)
    _carry: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        n = self.n
        self.G = np.zeros((n, n))
        self.RR = np.zeros((n, n))
        self.K = np.zeros((n, self.cols))
        self.blocks = []
        self.equal = np.zeros(n, dtype=np.int64)
        self.nonfinite = np.zeros(n, dtype=np.int64)
        self.hist_kept = np.zeros((n, NBINS), dtype=np.int64)
        self.hist_dropped = np.zeros((n, NBINS), dtype=np.int64)
        self.hist_all = np.zeros((n, NBINS), dtype=np.int64)

    def update(self, chunks: list[np.ndarray]) -> None:
        """Add one aligned chunk: the same rows of the same slot in every model, float32 (r, cols)."""
        r = chunks[0].shape[0]
        buf = np.empty((r, self.n, self.cols))
        for i, c in enumerate(chunks):
            bad = ~np.isfinite(c)
            nbad = int(bad.sum())
            if nbad:
                self.nonfinite[i] += nbad
                c = np.where(bad, np.float32(0), c)
                chunks[i] = c
            buf[:, i, :] = c
        row_gram = buf @ buf.transpose(0, 2, 1)  # (r, n, n), one BLAS pass over the chunk
        self.G += row_gram.sum(axis=0)
        rs = buf.sum(axis=2)
        self.RR += rs.T @ rs
        self.K += buf.sum(axis=0)
        self._add_blocks(row_gram)
        self.rows += r
        s = chunks[0]
        self.noise_floor += rounding_variance(s, self.suspect_dtype)
        for i in range(1, self.n):
            self.equal[i] += int(np.count_nonzero(s == chunks[i]))
        if self.base is not None and self.sparse:
            self._sparse(chunks)

    def _add_blocks(self, row_gram: np.ndarray) -> None:
        """Per leading-axis block Gram (rows of a 2-D tensor, experts of a stacked 3-D one)."""
        if self.block_rows == 1:
            self.blocks.append(row_gram)
            return
        if self._carry is not None:
            row_gram = np.concatenate([self._carry, row_gram])
            self._carry = None
        full = (row_gram.shape[0] // self.block_rows) * self.block_rows
        if full:
            self.blocks.append(row_gram[:full].reshape(-1, self.block_rows, self.n, self.n).sum(axis=1))
        if full < row_gram.shape[0]:
            self._carry = row_gram[full:]

    def _sparse(self, chunks: list[np.ndarray]) -> None:
        b = self.base
        assert b is not None
        m = chunks[b]
        delta = chunks[0] - m
        zero = delta == 0
        self.zero_delta += int(zero.sum())
        parents = [i for i in range(1, self.n) if i != b]
        if not parents:
            return
        taus = [chunks[i] - m for i in parents]
        active = np.ones_like(zero)
        for t in taus:
            active &= t != 0
        self.active_all += int(active.sum())
        self.zero_active_all += int((zero & active).sum())
        for i, t in zip(parents, taus, strict=True):
            nz = t != 0
            lg = np.log2(np.abs(t[nz]).astype(np.float64))
            z = zero[nz]
            self.hist_all[i] += np.histogram(lg, HIST_EDGES)[0]
            self.hist_dropped[i] += np.histogram(lg[z], HIST_EDGES)[0]
            self.hist_kept[i] += np.histogram(lg[~z], HIST_EDGES)[0]

    def finish(self) -> SlotStats:
        blocks = np.concatenate(self.blocks) if self.blocks else np.zeros((0, self.n, self.n))
        if self._carry is not None:
            blocks = np.concatenate([blocks, self._carry.sum(axis=0, keepdims=True)])
        numel = self.rows * self.cols
        T = self.K.sum(axis=1)
        if self.cols > 1 and self.rows > 1:
            Gc = self.G - self.RR / self.cols - (self.K @ self.K.T) / self.rows + np.outer(T, T) / numel
            dof = (self.rows - 1) * (self.cols - 1)
        else:
            Gc = self.G - np.outer(T, T) / max(numel, 1)
            dof = max(numel - 1, 0)
        return SlotStats(self.n, self.rows, self.cols, numel, self.G, Gc, dof, blocks, self.equal, self.nonfinite,
                         self.noise_floor, self.base, self.zero_delta, self.active_all, self.zero_active_all,
                         self.hist_kept, self.hist_dropped, self.hist_all)


@dataclass
class SlotStats:
    """Finished sums for one slot; everything a detector needs."""

    n: int
    rows: int
    cols: int
    numel: int
    G: np.ndarray  # raw Gram
    Gc: np.ndarray  # double-centred Gram
    dof: int  # degrees of freedom of the centred statistics
    blocks: np.ndarray  # (blocks, n, n) per leading-axis Gram
    equal: np.ndarray  # elements exactly equal to the suspect's, per model
    nonfinite: np.ndarray
    noise_floor: float  # expected squared rounding error of the suspect's storage dtype
    base: int | None
    zero_delta: int
    active_all: int
    zero_active_all: int
    hist_kept: np.ndarray
    hist_dropped: np.ndarray
    hist_all: np.ndarray

    def corr(self, i: int, j: int = 0) -> float:
        d = self.Gc[i, i] * self.Gc[j, j]
        return float(self.Gc[i, j] / np.sqrt(d)) if d > 0 else 0.0


def storage_is_low_precision(dtype: str) -> bool:
    return dtype in ("BF16", "F16", "F8_E4M3", "F8_E5M2")


__all__ = ["SlotAccumulator", "SlotStats", "rounding_variance"]
