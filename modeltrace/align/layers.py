"""Layer map: which layer of which candidate each suspect layer comes from, from a few sampled rows per tensor.

Reads a handful of deterministic rows of every matrix (about 0.1% of the bytes), so stacks ("frankenmerges"), layer
reorderings and copies are found before the full streaming pass decides which tensors to compare.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot, is_expert_role, is_structured

SAMPLE_ROWS = 4
#: A suspect layer counts as a copy of a candidate layer when sampled values agree this closely (relative RMS):
#: bf16 re-encoding stays below 2^-8, fp8 below 2^-3.
EXACT_TOL = 2.0**-7


def sample_row_ids(rows: int, cols: int, k: int = SAMPLE_ROWS) -> np.ndarray:
    """Deterministic rows, a function of the shape alone, so every model of that shape samples the same rows."""
    if rows <= k:
        return np.arange(rows)
    seed = int.from_bytes(hashlib.sha256(f"{rows}x{cols}".encode()).digest()[:8], "little")
    return np.sort(np.random.default_rng(seed).choice(rows, size=k, replace=False))


def sample_row_block(rows: int, cols: int, k: int = SAMPLE_ROWS) -> np.ndarray:
    """The layer map's rows: k consecutive rows at a place seeded by the shape alone (every model of that shape
    samples the same rows), so a remote model serves each tensor's sample with one ranged read."""
    if rows <= k:
        return np.arange(rows)
    seed = int.from_bytes(hashlib.sha256(f"{rows}x{cols}".encode()).digest()[:8], "little")
    start = int(np.random.default_rng(seed).integers(0, rows - k + 1))
    return np.arange(start, start + k)


def prefetch_samples(view: ModelView, slots: list[Slot], k: int = SAMPLE_ROWS) -> None:
    """Announce the sampled rows of these slots, so a remote model fetches them all at once (local: nothing)."""
    reads = []
    for slot in slots:
        part = view.parts[slot]
        ids = sample_row_block(part.rows, part.cols, k)
        if len(ids):
            reads.append((part.name, part.row_start + int(ids[0]), part.row_start + int(ids[-1]) + 1))
    prefetch = getattr(view.source, "prefetch", None)  # views over fingerprints have nothing to fetch
    if prefetch is not None:
        prefetch(reads)


def slot_sample(view: ModelView, slot: Slot, k: int = SAMPLE_ROWS) -> np.ndarray:
    part = view.parts[slot]
    ids = sample_row_block(part.rows, part.cols, k)
    return view.read(slot, int(ids[0]), int(ids[-1]) + 1).ravel() if len(ids) else np.zeros(0, np.float32)


def _layer_roles(view: ModelView) -> dict[int, dict[str, Slot]]:
    """Per layer, the matrix slots used for mapping: non-expert matrices, or expert 0 in pure-MoE layers."""
    out: dict[int, dict[str, Slot]] = {}
    for slot, part in view.parts.items():
        if slot.layer < 0 or is_structured(slot, part):
            continue
        if is_expert_role(slot.role) and slot.expert != 0:
            continue
        out.setdefault(slot.layer, {})[f"{slot.role}{'.E0' if slot.expert == 0 else ''}"] = slot
    return out


@dataclass
class LayerMatch:
    layer: int
    candidate: int | None  # index into the candidate list
    source_layer: int | None
    similarity: float  # median centred cosine over roles
    rel_diff: float  # relative RMS difference of samples to the matched layer
    identity_similarity: list[float | None]  # similarity to layer `layer` of each candidate
    #: per candidate, the least similar role at the same layer (a permutation of one role's units shows here)
    identity_min: list[float | None] | None = None

    @property
    def exact(self) -> bool:
        return self.candidate is not None and self.rel_diff <= EXACT_TOL


#: Elements kept per sampled tensor for the layer map (cosines over 4096 coordinates resolve ~0.03).
SAMPLE_ELEMENTS = 4096


