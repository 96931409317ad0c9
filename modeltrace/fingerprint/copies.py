"""Copies and re-encodings among fingerprints: the same weights stored in another dtype are one model, not a lineage.

Data flow: two fingerprints -> their shared slot samples (same slot and shape, so the same coordinates) -> per
element, the difference against the rounding the coarser of the two storage dtypes allows (one unit in the last
place for floats: F32, BF16, F16, FP8; one quantisation step for GGUF block types, from the sampled row's range)
-> a CopyLink when (nearly) every element of (nearly) every shared slot is within it. `copy_groups` then gathers
models linked to one another and names each group's original: the finest storage, then the given order.

A low-bit quantised model (6 bits or fewer) sits within rounding of the original *and* of small fine-tunes of it:
it is linked only to the model it is closest to.

For identify's answer: `own_copies` (indexed models holding the suspect's weights), `copy_verdict` (the copy
answer), `copy_notes` and `with_copies` (copies named with their original: "X, and its fp16 copy Y").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modeltrace.fingerprint.core import Fingerprint

__all__ = ["CopyLink", "copy_groups", "copy_link", "copy_notes", "copy_verdict", "dtype_word", "original_first",
           "own_copies", "precision", "storage_dtype", "with_copies"]

#: float storage: (mantissa bits, smallest normal exponent)
_FLOATS = {"F64": (52, -1022), "F32": (23, -126), "BF16": (7, -126), "F16": (10, -14), "F8_E4M3": (3, -6),
           "F8_E5M2": (2, -14)}
#: GGUF block types: bits per weight of their integer codes
_QUANTS = {"Q8_0": 8, "Q8_1": 8, "Q8_K": 8, "Q6_K": 6, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q4_0": 4, "Q4_1": 4,
           "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "Q3_K": 3, "IQ3_XXS": 3, "IQ3_S": 3, "Q2_K": 2, "IQ2_XXS": 2,
           "IQ2_XS": 2, "IQ2_S": 2, "IQ1_S": 1, "IQ1_M": 1}
#: Share of elements of a slot that must sit within rounding (floats; quantised types allow outliers of the block
#: scale that the sampled row does not show)
_FLOAT_SHARE, _QUANT_SHARE = 0.999, 0.99
#: Share of the smaller model's slots the two must share, and of the shared slots that must agree
_MIN_SHARED, _MIN_AGREE = 0.9, 0.98
_LOOSE_BITS = 6


def precision(dtype: str) -> float | None:
    """Bits of precision a storage dtype keeps (higher is finer); None for dtypes no rounding model covers."""
    if dtype in _FLOATS:
        return float(_FLOATS[dtype][0])
    if dtype in _QUANTS:
        return _QUANTS[dtype] - 2.0  # block scales: small elements keep fewer bits than a float of that width
    return None


def storage_dtype(fp: Fingerprint) -> str:
    """The dtype most of a model's sampled matrix elements are stored in."""
    counts: dict[str, int] = {}
    for s in fp.slots.values():
        if not s.structured:
            counts[s.dtype] = counts.get(s.dtype, 0) + s.values.size
    return max(counts, key=lambda d: (counts[d], d)) if counts else "?"


@dataclass(frozen=True)
class CopyLink:
    """Two models hold the same weights: `identical` (equal values, equal dtypes) or a re-encoding into `dtype`."""

    identical: bool
    dtype: str  # the coarser storage dtype of the two (what the re-encoding rounded to)
    error: float  # median relative RMS difference over shared slots (0 for identical)
    loose: bool  # the coarser dtype is a low-bit quantisation


