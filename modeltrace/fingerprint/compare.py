"""Evidence between fingerprints: independence p-values per pair, and Gram matrices for recipe fits.

The independence statistic is the audit's (double-centred elementwise correlation per matrix, Fisher z, Stouffer),
computed on the shared sample coordinates, so a fingerprint p-value means what an audit p-value means. A second,
layer-matched version takes the best candidate layer for each suspect layer (Šidák over the candidate's layers, so
each stays N(0, 1) under the null), so stacks whose layers moved are still found; the two are combined by
Bonferroni.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from modeltrace.architectures import Slot
from modeltrace.detectors.fits import FLOOR_FACTOR
from modeltrace.detectors.storage import rounding_variance
from modeltrace.fingerprint.core import Fingerprint, SlotSample, centred_unit
from modeltrace.stats import best_of_z, fisher_z, fisher_z_many, log10_sf, stouffer

#: Layers whose sampled tensors all correlate at least this much are taken as copies of each other (bf16 and fp16
#: re-encodings stay above 0.99999; fine-tunes stay below).
COPY_CORR = 0.9999
#: Slots used for the lineage Gram stage (spread over the model); the final verdict uses every slot.
MAX_GRAM_SLOTS = 256
#: Of those, slots whose coordinates are also compared for exact equality (sparse-merge signatures).
MAX_EQUAL_SLOTS = 64


def _dof(v: np.ndarray) -> int:
    r, c = v.shape
    return (r - 1) * (c - 1) if r > 1 and c > 1 else r * c - 1


def units(fp: Fingerprint) -> dict[Slot, np.ndarray]:
    """Centred unit samples of the matrix slots, computed once per fingerprint (batched by sample shape)."""
    cache = fp.cache.get("units")
    if cache is None:
        by_shape: dict[tuple[int, ...], list[Slot]] = defaultdict(list)
        for k, s in fp.slots.items():
            if not s.structured:
                by_shape[s.values.shape].append(k)
        cache = {}
        for shape, keys in by_shape.items():
            if len(shape) != 2 or shape[0] < 2 or shape[1] < 2:
                cache.update({k: centred_unit(fp.slots[k].values) for k in keys})
                continue
            x = np.stack([fp.slots[k].values for k in keys]).astype(np.float64)
            if not np.isfinite(x).all():
                x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            x -= x.mean(axis=2, keepdims=True)
            x -= x.mean(axis=1, keepdims=True)
            n = np.sqrt(np.einsum("sij,sij->s", x, x))
            x /= np.where(n > 0, n, 1.0)[:, None, None]
            cache.update({k: x[i].astype(np.float32) for i, k in enumerate(keys)})
        fp.cache["units"] = cache
    return cache


def _pair_units(sa: SlotSample, sb: SlotSample, ua: np.ndarray, ub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nc = min(sa.values.shape[1], sb.values.shape[1])
    if ua.shape[1] != nc:
        ua = centred_unit(sa.values[:, :nc])
    if ub.shape[1] != nc:
        ub = centred_unit(sb.values[:, :nc])
    return ua, ub


@dataclass
class PairEvidence:
    """How strongly suspect and candidate depend on each other, from their shared coordinates."""

    log10_p: float  # one-sided p of "independent", not yet corrected for the number of candidates
    z: float
    z_same_layer: float
    z_best_layer: float
    shared: int  # matrix tensors compared
    corr: float  # median centred correlation over same-layer tensors
    layer_map: dict[int, int] = field(default_factory=dict)  # suspect layer -> candidate layer it copies


def compare(s: Fingerprint, x: Fingerprint) -> PairEvidence:
    us, ux = units(s), units(x)
    same: list[float] = []
    corrs: list[float] = []
    outside: list[float] = []
    groups_s: dict[tuple, dict[int, Slot]] = defaultdict(dict)
    groups_x: dict[tuple, dict[int, Slot]] = defaultdict(dict)
    for slot, u in us.items():
        ss = s.slots[slot]
        sx = x.slots.get(slot)
        if sx is not None and slot in ux and sx.shape_key == ss.shape_key:
            a, b = _pair_units(ss, sx, u, ux[slot])
            r = float(np.dot(a.ravel(), b.ravel()))
            z = fisher_z(r, _dof(a))
            same.append(z)
            corrs.append(r)
            if slot.layer < 0:
                outside.append(z)
        if slot.layer >= 0:
            groups_s[(slot.role, slot.expert, ss.rows, ss.cols)][slot.layer] = slot
    for slot in ux:
        if slot.layer >= 0:
            sx = x.slots[slot]
            groups_x[(slot.role, slot.expert, sx.rows, sx.cols)][slot.layer] = slot
    # Layer-matched: every suspect layer against every candidate layer, role by role.
    s_layers = sorted({i for g in groups_s.values() for i in g})
    x_layers = sorted({j for g in groups_x.values() for j in g})
    si = {v: a for a, v in enumerate(s_layers)}
    xi = {v: a for a, v in enumerate(x_layers)}
    zsum = np.zeros((len(s_layers), len(x_layers)))
    count = np.zeros_like(zsum)
    rmin = np.ones_like(zsum)
    for key, ls in groups_s.items():
        lx = groups_x.get(key)
        if not lx:
            continue
        a_layers, b_layers = sorted(ls), sorted(lx)
        nc = min(min(s.slots[ls[i]].values.shape[1] for i in a_layers),
                 min(x.slots[lx[j]].values.shape[1] for j in b_layers))
        A = np.stack([_trunc(s, us, ls[i], nc) for i in a_layers]).astype(np.float64)
        B = np.stack([_trunc(x, ux, lx[j], nc) for j in b_layers]).astype(np.float64)
        R = A @ B.T  # float64: OpenBLAS's float32 GEMM is ~15x slower at these skinny shapes (measured)
        Z = fisher_z_many(R, _dof(s.slots[ls[a_layers[0]]].values[:, :nc]))
        ix = np.ix_([si[i] for i in a_layers], [xi[j] for j in b_layers])
        zsum[ix] += Z
        count[ix] += 1
        rmin[ix] = np.minimum(rmin[ix], R)
    layer_map: dict[int, int] = {}
    layer_zs: list[float] = []
    if count.any():
        zpair = np.where(count > 0, zsum / np.sqrt(np.maximum(count, 1)), -np.inf)
        rows = np.flatnonzero(count.any(axis=1))
        best = zpair[rows].max(axis=1)
        layer_zs = [float(v) for v in np.atleast_1d(best_of_z(best, len(x_layers)))]
        copies = (rmin >= COPY_CORR) & (count > 0)
        for a in rows:
            js = np.flatnonzero(copies[a])
            i = s_layers[a]
            if js.size and not any(x_layers[j] == i for j in js):
                layer_map[i] = x_layers[int(js[np.argmax(rmin[a, js])])]
    z_same = stouffer(same)
    z_best = stouffer(layer_zs + outside) if layer_zs else z_same
    z = max(z_same, z_best)
    log10_p = min(0.0, log10_sf(z) + math.log10(2)) if (same or layer_zs) else 0.0
    return PairEvidence(log10_p, z, z_same, z_best, len(same), float(np.median(corrs)) if corrs else 0.0,
                        layer_map)


def _trunc(fp: Fingerprint, us: dict[Slot, np.ndarray], slot: Slot, nc: int) -> np.ndarray:
    u = us[slot]
    if u.shape[1] != nc:
        u = centred_unit(fp.slots[slot].values[:, :nc])
    return u.ravel()


# ---- Gram stack for lineage fits ------------------------------------------------------------------------------
@dataclass
class GramStack:
    """Per suspect matrix slot, the raw Gram matrix of all models' samples (aligned by layer maps), which models
    have that slot, each model's rounding floor there, and exact-equality masks for sparse-merge signatures."""

    names: list[str]
    keys: list[Slot]  # the suspect's slots, one per row of G
    layer_maps: list[dict[int, int]]
    G: np.ndarray  # (slots, n, n)
    present: np.ndarray  # (slots, n) bool
    floor: np.ndarray  # (slots, n): expected squared storage rounding of each model's sample
    equal: np.ndarray  # (n, n, coords) bool: model i == model j, on the coordinates of up to MAX_EQUAL_SLOTS slots
    eq_present: np.ndarray  # (n, coords) bool
    single: dict = field(default_factory=dict, repr=False)  # cache of best one-model residuals per target