def _samples(view: ModelView, roles: dict[int, dict[str, Slot]]) -> dict[str, dict[int, np.ndarray]]:
    """Per role, per layer: a fixed coordinate sample of the tensor (same coordinates for the same shape)."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for layer, rmap in roles.items():
        for rname, slot in rmap.items():
            v = np.nan_to_num(slot_sample(view, slot).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            if v.size > SAMPLE_ELEMENTS:
                v = v[np.linspace(0, v.size - 1, SAMPLE_ELEMENTS).astype(int)]
            out.setdefault(rname, {})[layer] = v
    return out


def _sim_matrices(sa: dict[int, np.ndarray], sb: dict[int, np.ndarray]) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Centred cosine and relative difference between every layer of a and every layer of b, for one role."""
    la = [k for k, v in sa.items()]
    lb = [k for k, v in sb.items()]
    size = {v.size for v in sa.values()} | {v.size for v in sb.values()}
    if len(size) != 1:
        # Different shapes per layer: compare only equal sizes.
        sims = np.full((len(la), len(lb)), np.nan)
        diffs = np.full((len(la), len(lb)), np.inf)
        for i, a in enumerate(la):
            for j, b in enumerate(lb):
                if sa[a].size == sb[b].size:
                    sims[i, j], diffs[i, j] = _pair(sa[a], sb[b])
        return la, lb, sims, diffs
    A = np.stack([sa[k] for k in la])
    B = np.stack([sb[k] for k in lb])
    Ac = A - A.mean(axis=1, keepdims=True)
    Bc = B - B.mean(axis=1, keepdims=True)
    na = np.linalg.norm(Ac, axis=1, keepdims=True)
    nb = np.linalg.norm(Bc, axis=1, keepdims=True)
    sims = (Ac / np.where(na > 0, na, 1)) @ (Bc / np.where(nb > 0, nb, 1)).T
    ra = (A * A).sum(axis=1)[:, None]
    rb = (B * B).sum(axis=1)[None, :]
    d2 = np.maximum(ra + rb - 2 * A @ B.T, 0)
    diffs = np.sqrt(d2) / np.sqrt(np.maximum(ra, 1e-60))
    return la, lb, sims, diffs


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    ac, bc = a - a.mean(), b - b.mean()
    den = np.linalg.norm(ac) * np.linalg.norm(bc)
    sim = float(ac @ bc / den) if den > 0 else 0.0
    return sim, float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def _reduce_roles(sims: np.ndarray, diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over roles (axis 0): median and least similarity, largest difference; NaN/inf where no role compares (also
    when there is no role at all: a suspect or candidate whose layers hold no comparable matrix)."""
    shape = sims.shape[1:]
    if sims.shape[0] == 0 or sims.size == 0:
        return np.full(shape, np.nan), np.full(shape, np.inf), np.full(shape, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(sims, axis=0)
        mn = np.nanmin(sims, axis=0)
        mx = np.nanmax(np.where(np.isnan(diffs), -np.inf, diffs), axis=0)
    mx[~np.isfinite(mx)] = np.inf
    return med, mx, mn


def map_layers(suspect: ModelView, candidates: list[ModelView]) -> list[LayerMatch]:
    roles = [_layer_roles(v) for v in (suspect, *candidates)]
    for v, r in zip((suspect, *candidates), roles, strict=True):  # remote models: every sample in flight at once
        prefetch_samples(v, [slot for rmap in r.values() for slot in rmap.values()])
    s_samples = _samples(suspect, roles[0])
    s_layers = sorted({layer for per in s_samples.values() for layer in per})
    # For each candidate: (suspect layers x candidate layers) median similarity and max difference over roles.
    per_cand: list[tuple[list[int], np.ndarray, np.ndarray, np.ndarray]] = []
    for cand, c_roles in zip(candidates, roles[1:], strict=True):
        c_samples = _samples(cand, c_roles)
        c_layers = sorted({layer for per in c_samples.values() for layer in per})
        si = {layer: k for k, layer in enumerate(s_layers)}
        ci = {layer: k for k, layer in enumerate(c_layers)}
        sims = np.full((len(s_roles_list := list(s_samples)), len(s_layers), len(c_layers)), np.nan)
        diffs = np.full_like(sims, np.nan)
        for r, rname in enumerate(s_roles_list):
            if rname not in c_samples:
                continue
            la, lb, sm, df = _sim_matrices(s_samples[rname], c_samples[rname])
            ia = [si[x] for x in la]
            ib = [ci[x] for x in lb]
            sims[r][np.ix_(ia, ib)] = sm
            diffs[r][np.ix_(ia, ib)] = df
        med, mx, mn = _reduce_roles(sims, diffs)
        per_cand.append((c_layers, med, mx, mn))

    out: list[LayerMatch] = []
    for k, layer in enumerate(s_layers):
        best = (-2.0, None, None, np.inf)
        ident: list[float | None] = []
        ident_min: list[float | None] = []
        for cidx, (c_layers, med, mx, mn) in enumerate(per_cand):
            ident_sim = ident_lo = None
            for j, cl in enumerate(c_layers):
                sim, diff = med[k, j], mx[k, j]
                if np.isnan(sim):
                    continue
                if cl == layer:
                    ident_sim = float(sim)
                    ident_lo = float(mn[k, j])
                if (diff < best[3] and diff <= EXACT_TOL) or (best[3] > EXACT_TOL and sim > best[0]):
                    best = (float(sim), cidx, cl, float(diff))
            ident.append(ident_sim)
            ident_min.append(ident_lo)
        sim, ci_, j, diff = best
        out.append(LayerMatch(layer, ci_, j, float(sim), float(diff), ident, ident_min))
    return out


def stack_map(matches: list[LayerMatch]) -> list[tuple[int, int, int]] | None:
    """(suspect layer, candidate, candidate layer) for every layer if each is an exact copy, else None."""
    if not matches or not all(m.exact for m in matches):
        return None
    return [(m.layer, m.candidate, m.source_layer) for m in matches]  # type: ignore[misc]
