"""Which of a suspect's sampled slots sit in place against a candidate's, from coordinate samples alone: the marks
that unit, head, expert or vocabulary permutations leave on a fingerprint (issue 5).

A slot is out of place when its same-slot z is weak (`slot_z`), when it fails the permutation null of its own units
(`placed_z`), or when some of its rows or columns match line for line and others not at all (`mixed_slots`: a partial
head permutation), in a layer whose matrices or norm gains (`gain_z`: untouched by unit permutations) relate
(`disguised_slots`; thresholds Z_WEAK, Z_STRONG, MIN_PLACED_SHARE and MIN_LINE in align/core.py).

Data flow: fingerprint/undisguise.py's coordinate mode calls these with the suspect's and the strongest candidate's
fingerprints and leaves the slots found out of the lineage fits. Memory: the two fingerprints' samples, stacked by
shape (a copy of the shared samples at most).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from modeltrace.align.core import MIN_LINE, MIN_PLACED_SHARE, Z_STRONG, Z_WEAK
from modeltrace.architectures import Slot
from modeltrace.fingerprint.compare import units
from modeltrace.fingerprint.core import Fingerprint, centred_unit
from modeltrace.fingerprint.invariant import double_centred, exchangeable_stack, fp_roles
from modeltrace.stats import fisher_z, fisher_z_many

__all__ = ["disguised_slots", "gain_z", "mixed_slots", "placed_z", "slot_z"]


def slot_z(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None = None) -> dict[Slot, float]:
    """Same-slot Fisher z of every matrix slot the two share (through a layer map where layers were copied)."""
    us, uc = units(s), units(c)
    out: dict[Slot, float] = {}
    lm = layer_map or {}
    for slot, u in us.items():
        k = Slot(slot.role, lm.get(slot.layer, slot.layer), slot.expert) if slot.layer >= 0 else slot
        sc = c.slots.get(k)
        if sc is None or k not in uc or sc.shape_key != s.slots[slot].shape_key:
            continue
        a, b = u, uc[k]
        nc = min(a.shape[1], b.shape[1])
        if a.shape[1] != nc:
            a = centred_unit(s.slots[slot].values[:, :nc])
        if b.shape[1] != nc:
            b = centred_unit(sc.values[:, :nc])
        r = float(np.dot(a.ravel(), b.ravel()))
        dof = (a.shape[0] - 1) * (a.shape[1] - 1) if a.shape[0] > 1 and a.shape[1] > 1 else a.size - 1
        out[slot] = fisher_z(r, dof)
    return out


def gain_z(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None = None) -> dict[int, float]:
    """Per suspect layer, the best Fisher z of the centred correlation between its norm gains and the candidate's
    (their sampled 1-D slots). Gains are untouched by unit, head and expert permutations, so a layer whose matrices
    no longer line up while its gains do is the candidate's layer disguised, not a layer from elsewhere. Gains that
    are all alike (folded, or an untrained init) say nothing."""
    lm = layer_map or {}
    out: dict[int, float] = {}
    roles = fp_roles(s)
    for slot, smp in s.slots.items():
        if not roles.is_gain(slot.role) or slot.layer < 0:
            continue
        sc = c.slots.get(Slot(slot.role, lm.get(slot.layer, slot.layer), slot.expert))
        if sc is None or sc.shape_key != smp.shape_key:
            continue
        n = min(smp.values.size, sc.values.size)
        a = np.nan_to_num(smp.values.ravel()[:n].astype(np.float64))
        b = np.nan_to_num(sc.values.ravel()[:n].astype(np.float64))
        a, b = a - a.mean(), b - b.mean()
        den = float(np.linalg.norm(a) * np.linalg.norm(b))
        if den > 0:
            out[slot.layer] = max(out.get(slot.layer, -math.inf), fisher_z(float(a @ b) / den, n))
    return out


def _paired_samples(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None
                    ) -> dict[tuple[int, int], list[tuple[Slot, np.ndarray, np.ndarray]]]:
    """The suspect's matrix samples and the candidate's at the same slot (through the layer map), cut to their
    shared columns, grouped by shape so that each group is handled as one stack."""
    lm = layer_map or {}
    out: dict[tuple[int, int], list[tuple[Slot, np.ndarray, np.ndarray]]] = defaultdict(list)
    for slot, smp in s.slots.items():
        if smp.structured or smp.values.ndim != 2:
            continue
        k = Slot(slot.role, lm.get(slot.layer, slot.layer), slot.expert) if slot.layer >= 0 else slot
        sc = c.slots.get(k)
        if sc is None or sc.shape_key != smp.shape_key or sc.values.shape[0] != smp.values.shape[0]:
            continue
        nc = min(smp.values.shape[1], sc.values.shape[1])
        out[(smp.values.shape[0], nc)].append((slot, smp.values[:, :nc], sc.values[:, :nc]))
    return out


def _line_z(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fisher z of the correlation of each row of `a` with the same row of `b`, over stacks (..., n, L) (NaN where
    a row is constant)."""
    x = np.nan_to_num(a.astype(np.float64))
    y = np.nan_to_num(b.astype(np.float64))
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    r = np.divide((x * y).sum(axis=-1), den, out=np.full(den.shape, np.nan), where=den > 0)
    return fisher_z_many(r, a.shape[-1])