def gram_stack(fps: list[Fingerprint], layer_maps: list[dict[int, int]], names: list[str]) -> GramStack:
    """`fps[0]` is the suspect; `layer_maps[i]` maps suspect layers to fps[i]'s layers where they were copied."""
    s = fps[0]
    n = len(fps)
    keys = [k for k, v in s.slots.items() if not v.structured]
    if len(keys) > MAX_GRAM_SLOTS:
        keys = [keys[i] for i in np.linspace(0, len(keys) - 1, MAX_GRAM_SLOTS).astype(int)]
    Gs, pres, floors, eq_blocks, eq_pres = [], [], [], [], []
    eq_every = max(1, -(-len(keys) // MAX_EQUAL_SLOTS))
    for pos, k in enumerate(keys):
        ss = s.slots[k]
        got: list[SlotSample | None] = []
        for fp, lm in zip(fps, layer_maps, strict=True):
            ak = Slot(k.role, lm.get(k.layer, k.layer), k.expert) if k.layer >= 0 else k
            sm = fp.slots.get(ak)
            got.append(sm if sm is not None and sm.shape_key == ss.shape_key else None)
        nc = min(g.values.shape[1] for g in got if g is not None)
        nr = ss.values.shape[0]
        V = np.zeros((n, nr * nc), dtype=np.float64)
        p = np.zeros(n, dtype=bool)
        fl = np.zeros(n)
        for i, g in enumerate(got):
            if g is None:
                continue
            v = np.nan_to_num(g.values[:, :nc], nan=0.0, posinf=0.0, neginf=0.0)
            V[i] = v.ravel()
            p[i] = True
            fl[i] = rounding_variance(v, g.dtype)
        Gs.append(V @ V.T)
        pres.append(p)
        floors.append(fl)
        if pos % eq_every == 0:
            eq_blocks.append(V[:, None, :] == V[None, :, :])
            eq_pres.append(np.repeat(p[:, None], V.shape[1], axis=1))
    if not keys:
        z = np.zeros((0, n, n))
        return GramStack(names, keys, layer_maps, z, np.zeros((0, n), bool), np.zeros((0, n)),
                         np.zeros((n, n, 0), bool), np.zeros((n, 0), bool))
    return GramStack(names, keys, layer_maps, np.stack(Gs), np.stack(pres), np.stack(floors),
                     np.concatenate(eq_blocks, axis=2), np.concatenate(eq_pres, axis=1))


@dataclass
class Fit:
    target: int
    members: tuple[int, ...]
    w: np.ndarray  # (slots, members): free least-squares weights per slot
    rho: float  # residual relative to the best single-model explanation of the target
    exact: float  # share of slots explained down to the target's storage rounding
    slots: int

    @property
    def weights(self) -> dict[int, float]:
        """Median weight of each member over the slots."""
        med = np.median(self.w, axis=0) if self.slots else np.zeros(len(self.members))
        return {m: float(v) for m, v in zip(self.members, med, strict=True)}


def fit(gs: GramStack, target: int, members: tuple[int, ...]) -> Fit:
    """Free least squares of `target` on `members`, slot by slot (closed form from the Gram stack)."""
    idx = list(members)
    mask = gs.present[:, target] & gs.present[:, idx].all(axis=1)
    if not mask.any():
        return Fit(target, members, np.zeros((0, len(idx))), math.inf, 0.0, 0)
    G = gs.G[mask]
    A = G[:, idx][:, :, idx]
    b = G[:, idx, target]
    scale = np.maximum(np.trace(A, axis1=1, axis2=2), 1e-300)[:, None, None]
    w = np.linalg.solve(A + 1e-12 * scale * np.eye(len(idx)), b[..., None])[..., 0]
    rss = np.maximum(G[:, target, target] - 2 * (w * b).sum(1) + np.einsum("si,sij,sj->s", w, A, w), 0.0)
    floor = FLOOR_FACTOR * gs.floor[mask, target] + 1e-12 * G[:, target, target]
    ref = _best_single(gs, target, mask)
    return Fit(target, members, w, float(rss.sum() / max(ref, 1e-300)), float(np.mean(rss <= floor)),
               int(mask.sum()))


def _best_single(gs: GramStack, target: int, mask: np.ndarray) -> float:
    """Residual of the target's best one-model explanation over the masked slots (cached per target and mask)."""
    key = (target, mask.tobytes())
    cache = gs.single
    if key in cache:
        return cache[key]
    G = gs.G[mask]
    best = math.inf
    for m in range(G.shape[1]):
        if m == target or not gs.present[mask, m].all():
            continue
        gmm = np.maximum(G[:, m, m], 1e-300)
        best = min(best, float(np.maximum(G[:, target, target] - G[:, target, m] ** 2 / gmm, 0).sum()))
    cache[key] = best if math.isfinite(best) else float(G[:, target, target].sum())
    return cache[key]


def zero_share(gs: GramStack, target: int, base: int, others: tuple[int, ...]) -> float:
    """Share of coordinates where every other model changed the base but the target equals the base exactly: the
    signature of a sparse task-vector merge (TIES, DARE, DELLA, breadcrumbs) of `others` over `base`."""
    if not others or gs.equal.shape[2] == 0:
        return 0.0
    ok = gs.eq_present[target] & gs.eq_present[base]
    active = ok.copy()
    for o in others:
        active &= gs.eq_present[o] & ~gs.equal[o, base]
    n = int(active.sum())
    return float((gs.equal[target, base] & active).sum() / n) if n > 1000 else 0.0