def _tolerance(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """One unit of `dtype`'s rounding at each element (floats: the unit in the last place, subnormals included;
    block quantisations: one step of a block whose range is the sampled row's)."""
    mag = np.maximum(np.abs(a), np.abs(b))
    if dtype in _FLOATS:
        p, emin = _FLOATS[dtype]
        with np.errstate(divide="ignore"):
            e = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
        return np.exp2(np.maximum(e, emin) - p)
    if dtype in _QUANTS:
        levels = 2 ** _QUANTS[dtype] - 1
        return np.broadcast_to(2 * mag.max(axis=-1, keepdims=True) / levels, a.shape)
    raise ValueError(f"no rounding model for {dtype}")


def copy_link(x: Fingerprint, y: Fingerprint) -> CopyLink | None:
    """Whether x and y are copies of each other up to the coarser storage's rounding (None when not, or when
    their samples cannot tell)."""
    shared = [k for k, s in x.slots.items()
              if k in y.slots and y.slots[k].shape_key == s.shape_key and y.slots[k].row0 == s.row0]
    if not shared or len(shared) < _MIN_SHARED * min(len(x.slots), len(y.slots)):
        return None
    agree = 0
    allowed = int((1 - _MIN_AGREE) * len(shared))  # slots that may disagree before the answer is no
    identical = True
    coarsest, errors = None, []
    for i, k in enumerate(shared):
        sa, sb = x.slots[k], y.slots[k]
        pa, pb = precision(sa.dtype), precision(sb.dtype)
        if pa is None or pb is None:
            return None
        dtype = sa.dtype if pa <= pb else sb.dtype
        if coarsest is None or min(pa, pb) < precision(coarsest):  # type: ignore[operator]
            coarsest = dtype
        nr = min(sa.values.shape[0], sb.values.shape[0])
        nc = min(sa.values.shape[1], sb.values.shape[1])
        a = np.nan_to_num(sa.values[:nr, :nc].astype(np.float64))
        b = np.nan_to_num(sb.values[:nr, :nc].astype(np.float64))
        diff = np.abs(a - b)
        same = bool((diff == 0).all())
        identical &= same and sa.dtype == sb.dtype
        if not sa.structured:
            rms = math.sqrt(float(np.mean(a * a))) or 1.0
            errors.append(math.sqrt(float(np.mean(diff * diff))) / rms)
        if same:
            agree += 1
            continue
        # each side's rounding is at most half its own unit: one unit of each is a 2x margin over both
        tol = _tolerance(a, b, sa.dtype) + _tolerance(a, b, sb.dtype)
        need = _QUANT_SHARE if sa.dtype in _QUANTS or sb.dtype in _QUANTS else _FLOAT_SHARE
        if float(np.mean(diff <= tol)) >= need:
            agree += 1
        elif i + 1 - agree > allowed:  # too many slots disagree already
            return None
    if agree < _MIN_AGREE * len(shared):
        return None
    assert coarsest is not None
    return CopyLink(identical, coarsest, 0.0 if identical or not errors else float(np.median(errors)),
                    coarsest in _QUANTS and _QUANTS[coarsest] <= _LOOSE_BITS)


def copy_groups(fps: Mapping[str, Fingerprint], order: Sequence[str]) -> dict[str, list[str]]:
    """Models of `order` gathered with their copies: original name -> its copies (in `order`). The original of a
    group is its finest-stored model (the earliest in `order` among equals); a model stands alone when it has none."""
    links: dict[tuple[str, str], CopyLink] = {}
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            link = copy_link(fps[a], fps[b])
            if link is not None:
                links[(a, b)] = links[(b, a)] = link
    parent = {n: n for n in order}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in order:
        mine = {m: links[(n, m)] for m in order if (n, m) in links}
        if not mine:
            continue
        if any(link.loose for link in mine.values()):  # a coarse quantisation joins only its closest model
            closest = min(mine, key=lambda m: mine[m].error)
            mine = {closest: mine[closest]}
        for m in mine:
            parent[root(m)] = root(n)
    groups: dict[str, list[str]] = {}
    for n in order:
        groups.setdefault(root(n), []).append(n)
    out: dict[str, list[str]] = {}
    for members in groups.values():
        head = max(members, key=lambda n: (precision(storage_dtype(fps[n])) or -1.0, -order.index(n)))
        out[head] = [n for n in members if n != head]
    return {h: out[h] for h in sorted(out, key=order.index)}


# ---- copies in identify's answer ------------------------------------------------------------------------------
def dtype_word(dtype: str) -> str:
    return {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}.get(
        dtype, dtype)


def own_copies(suspect: Fingerprint, fps: dict[str, Fingerprint], strong: list[str], identical: str | None
                ) -> dict[str, CopyLink]:
    """The indexed models that hold the suspect's own weights (same content, or a re-encoding either way)."""
    own: dict[str, CopyLink] = {}
    for n in strong:
        link = copy_link(suspect, fps[n])
        if n == identical:
            link = CopyLink(True, storage_dtype(suspect), 0.0, False)
        if link is not None:
            own[n] = link
    loose = [n for n in own if own[n].loose]  # a coarse quantisation is a copy only if the closest one
    if loose and len(own) > 1:
        best = min(own, key=lambda n: own[n].error)
        own = {n: link for n, link in own.items() if not link.loose or n == best}
    return own


def original_first(names: list[str], fps: dict[str, Fingerprint], own: dict[str, CopyLink]) -> list[str]:
    """Identical copies first, then the finest storage (the likely original), then the given order."""
    return sorted(names, key=lambda n: (not own[n].identical, -(precision(storage_dtype(fps[n])) or -1.0),
                                        names.index(n)))


def copy_verdict(own: dict[str, CopyLink], fps: dict[str, Fingerprint]) -> dict[str, Any]:
    head = original_first(list(own), fps, own)[0]
    rel = "copy" if own[head].identical else "recast"
    return {"relation": rel, "method": None, "base": None,
            "parents": [{"model": head, "weight": 1.0, "interval": [1.0, 1.0]}],
            "summary": f"{'identical to' if rel == 'copy' else 'the same weights as'} {head}"}


def copy_notes(own: dict[str, CopyLink], groups: dict[str, list[str]], fps: dict[str, Fingerprint]
                ) -> dict[str, tuple[str | None, str]]:
    """Every copy in the answer: model -> (the model it copies, None for the suspect's own; a short note)."""
    out: dict[str, tuple[str | None, str]] = {}
    for n in original_first(list(own), fps, own):
        out[n] = (None, "identical weights" if own[n].identical
                  else f"same weights in {dtype_word(storage_dtype(fps[n]))}")
    for head, members in groups.items():
        for m in members:
            out[m] = (head, f"{dtype_word(storage_dtype(fps[m]))} copy of {head}")
    return out


def with_copies(name: str, copies: dict[str, tuple[str | None, str]], fps: dict[str, Fingerprint]) -> str:
    """'X, and its fp16 copy Y, bf16 copy Z' for a model that has copies in the index, else 'X'."""
    mine = [m for m, (of, _) in copies.items() if of == name]
    if not mine:
        return name
    return name + ", and its " + ", ".join(f"{dtype_word(storage_dtype(fps[m]))} copy {m}" for m in mine)
