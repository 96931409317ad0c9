"""Which coordinates a fingerprint keeps: a function of each canonical tensor's role and shape only.

Every model whose tensor has shape (rows, cols) is sampled at the same coordinates, so a merge of models is the
same merge of their samples (element-wise recipes stay linear) and recipes can be fitted from fingerprints alone.
A sample is one contiguous block of whole rows (one Range request per tensor) and, within it, a fixed set of
columns taken as a prefix of a fixed permutation: a fingerprint shrunk to fit its size budget keeps a prefix, so
fingerprints of different sizes still share their leading columns.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from modeltrace.architectures import Part, Slot, is_expert_role, is_structured
from modeltrace.errors import InputError

#: Coordinates kept per tensor (before any shrinking): per-slot correlations then resolve ~0.02.
TARGET_COORDS = 2048
#: Columns kept per sampled row (a prefix of a fixed permutation of the columns).
KEEP_COLS = 256
#: Rows read per tensor at least; a block of whole rows is one ranged read.
MIN_ROWS = 8
#: Routed experts sampled per layer (chosen by the expert count alone, so same-architecture models agree).
MAX_EXPERTS = 8
#: Fewest columns a shrunk fingerprint keeps per row.
MIN_COLS = 16
#: Bytes of samples a fingerprint may hold; the disguise-robust section (robust.py, <= 3.5 MB) and the header
#: stay within the 16 MB budget on top.
SAMPLE_BUDGET = 12 * 1024 * 1024
#: Storage dtypes whose values float16 holds exactly after a power-of-two scale.
HALF_EXACT = frozenset({"BF16", "F16", "F8_E4M3", "F8_E5M2"})


def seeded(*parts: object) -> np.random.Generator:
    """A generator seeded by text, identical on every machine and numpy version that keeps PCG64."""
    seed = int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def row_block(rows: int, cols: int) -> tuple[int, int]:
    """(first row, row count) of the block sampled from a (rows x cols) tensor."""
    keep = min(cols, KEEP_COLS)
    n = min(rows, max(MIN_ROWS, -(-TARGET_COORDS // keep)))
    start = 0 if n >= rows else int(seeded("rows", rows, cols).integers(0, rows - n + 1))
    return start, n


@lru_cache(maxsize=4096)
def column_order(rows: int, cols: int) -> np.ndarray:
    """The kept columns of a (rows x cols) tensor, in permutation order (a prefix of it when shrunk)."""
    if cols <= 1:
        return np.zeros(1, dtype=np.int64)
    order = seeded("cols", rows, cols).permutation(cols)[:KEEP_COLS].astype(np.int64)
    order.setflags(write=False)
    return order


@lru_cache(maxsize=256)
def chosen_experts(n_experts: int) -> frozenset[int]:
    if n_experts <= MAX_EXPERTS:
        return frozenset(range(n_experts))
    return frozenset(int(e) for e in seeded("experts", n_experts).permutation(n_experts)[:MAX_EXPERTS])


@dataclass(frozen=True)
class SlotPlan:
    slot: Slot
    part: Part
    dtype: str
    row0: int
    nrows: int
    ncols: int
    structured: bool

    @property
    def store(self) -> str:
        return "f2" if self.dtype in HALF_EXACT else "f4"

    @property
    def nbytes(self) -> int:
        return self.nrows * self.ncols * (2 if self.store == "f2" else 4)


def plan(parts: dict[Slot, Part], dtypes: dict[Slot, str], budget: int = SAMPLE_BUDGET) -> list[SlotPlan]:
    """The sample of every canonical slot (a bounded subset of routed experts), shrunk to fit `budget` bytes."""
    experts_per_layer: dict[int, set[int]] = {}
    for s in parts:
        if is_expert_role(s.role) and s.expert >= 0:
            experts_per_layer.setdefault(s.layer, set()).add(s.expert)
    chosen = {layer: frozenset(sorted(ids)[i] for i in chosen_experts(len(ids)))
              for layer, ids in experts_per_layer.items()}
    out: list[SlotPlan] = []
    for slot, part in sorted(parts.items()):
        if slot.role == "buffer" or part.rows == 0 or part.cols == 0:
            continue
        if is_expert_role(slot.role) and slot.expert >= 0 and slot.expert not in chosen.get(slot.layer, ()):
            continue
        row0, nrows = row_block(part.rows, part.cols)
        ncols = min(part.cols, KEEP_COLS)
        out.append(SlotPlan(slot, part, dtypes[slot], row0, nrows, ncols, is_structured(slot, part)))
    keep = KEEP_COLS
    while sum(p.nbytes for p in out) > budget:
        keep //= 2
        if keep < MIN_COLS:
            raise InputError(f"{len(out)} sampled tensors do not fit a {budget >> 20} MB fingerprint")
        out = [SlotPlan(p.slot, p.part, p.dtype, p.row0, p.nrows, min(p.ncols, keep), p.structured)
               if p.part.cols > 1 else p for p in out]
    return out


def widen_scaled(arr: np.ndarray, exp: int) -> np.ndarray:
    """Stored float16/float32 values times 2**exp as a float32 array: the same numbers as np.ldexp, 3x faster (a
    product by an exact power of two rounds like ldexp); ldexp itself where 2**exp is not a normal float32."""
    out = arr.astype(np.float32)
    if -126 <= exp <= 127:
        out *= np.float32(2.0**exp)
        return out
    return np.ldexp(out, exp)
