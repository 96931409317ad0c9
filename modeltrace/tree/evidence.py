"""Pairwise evidence between indexed models, from their stored fingerprints: the numbers the family tree is built on.

Data flow: fingerprint (from the index) -> `Record` (the matrix samples the lineage fits use, flattened, with their
double-centred unit versions and storage-rounding floors) -> `Pair` for each candidate pair (chosen by summary-vector
cosine, as `identify` ranks): the independence statistic identify and the audit use (per-tensor double-centred
correlation, Fisher z, Stouffer; `compare` with its layer matching where layers moved), the per-tensor Gram entries
<a,a>, <a,b>, <b,b> that every recipe fit, distance and direction test needs, and which layers one model copies from
the other (stacks). Pairs are cached in the index (tree/cache.py), so a tree after one `index add` only computes the
new model's pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from modeltrace.detectors.storage import GGUF_QUANT, MANTISSA, ULP2, rounding_variance
from modeltrace.fingerprint.compare import COPY_CORR, MAX_GRAM_SLOTS, compare
from modeltrace.fingerprint.core import Fingerprint
from modeltrace.stats import stouffer

__all__ = ["Pair", "Record", "pair_evidence", "pair_evidence_many", "record", "storage_rank"]

#: GGUF block types are quantized storage: a copy in them is a quantized copy, never an ancestor of the original.
QUANT_PREFIXES = ("Q", "IQ", "TQ")
#: A quantized copy keeps at least this centred correlation with its original on every tensor (4-bit: ~0.995).
QUANT_COPY_CORR = 0.99
#: A layer copied whole has a scale within this of 1 (<a,b> / <b,b>).
COPY_SCALE_TOL = 0.02
#: v grew from u (training adds norm) when the median over tensors of r = (|v|^2 - |u|^2) / |v - u|^2, from a pair's
#: Gram entries, reaches this: a child is its parent plus a training delta independent of it (r = +1), the reverse
#: pair gives r = -1 and two siblings something in between (tree/family.py's directions, tree/merges.py's bases).
DIRECTED_R = 0.5


def is_quantized(dtype: str) -> bool:
    return dtype.upper().startswith(QUANT_PREFIXES)


def storage_rank(dtype: str) -> int:
    """How much a storage dtype can hold: higher holds more (the original of a group of copies is the richest)."""
    d = dtype.upper()
    if d in ("F64",):
        return 6
    if d in ("F32",):
        return 5
    if d in ("BF16", "F16"):
        return 4
    if d.startswith("F8"):
        return 3
    if is_quantized(d):
        digits = "".join(c for c in d.split("_")[0] if c.isdigit())
        return 2 if digits and int(digits) >= 8 else 1
    return 0


@dataclass
class Record:
    """The samples of one model the tree works on (not stored: rebuilt from the fingerprint when a pair needs it)."""

    content_hash: str
    keys: list[str]  # role:layer:expert:rows:cols:nrows:ncols of each matrix slot used
    layers: list[int]  # layer of each key (-1 outside the layers)
    offsets: np.ndarray  # start of each key's coordinates in `flat`
    flat: np.ndarray  # float32 samples, concatenated
    unit: np.ndarray  # float32 double-centred unit samples, concatenated
    dof: np.ndarray  # degrees of freedom of each key's correlation
    floors: np.ndarray  # expected squared storage rounding per key
    dtype: str  # dominant storage dtype
    grid: str  # the grid the values lie on: bf16 | f16 | f32 | quant
    n_layers: int
    self_grams: np.ndarray | None = None  # per key <x,x> in float64 (pair_evidence_many's; made on first use)


def _key(fp_slot) -> str:
    s = fp_slot.slot
    nr, nc = fp_slot.values.shape
    return f"{s.role}:{s.layer}:{s.expert}:{fp_slot.rows}:{fp_slot.cols}:{nr}:{nc}"


def _grid(values: np.ndarray) -> str:
    """The coarsest float grid that holds (almost) every value: "bf16", "f16" or "f32"."""
    v = values[np.isfinite(values)].astype(np.float32)
    if not v.size:
        return "f32"
    # a finite float32 survives bfloat16 and back exactly when its low 16 bits are zero (same exponent range)
    if np.mean((v.view(np.uint32) & 0xFFFF) == 0) >= 0.999:
        return "bf16"
    if np.mean(v.astype(np.float16).astype(np.float32) == v) >= 0.999:
        return "f16"
    return "f32"


def record(fp: Fingerprint) -> Record:
    """The matrix samples of `fp` (at most MAX_GRAM_SLOTS, spread over the model, as identify's Gram stage),
    centred in batches of one sample shape; stored as float32 (Grams are summed in float64)."""
    items = [s for s in fp.slots.values() if not s.structured and s.values.size > 1]
    if len(items) > MAX_GRAM_SLOTS:
        items = [items[i] for i in np.linspace(0, len(items) - 1, MAX_GRAM_SLOTS).astype(int)]
    sizes = np.array([s.values.size for s in items], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else np.zeros(0, np.int64)
    unit: np.ndarray = np.empty(int(sizes.sum()), dtype=np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(items):
        by_shape.setdefault(s.values.shape, []).append(i)
    for shape, idx in by_shape.items():
        x = np.empty((len(idx), *shape))
        for k, i in enumerate(idx):
            x[k] = items[i].values
        if not np.isfinite(x).all():
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if shape[0] > 1 and shape[1] > 1:
            x -= x.mean(axis=2, keepdims=True)
            x -= x.mean(axis=1, keepdims=True)
        else:
            x -= x.mean(axis=(1, 2), keepdims=True)
        n = np.sqrt(np.einsum("sij,sij->s", x, x))
        x /= np.where(n > 0, n, 1.0)[:, None, None]
        for k, i in enumerate(idx):
            unit[offsets[i]:offsets[i] + sizes[i]] = x[k].ravel()
    dts: dict[str, int] = {}
    for s in items:
        dts[s.dtype] = dts.get(s.dtype, 0) + s.values.size
    flat = np.concatenate([s.values.ravel() for s in items]).astype(np.float32, copy=False) if items \
        else np.zeros(0, np.float32)
    flat_raw = flat
    if not np.isfinite(flat).all():
        flat = np.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    dtype = max(dts, key=lambda d: dts[d]) if dts else "?"
    layers = [s.slot.layer for s in items]
    return Record(fp.content_hash, [_key(s) for s in items], layers, offsets, flat,
                  unit,
                  np.array([(r - 1) * (c - 1) if r > 1 and c > 1 else r * c - 1
                            for r, c in (s.values.shape for s in items)], dtype=np.float64),
                  _floors(items, flat_raw, offsets), dtype,
                  "quant" if is_quantized(dtype) else _grid(flat[:65536]),
                  int(fp.model.get("layers") or (max(layers) + 1 if layers else 0)))


def _floors(items: list, flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """`rounding_variance` of each sample, the same numbers: for float dtypes the exponent fields of all samples
    come from one pass over `flat` (their float32 values, concatenated), each sample's histogram dotted with its
    dtype's ulp table as there; other dtypes as there."""
    e = (flat.view(np.uint32) >> 23) & 0xFF
    out = np.zeros(len(items))
    for i, s in enumerate(items):
        mant = MANTISSA.get(s.dtype)
        if s.dtype in GGUF_QUANT or mant is None:
            out[i] = rounding_variance(s.values, s.dtype)
        else:
            out[i] = float(np.bincount(e[offsets[i]:offsets[i] + s.values.size], minlength=256) @ ULP2[mant])
    return out


@dataclass
class Pair:
    """Evidence between models a and b (content hashes, a < b)."""

    a: str
    b: str
    log10_p: float  # one-sided p of "independent" (before correction for the number of pairs)
    z: float
    corr: float  # median centred correlation over shared tensors
    min_corr: float
    keys: list[str]  # shared tensors, in a's order
    gaa: np.ndarray  # per shared tensor: <a,a>, <a,b>, <b,b> on the shared coordinates
    gab: np.ndarray
    gbb: np.ndarray
    copies_ab: dict[int, int]  # layer of a -> layer of b it copies whole
    copies_ba: dict[int, int]
    equal: float = 0.0  # share of coordinates where a == b exactly (median over tensors)

    @property
    def copy(self) -> bool:
        """Every shared tensor is the same up to storage rounding (a copy, re-encoding or quantized copy)."""
        if not self.keys:
            return False
        scale = self.gab / np.maximum(self.gbb, 1e-300)
        return bool(self.min_corr >= COPY_CORR and np.all(np.abs(scale - 1) <= COPY_SCALE_TOL))

    def other(self, h: str) -> str:
        return self.b if h == self.a else self.a


def _segments(rec: Record, idx: list[int]) -> np.ndarray:
    sizes: np.ndarray = np.diff(np.append(rec.offsets, rec.flat.size))
    return np.concatenate([np.arange(rec.offsets[i], rec.offsets[i] + sizes[i]) for i in idx]) if idx \
        else np.zeros(0, np.int64)


def pair_evidence(ra: Record, rb: Record, load: Callable[[str], Fingerprint]) -> Pair:
    """Evidence between two records (order-free: the pair is stored with a < b); `load` gives a fingerprint by
    content hash when layers moved and identify's layer-matched comparison is needed."""
    if rb.content_hash < ra.content_hash:
        ra, rb = rb, ra
    if ra.keys == rb.keys:
        ia = list(range(len(ra.keys)))
        fa, fb, ua, ub, starts = ra.flat, rb.flat, ra.unit, rb.unit, ra.offsets
    else:
        pos = {k: i for i, k in enumerate(rb.keys)}
        ia = [i for i, k in enumerate(ra.keys) if k in pos]
        ib = [pos[ra.keys[i]] for i in ia]
        sa, sb = _segments(ra, ia), _segments(rb, ib)
        fa, fb, ua, ub = ra.flat[sa], rb.flat[sb], ra.unit[sa], rb.unit[sb]
        sizes: np.ndarray = np.diff(np.append(ra.offsets, ra.flat.size))[ia]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if ia else np.zeros(0, np.int64)
    if ia:
        fa, fb = fa.astype(np.float64), fb.astype(np.float64)
        gaa = np.add.reduceat(fa * fa, starts)
        gab = np.add.reduceat(fa * fb, starts)
        gbb = np.add.reduceat(fb * fb, starts)
        r = np.add.reduceat(ua.astype(np.float64) * ub, starts)
        # median over tensors, so whole copied layers (stacks, gradient SLERP ends) do not look like sparse merges
        equal = float(np.median(np.add.reduceat((fa == fb).astype(np.float64), starts)
                                / np.diff(np.append(starts, fa.size))))
    else:
        gaa = gab = gbb = r = np.zeros(0)
        equal = 0.0
    return _assemble(ra, rb, ia, gaa, gab, gbb, r, equal, load)


#: Pairs whose sample arrays are multiplied in one batch (rows of float64 products held at once: a few MB, so
#: they stay in cache; 64 was a third slower).
BATCH = 8


def pair_evidence_many(pairs: list[tuple[Record, Record]], load: Callable[[str], Fingerprint]) -> list[Pair]:
    """`pair_evidence` for many pairs at once, in order: pairs of records with the same tensors (one architecture)
    are computed BATCH at a time, their samples stacked into matrices so the per-tensor Gram entries, correlations
    and equal shares of all of them come from a few array operations; other pairs one by one."""
    out: list[Pair | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for i, (ra, rb) in enumerate(pairs):
        if ra.keys == rb.keys and ra.keys and ra.flat.size == rb.flat.size:
            groups.setdefault((tuple(ra.keys), ra.flat.size), []).append(i)
        else:
            out[i] = pair_evidence(ra, rb, load)
    for idx in groups.values():
        n = pairs[idx[0]][0].flat.size
        buf_a, buf_b = np.empty((BATCH, n)), np.empty((BATCH, n))  # reused: no fresh pages for every batch
        for start in range(0, len(idx), BATCH):
            chunk = idx[start:start + BATCH]
            ras = [min(pairs[i], key=lambda r: r.content_hash) for i in chunk]
            rbs = [max(pairs[i], key=lambda r: r.content_hash) for i in chunk]
            starts = ras[0].offsets
            fa, fb = _rows([r.flat for r in ras], buf_a), _rows([r.flat for r in rbs], buf_b)
            gaa, gbb = _self_grams(ras, fa, starts), _self_grams(rbs, fb, starts)  # each record's once
            same = fa == fb
            fa *= fb
            gab = np.add.reduceat(fa, starts, axis=1)
            sizes: np.ndarray = np.diff(np.append(starts, fa.shape[1]))
            # whole counts: exact in any order
            equal = np.median(np.add.reduceat(same, starts, axis=1, dtype=np.int64).astype(np.float64) / sizes,
                              axis=1)
            ua, ub = _rows([r.unit for r in ras], buf_a), _rows([r.unit for r in rbs], buf_b)
            ua *= ub
            r = np.add.reduceat(ua, starts, axis=1)
            ia = list(range(len(ras[0].keys)))
            for k, i in enumerate(chunk):
                out[i] = _assemble(ras[k], rbs[k], ia, gaa[k], gab[k], gbb[k], r[k], float(equal[k]), load)
    done = [p for p in out if p is not None]
    assert len(done) == len(out)  # each pair is computed alone or in its group's batch
    return done


def _rows(arrays: list[np.ndarray], buf: np.ndarray) -> np.ndarray:
    """float32 rows as one float64 matrix, written into (the first rows of) `buf`."""
    out = buf[:len(arrays)]
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def _self_grams(recs: list[Record], f: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per record and key <x,x> (rows of `f`), each record's computed once and kept on it: a record is in several
    pairs of its family."""
    for k, rec in enumerate(recs):
        if rec.self_grams is None:
            rec.self_grams = np.add.reduceat(f[k:k + 1] * f[k:k + 1], starts, axis=1)[0]
    return np.stack([rec.self_grams for rec in recs])  # type: ignore[misc]


def _log10_sf(z: float) -> float:
    """stats.log10_sf (scipy's norm.logsf is log_ndtr(-z)) without the distribution wrapper's per-call cost."""
    from scipy.special import log_ndtr

    return float(log_ndtr(-z) / math.log(10))


def _assemble(ra: Record, rb: Record, ia: list[int], gaa: np.ndarray, gab: np.ndarray, gbb: np.ndarray,
              r: np.ndarray, equal: float, load: Callable[[str], Fingerprint]) -> Pair:
    """The pair from its per-tensor sums: independence statistic (Fisher z per tensor, Stouffer; identify's
    layer-matched `compare` when layers moved) and the layers copied whole."""
    keys = [ra.keys[i] for i in ia]
    r = np.clip(r, -1.0, 1.0)
    if ia:
        dof = ra.dof[ia]
        zs = np.arctanh(np.clip(r, -0.999999999999, 0.999999999999)) * np.sqrt(np.maximum(dof - 3, 0))
        z_same = stouffer([float(v) for v in zs])  # fisher_z per tensor, as compare's same-layer statistic
    else:
        z_same = 0.0
    copies_ab, copies_ba = _same_place_copies(ra, ia, r, gab, gbb, gaa)
    z = z_same
    if ra.n_layers != rb.n_layers or (r.size and r.max() >= COPY_CORR and r.min() < 0.9) or not ia:
        fa_, fb_ = load(ra.content_hash), load(rb.content_hash)
        e = compare(fa_, fb_)  # layers moved (stacks): identify's layer-matched statistic and layer map
        z = max(z, e.z)
        for i, j in e.layer_map.items():
            copies_ab.setdefault(i, j)
        back = compare(fb_, fa_)
        for i, j in back.layer_map.items():
            copies_ba.setdefault(i, j)
    lp = min(0.0, _log10_sf(z) + math.log10(2)) if (ia or z) else 0.0
    return Pair(ra.content_hash, rb.content_hash, float(lp), float(z), float(np.median(r)) if r.size else 0.0,
                float(r.min()) if r.size else 0.0, keys, gaa, gab, gbb, copies_ab, copies_ba, equal)


def _same_place_copies(ra: Record, ia: list[int], r: np.ndarray, gab: np.ndarray, gbb: np.ndarray,
                       gaa: np.ndarray) -> tuple[dict[int, int], dict[int, int]]:
    """Layers whose every shared tensor is a copy (correlation >= COPY_CORR, scale 1) at the same position."""
    by_layer: dict[int, bool] = {}
    for pos, i in enumerate(ia):
        layer = ra.layers[i]
        if layer < 0:
            continue
        ok = r[pos] >= COPY_CORR and abs(gab[pos] / max(gbb[pos], 1e-300) - 1) <= COPY_SCALE_TOL \
            and abs(gab[pos] / max(gaa[pos], 1e-300) - 1) <= COPY_SCALE_TOL
        by_layer[layer] = by_layer.get(layer, True) and bool(ok)
    same = {layer: layer for layer, ok in by_layer.items() if ok}
    return dict(same), dict(same)
