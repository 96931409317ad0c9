"""Streaming sufficient statistics for one canonical slot across the suspect and its candidates.

Every recipe fit in the detectors is a function of these sums, so a tensor of any size is read once, chunk by chunk,
with memory bounded by the chunk and by O(models^2 x rows) per-row Gram entries (rows, not elements).

Index 0 is always the suspect; 1..k are the candidates; `base` (optional) is a candidate index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from modeltrace.detectors import kernels, quant_cells
from modeltrace.detectors.storage import (
    MANTISSA,
    PRECISION,
    is_block_quantized,
    is_lossy,
    quant_variance,
    round_to,
    rounding_variance,
    ulp_scale,
    widen,
)

#: log2|x| histogram bins for magnitude-vs-survival analysis of sparse merges (1/8 octave).
HIST_EDGES = np.arange(-48.0, 16.0001, 0.125)
NBINS = len(HIST_EDGES) - 1


#: A delta within the suspect's storage rounding plus this many ulps of c_i tau_i counts as parent i's lone survivor
#: (DELLA, SlotAccumulator._kept_by_all). Measured on the corpus DELLA merge: weights within 0.0003 for 4 to 16.
DELLA_TOL = 8


def _ratio_mode(r: np.ndarray) -> float:
    """The most common value of positive ratios, on a log2 grid of 0.005 (0 when there are none): where DELLA's
    lone survivors pile up."""
    r = r[np.isfinite(r) & (r > 0)]
    if r.size == 0:
        return 0.0
    h, e = np.histogram(np.log2(r), bins=2000, range=(-4.0, 6.0))
    i = int(h.argmax())
    return float(2.0 ** ((e[i] + e[i + 1]) / 2))


#: Quantile levels of |task vector| at which agreement Grams are kept (see SlotAccumulator._sparse).
TOP_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
OUTLIER_LEVEL = 0.99
#: Tensors up to this many elements get every statistic on every row.
DETAIL_ALL_BELOW = 1 << 20
#: Above it, the secondary statistics (centring sums, per-row Grams, rounding floor, sparsity histograms) use this
#: share of each chunk's rows; the Gram matrix and exact-equality counts always use every element.
DETAIL_FRACTION = 0.125


#: float32 dot products are exact enough (~1e-8 relative) over blocks of this many elements; longer sums drift.
DOT_BLOCK = 1 << 16


def sqdiff64(chunks: list[np.ndarray]) -> np.ndarray:
    """E[i, j] = sum (x_i - x_j)^2 of float32 chunks, differences and squares in float64 (both exact for float32
    inputs), so a residual read off E does not cancel: 0 for a copy, the rounding error for a recast."""
    n = len(chunks)
    flats = [np.ascontiguousarray(c, dtype=np.float32).reshape(-1) for c in chunks]
    e = np.zeros((n, n))
    if kernels.available():  # one compiled pass (the numpy loop below costs ~5x more)
        kernels.sqdiff_f32(tuple(flats), e)
        return e
    for k in range(0, flats[0].size, DOT_BLOCK):
        blk = [f[k:k + DOT_BLOCK].astype(np.float64) for f in flats]
        for i in range(n):
            for j in range(i + 1, n):
                d = blk[i] - blk[j]
                e[i, j] += float(d @ d)
    return e + e.T


#: Elements per slot kept for the rounding-aware weight fit (detectors.rounding): 64k resolve a weight to ~1e-4
#: where parents differ by a few ulps, and cost 64k x models x 4 bytes while the slot is open.
ROUNDING_SAMPLE = 1 << 16


def gram32(chunks: list[np.ndarray]) -> np.ndarray:
    """Gram matrix of float32 chunks with float64 accumulation across short float32 BLAS dots.

    Converting to float64 first costs a full extra pass (measured ~2x slower); one long float32 dot loses ~1e-5
    relative precision, too much to see bf16 rounding floors.
    """
    n = len(chunks)
    flats = [np.ascontiguousarray(c).reshape(-1) for c in chunks]
    m = flats[0].size
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    acc = [0.0] * len(pairs)
    for k in range(0, m, DOT_BLOCK):  # blocks outermost: each block stays in cache across its pairs
        blk = [f[k:k + DOT_BLOCK] for f in flats]
        for p, (i, j) in enumerate(pairs):
            acc[p] += float(np.dot(blk[i], blk[j]))
    g = np.zeros((n, n))
    for p, (i, j) in enumerate(pairs):
        g[i, j] = g[j, i] = acc[p]
    return g


@dataclass
class SlotAccumulator:
    n: int  # number of models (suspect + candidates)
    cols: int
    base: int | None = None
    suspect_dtype: str = "F32"
    sparse: bool = True
    total_rows: int = 0
    cand_dtypes: list[str] | None = None  # storage dtype of each candidate (lossy ones add to the residual floor)
    grid_cells: bool = True  # chunks are whole stored rows: a block-quantized suspect's grid cells can be read

    G: np.ndarray = field(init=False)
    rows: int = field(init=False, default=0)
    equal: np.ndarray = field(init=False)
    nonfinite: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = self.n
        self.G = np.zeros((n, n))
        self.E = np.zeros((n, n))
        self.Gd = np.zeros((n, n))
        self.RR = np.zeros((n, n))
        self.K = np.zeros((n, self.cols))
        self.detail_rows = 0
        self.noise_floor = 0.0
        # a suspect stored wider than bf16 whose every value is a bf16 value was rounded to bf16 before it was
        # re-encoded (a bf16 merge saved as fp16 or f32): its effective rounding floor is bf16's
        self._coarser = "BF16" if self.suspect_dtype in ("F16", "F32") else None
        self._off_grid = 0
        self.noise_floor_coarse = 0.0
        self.cand_noise = np.zeros(n)
        # candidates whose storage is coarser than the suspect's: their rounding is part of any residual against them
        # (quantized parents; or an fp16/bf16 copy of a float32 suspect)
        self._lossy = [i + 1 for i, d in enumerate(self.cand_dtypes or [])
                       if is_lossy(d) or PRECISION.get(d, 99) < PRECISION.get(self.suspect_dtype, 99)]
        self.equal = np.zeros(n, dtype=np.int64)
        # equal after rounding a wider candidate to the suspect's storage dtype (what a re-encoding leaves)
        self.requal = np.zeros(n, dtype=np.int64)
        self._narrower = [i + 1 for i, d in enumerate(self.cand_dtypes or [])
                          if PRECISION.get(d, -1) > PRECISION.get(self.suspect_dtype, 99)]
        self._sample: list[list[np.ndarray]] = [[] for _ in range(n)]
        self._sampled = 0
        # a block-quantized suspect: the grid cell of every sampled value, from its sub-block (quant_cells.py)
        self._cells: list[tuple[np.ndarray, np.ndarray]] | None = \
            [] if self.grid_cells and quant_cells.has_cells(self.suspect_dtype, self.cols) else None
        self.nonfinite = np.zeros(n, dtype=np.int64)
        self.zero_delta = self.active_all = self.zero_active_all = 0
        self.hist_kept = np.zeros((n, NBINS), dtype=np.int64)
        self.hist_dropped = np.zeros((n, NBINS), dtype=np.int64)
        self.hist_all = np.zeros((n, NBINS), dtype=np.int64)
        k = n - 2 if self.base is not None else 0
        self.G_agree = np.zeros((k + 1, k + 1))  # [delta, tau_1..tau_k] where all task vectors share a sign
        self.G_conflict = np.zeros((k + 1, k + 1))  # ... where they disagree (sign election acts only here)
        # ... where they agree and every |tau| is above its q-quantile, for each q in TOP_LEVELS (TIES keeps all
        # entries above 1 - density; the lowest such level gives the best-conditioned weight fit)
        self.G_top = np.zeros((len(TOP_LEVELS), k + 1, k + 1))
        self._qs: list[np.ndarray] | None = None
        # ... where parent i alone is in its top 1% (breadcrumbs drops exactly these outliers)
        self.G_outlier = np.zeros((k, k + 1, k + 1))
        # DELLA (two parents): where both task vectors agree and survived, i.e. the suspect's delta is neither
        # parent's rescaled task vector alone (see _kept_by_all); the rescale of each parent, from the first chunk
        self.G_kept = np.zeros((k + 1, k + 1))
        self._rescale: list[float] | None = None
        self.fraction = 1.0 if self.total_rows * self.cols <= DETAIL_ALL_BELOW else DETAIL_FRACTION

    def update(self, chunks: list[np.ndarray]) -> None:
        """Add one aligned chunk: the same rows of the same slot in every model, float32 (r, cols)."""
        r = chunks[0].shape[0]
        g = gram32(chunks)
        if not np.all(np.isfinite(np.diag(g))):
            for i, c in enumerate(chunks):
                bad = ~np.isfinite(c)
                if bad.any():
                    self.nonfinite[i] += int(bad.sum())
                    chunks[i] = np.where(bad, np.float32(0), c)
            g = gram32(chunks)
        self.G += g
        self.E += sqdiff64(chunks)
        s = chunks[0]
        for i in range(1, self.n):
            eq = int(np.count_nonzero(s == chunks[i]))
            self.equal[i] += eq
            rounded = round_to(chunks[i], self.suspect_dtype) if i in self._narrower else None
            self.requal[i] += eq if rounded is None else int(np.count_nonzero(s == rounded))
        self._keep_sample([np.ascontiguousarray(c) for c in chunks], r)
        self.rows += r
        rd = r if self.fraction >= 1 else max(1, int(np.ceil(r * self.fraction)))
        head = [c[:rd] for c in chunks]
        self._detail(head, g if rd == r else gram32(head))

    def update_raw(self, arrs: tuple[np.ndarray, ...], dtype: str, r: int) -> None:
        """Add one aligned chunk given as stored bytes (every model `dtype`, one of `kernels.RAW`, flat arrays of
        r x cols elements), through the fused kernel. Same statistics as `update`; chunks with NaN/Inf, and the
        sparsity statistics of the detail rows, go through the float32 path."""
        view, shift = kernels.RAW[dtype]
        arrs = tuple(a.view(view) for a in arrs)
        rd = r if self.fraction >= 1 else max(1, int(np.ceil(r * self.fraction)))
        mant = MANTISSA.get(self.suspect_dtype)
        g, gd, e, eq, rowsum, colsum, noise = kernels.chunk_stats(arrs, self.cols, rd, ulp_scale(mant))
        if not np.all(np.isfinite(np.diag(g))):
            self.update([widen(a, shift).reshape(r, self.cols) for a in arrs])
            return
        self.G += g
        self.E += e
        self.equal += eq
        self.requal += eq  # the kernel runs only when every model stores the slot in one dtype
        self._keep_sample(arrs, r, lambda a: widen(a, shift))
        self.rows += r
        self.Gd += gd
        self.RR += rowsum @ rowsum.T
        self.K += colsum
        self.detail_rows += rd
        self.noise_floor += noise
        if self.base is not None and self.sparse:
            self._sparse([widen(a[:rd * self.cols], shift).reshape(rd, self.cols) for a in arrs])

    def _sample_size(self, r: int) -> int:
        """Elements to keep from a chunk of r rows: a share of ROUNDING_SAMPLE proportional to its rows."""
        left = ROUNDING_SAMPLE - self._sampled
        if left <= 0:
            return 0
        total = max(self.total_rows, r)
        return int(min(left, max(1, -(-ROUNDING_SAMPLE * r // total)), r * self.cols))

    def _keep_sample(self, flats: list[np.ndarray] | tuple[np.ndarray, ...], r: int,
                     decode: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """Keep a strided share of one chunk's elements (flat arrays of r x cols, suspect first; `decode` turns
        stored bytes into float32)."""
        want = self._sample_size(r)
        if want:
            step = max(1, (r * self.cols) // want)
            picked = [f.reshape(-1)[::step][:want] for f in flats]
            if self._cells is not None and decode is None:
                self._cells.append(quant_cells.sample_cells(flats[0], np.arange(len(picked[0])) * step,
                                                            self.suspect_dtype))
            self._keep([decode(x) for x in picked] if decode else picked)

    def _keep(self, flats: list[np.ndarray]) -> None:
        for i, f in enumerate(flats):
            self._sample[i].append(np.array(f, dtype=np.float32))
        self._sampled += flats[0].size

    def _detail(self, head: list[np.ndarray], g: np.ndarray) -> None:
        """Secondary statistics on the first rows of a chunk (float32 (rd, cols) per model) and their Gram."""
        self.Gd += g
        rs = np.stack([h.sum(axis=1, dtype=np.float64) for h in head])
        self.RR += rs @ rs.T
        self.K += np.stack([h.sum(axis=0, dtype=np.float64) for h in head])
        self.detail_rows += head[0].shape[0]
        self.noise_floor += rounding_variance(head[0], self.suspect_dtype)
        if self._coarser is not None and not self._off_grid:
            self._off_grid += int(np.count_nonzero(round_to(head[0], self._coarser) != head[0]))
            self.noise_floor_coarse += rounding_variance(head[0], self._coarser)
        for i in self._lossy:
            self.cand_noise[i] += rounding_variance(head[i], self.cand_dtypes[i - 1])  # type: ignore[index]
        if self.base is not None and self.sparse:
            self._sparse(head)

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
        if len(taus) >= 2:
            pos = np.zeros_like(zero)
            neg = np.zeros_like(zero)
            for t in taus:
                pos |= t > 0
                neg |= t < 0
            conflict = (pos & neg).ravel()
            v = np.stack([delta.ravel()] + [t.ravel() for t in taus]).astype(np.float64)
            vc = v[:, conflict]
            va = v[:, ~conflict]
            self.G_conflict += vc @ vc.T
            self.G_agree += va @ va.T
            if self._qs is None:  # quantile thresholds from the first chunk: a fixed, spread sample of the tensor
                self._qs = [np.quantile(np.abs(t), (*TOP_LEVELS, OUTLIER_LEVEL)) for t in taus]
            absd = [np.abs(t.ravel()) for t in taus]
            for li in range(len(TOP_LEVELS)):
                top = ~conflict
                for a, q in zip(absd, self._qs, strict=True):
                    top &= a >= q[li]
                vt = v[:, top]
                self.G_top[li] += vt @ vt.T
            for j, (a, q) in enumerate(zip(absd, self._qs, strict=True)):
                vo = v[:, a >= q[-1]]
                self.G_outlier[j] += vo @ vo.T
            if len(taus) == 2:
                kept = self._kept_by_all(v, ~conflict & active.ravel() & ~zero.ravel(), chunks[0].ravel())
                if kept is not None:
                    vk = v[:, kept]
                    self.G_kept += vk @ vk.T
        for i, t in zip(parents, taus, strict=True):
            nz = t != 0
            lg = np.log2(np.abs(t[nz]).astype(np.float64))
            z = zero[nz]
            self.hist_all[i] += np.histogram(lg, HIST_EDGES)[0]
            self.hist_dropped[i] += np.histogram(lg[z], HIST_EDGES)[0]
            self.hist_kept[i] += np.histogram(lg[~z], HIST_EDGES)[0]

    def _kept_by_all(self, v: np.ndarray, cand: np.ndarray, stored: np.ndarray) -> np.ndarray | None:
        """Among entries `cand` (both task vectors non-zero, same sign, suspect delta non-zero), those that neither
        parent explains alone. A DELLA merge (mergekit: magnitude-ranked random drops, survivors rescaled by one
        factor c_i per tensor, sign election, sum divided by the weights present) gives delta = c_i tau_i exactly
        where only parent i survived, and (w_1 c_1 tau_1 + w_2 c_2 tau_2) / (w_1 + w_2) where both did: the
        weights show only there. c_i is the mode of delta / tau_i (the lone survivors pile up on it), taken from the
        first chunk as the TOP_LEVELS quantiles are. `stored`: the suspect's values (its storage rounding)."""
        if not cand.any():
            return None
        # how far a lone survivor's delta may sit from c_i tau_i: the suspect's storage rounding (half an ulp of the
        # stored value, which for a small delta can exceed it) plus the merge's own rounding in that precision
        # (mergekit computes bf16 merges in bf16), DELLA_TOL ulps of c_i tau_i
        mant = MANTISSA.get(self.suspect_dtype, 23)
        ulp = np.ldexp(1.0, np.frexp(stored)[1] - 1 - mant)
        if self._rescale is None:
            # the mode only over entries whose ratio means something: deltas of a few ulps quantise it to 1, and
            # entries both parents changed alike pile up on sum(w) c
            clear = cand & (v[1] != v[2]) & (np.abs(v[1]) > DELLA_TOL * ulp) & (np.abs(v[2]) > DELLA_TOL * ulp)
            self._rescale = [_ratio_mode(v[0][clear] / v[j][clear]) for j in (1, 2)]  # tau_j != 0 there
        out = cand.copy()
        for j, c in zip((1, 2), self._rescale, strict=True):
            if c > 0:
                lone_tol = ulp + DELLA_TOL * 2.0**-mant * np.abs(c * v[j])
                out &= ~(np.abs(v[0] - c * v[j]) <= lone_tol)
        return out

    def finish(self) -> SlotStats:
        if self._coarser is not None and not self._off_grid and self.detail_rows and self.noise_floor_coarse > 0:
            self.noise_floor, self.suspect_dtype = self.noise_floor_coarse, self._coarser
        numel = self.rows * self.cols
        dn = self.detail_rows * self.cols
        T = self.K.sum(axis=1)
        if self.cols > 1 and self.detail_rows > 1:
            Gc = self.Gd - self.RR / self.cols - (self.K @ self.K.T) / self.detail_rows + np.outer(T, T) / dn
            dof = (self.detail_rows - 1) * (self.cols - 1)
        else:
            Gc = self.Gd - np.outer(T, T) / max(dn, 1)
            dof = max(dn - 1, 0)
        scale = numel / dn if dn else 1.0
        return SlotStats(self.n, self.rows, self.cols, numel, self.G, Gc, dof, self.equal, self.nonfinite,
                         self.noise_floor * scale, self.base, self.zero_delta, self.active_all, self.zero_active_all,
                         self.hist_kept, self.hist_dropped, self.hist_all, detail_numel=dn,
                         detail_noise_floor=self.noise_floor, Gd=self.Gd, G_agree=self.G_agree,
                         G_conflict=self.G_conflict, G_top=self.G_top, G_outlier=self.G_outlier,
                         cand_noise=self.cand_noise * scale, G_kept=self.G_kept, rescale=self._rescale,
                         E=self.E, requal=self.requal, suspect_dtype=self.suspect_dtype,
                         cand_dtypes=list(self.cand_dtypes or []),
                         sample=np.stack([np.concatenate(x) for x in self._sample]) if self._sampled else None,
                         cells=self._cell_bounds())

    def _cell_bounds(self) -> np.ndarray | None:
        """(2, m) cells of the sampled suspect values, when every sampled value has one."""
        if not self._cells or sum(len(c[0]) for c in self._cells) != self._sampled:
            return None
        return np.stack([np.concatenate([c[0] for c in self._cells]), np.concatenate([c[1] for c in self._cells])])


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
    detail_numel: int = 0
    detail_noise_floor: float = 0.0
    Gd: np.ndarray | None = None
    G_agree: np.ndarray | None = None
    G_conflict: np.ndarray | None = None
    G_top: np.ndarray | None = None
    G_outlier: np.ndarray | None = None
    cand_noise: np.ndarray | None = None  # expected squared storage error of each (lossy) candidate
    G_kept: np.ndarray | None = None  # [delta, tau_1, tau_2] where both parents survived a DELLA merge
    rescale: list[float] | None = None  # the mode of delta / tau_i per parent (DELLA's survivor rescale)
    E: np.ndarray | None = None  # E[i, j] = sum (x_i - x_j)^2, exact (see sqdiff64)
    requal: np.ndarray | None = None  # elements equal to the suspect's once a wider candidate is rounded to its dtype
    suspect_dtype: str = "F32"
    cand_dtypes: list[str] = field(default_factory=list)
    sample: np.ndarray | None = None  # (models, m) float32: spread sample, suspect first (dropped once fitted)
    cells: np.ndarray | None = None  # (2, m): lo, hi of the suspect's sampled values in a block-quantized grid

    def sqdist(self) -> np.ndarray:
        """Squared distances between models: E when streamed, else from the Gram (which may cancel)."""
        if self.E is not None:
            return self.E
        d = np.diag(self.G)
        return np.maximum(d[:, None] + d[None, :] - 2 * self.G, 0.0)

    def corr(self, i: int, j: int = 0) -> float:
        d = self.Gc[i, i] * self.Gc[j, j]
        return float(self.Gc[i, j] / np.sqrt(d)) if d > 0 else 0.0


def storage_is_low_precision(dtype: str) -> bool:
    return dtype in ("BF16", "F16", "F8_E4M3", "F8_E5M2")


__all__ = ["SlotAccumulator", "SlotStats", "rounding_variance", "quant_variance", "is_lossy", "is_block_quantized"]