def mixed_slots(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None = None) -> set[Slot]:
    """Slots whose rows or columns match the candidate's line for line but for some that do not relate at all:
    units, heads or experts moved within the sampled block (see MIN_LINE)."""
    out: set[Slot] = set()
    for items in _paired_samples(s, c, layer_map).values():
        a = np.stack([x for _, x, _ in items])
        b = np.stack([y for _, _, y in items])
        for x, y in ((a, b), (a.swapaxes(1, 2), b.swapaxes(1, 2))):
            if x.shape[2] < MIN_LINE or x.shape[1] < 2:
                continue
            for (slot, _, _), z in zip(items, _line_z(x, y), strict=True):
                z = z[np.isfinite(z)]
                if z.size and float(z.max()) >= Z_STRONG and float(z.min()) < max(Z_WEAK, float(np.median(z)) / 2):
                    out.add(slot)
    return out


def placed_z(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None = None
             ) -> dict[Slot, tuple[float, float]]:
    """Per shared matrix slot, how surely it is in place: (z, the z of an exact copy at most), z the smaller of its
    `exchangeable_z` with the rows as the exchangeable units and with the columns. A slot whose units (rows, or
    columns) were permuted is one draw of that permutation null on its unit axis, N(0, 1) even though its other axis
    (the residual stream, in place) is shared; its plain Fisher z is not (3 to 4 happens: units of one model share
    their residual directions). An exact copy reaches at most sqrt(m (m - 1)) for m units on the shorter axis."""
    out: dict[Slot, tuple[float, float]] = {}
    for (nr, nc), items in _paired_samples(s, c, layer_map).items():
        if min(nr, nc) < 3:
            continue
        a = double_centred(np.stack([x for _, x, _ in items]))
        b = double_centred(np.stack([y for _, _, y in items]))
        z = np.minimum(exchangeable_stack(a, b)[0], exchangeable_stack(a.swapaxes(1, 2), b.swapaxes(1, 2))[0])
        top = math.sqrt(min(nr, nc) * (min(nr, nc) - 1))
        out.update({slot: (float(v), top) for (slot, _, _), v in zip(items, z, strict=True)})
    return out


def disguised_slots(zs: dict[Slot, float], layer_z: dict[int, float] | None = None,
                    placed: dict[Slot, tuple[float, float]] | None = None) -> set[Slot]:
    """Slots that do not relate while their layer (or, outside layers, the model) clearly does: the marks of
    permuted units, heads, experts or vocabulary rows. A layer relates when one of its matrices does, or its norm
    gains do (`layer_z`, from `gain_z`: every matrix of a layer may be permuted); a slot does not when its z is
    below Z_WEAK, or its `placed` z is below Z_WEAK or MIN_PLACED_SHARE of an exact copy's (nearer the null than
    any in-place relative: those reach 0.85 or more in the test corpus, cross-family merges included)."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    for k, z in zs.items():
        by_layer[k.layer].append(z)
    for layer, z in (layer_z or {}).items():
        by_layer[layer].append(z)
    strong_layers = {layer for layer, v in by_layer.items() if max(v) >= Z_STRONG}
    inner = [max(v) for layer, v in by_layer.items() if layer >= 0]
    model_strong = bool(inner) and float(np.median(inner)) >= Z_STRONG
    out = set()
    for k, z in zs.items():
        pz, top = (placed or {}).get(k, (z, math.inf))
        if z >= Z_WEAK and pz >= max(Z_WEAK, MIN_PLACED_SHARE * top):
            continue
        if (k.layer >= 0 and k.layer in strong_layers) or (k.layer < 0 and model_strong):
            out.add(k)
    return out


