"""Layer map: which layer of which candidate each suspect layer comes from, from a few sampled rows per tensor.

Reads a handful of deterministic rows of every matrix (about 0.1% of the bytes), so stacks ("frankenmerges"), layer
reorderings and copies are found before the full streaming pass decides which tensors to compare.
"""

from __future__ import annotations

import hashlib
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


def slot_sample(view: ModelView, slot: Slot, k: int = SAMPLE_ROWS) -> np.ndarray:
    part = view.parts[slot]
    ids = sample_row_ids(part.rows, part.cols, k)
    return np.concatenate([view.read(slot, int(i), int(i) + 1) for i in ids]).ravel()


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

    @property
    def exact(self) -> bool:
        return self.candidate is not None and self.rel_diff <= EXACT_TOL


def _centred(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v - v.mean()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def map_layers(suspect: ModelView, candidates: list[ModelView]) -> list[LayerMatch]:
    s_roles = _layer_roles(suspect)
    c_roles = [_layer_roles(c) for c in candidates]
    cache: dict[tuple[int, Slot], np.ndarray] = {}

    def sample(idx: int, slot: Slot) -> np.ndarray:
        key = (idx, slot)
        if key not in cache:
            view = suspect if idx < 0 else candidates[idx]
            v = slot_sample(view, slot)
            cache[key] = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        return cache[key]

    out: list[LayerMatch] = []
    for layer in sorted(s_roles):
        roles = s_roles[layer]
        best = (-2.0, None, None, np.inf)
        ident: list[float | None] = []
        for ci, cr in enumerate(c_roles):
            ident_sim = None
            for j, croles in cr.items():
                sims, diffs = [], []
                for rname, sslot in roles.items():
                    cslot = croles.get(rname)
                    if cslot is None:
                        continue
                    sp, cp = suspect.parts[sslot], candidates[ci].parts[cslot]
                    if (sp.rows, sp.cols) != (cp.rows, cp.cols):
                        continue
                    a, b = sample(-1, sslot), sample(ci, cslot)
                    sims.append(_cos(_centred(a), _centred(b)))
                    diffs.append(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
                if not sims:
                    continue
                sim, diff = float(np.median(sims)), float(np.max(diffs))
                if j == layer:
                    ident_sim = sim
                if (diff < best[3] and diff <= EXACT_TOL) or (best[3] > EXACT_TOL and sim > best[0]):
                    best = (sim, ci, j, diff)
            ident.append(ident_sim)
        sim, ci, j, diff = best
        out.append(LayerMatch(layer, ci, j, float(sim), float(diff), ident))
    return out


def stack_map(matches: list[LayerMatch]) -> list[tuple[int, int, int]] | None:
    """(suspect layer, candidate, candidate layer) for every layer if each is an exact copy, else None."""
    if not matches or not all(m.exact for m in matches):
        return None
    return [(m.layer, m.candidate, m.source_layer) for m in matches]  # type: ignore[misc]
