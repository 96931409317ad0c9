"""The audit's hot loop over stored bf16/f32 bytes: the front the audit and the accumulator call.

The compiled kernels live in jit_kernels.py (numba, imported on the first chunk: ~0.3 s an audit's first weight byte
does not wait for). `available()` says whether they can be used without importing numba; otherwise the numpy path in
accumulate.py computes the same statistics.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

#: Storage dtypes the kernel reads directly: (numpy view of the raw bytes, left shift to float32 bits, used by the
#: numpy path's widening; the kernel specialises on the view's dtype).
RAW = {"BF16": ("<u2", 16), "F32": ("<u4", 0)}

_HAVE_NUMBA: bool | None = None


def itemsize(dtype: str) -> int:
    """Stored bytes per element of a kernel dtype."""
    return np.dtype(RAW[dtype][0]).itemsize


def available() -> bool:
    """True when the compiled kernel can be used (numba installed, not switched off by MODELTRACE_KERNEL)."""
    global _HAVE_NUMBA
    if _HAVE_NUMBA is None:
        _HAVE_NUMBA = importlib.util.find_spec("numba") is not None
    return _HAVE_NUMBA and os.environ.get("MODELTRACE_KERNEL", "numba").lower() != "numpy"


def sqdiff_f32(arrs: tuple[np.ndarray, ...], e: np.ndarray) -> None:
    """Add sum (x_i - x_j)^2 over float32 arrays to e[i, j] (i <= j), exactly, in one compiled pass."""
    from modeltrace.detectors.jit_kernels import sqdiff_f32 as run

    run(arrs, e)


def chunk_stats(arrs: tuple[np.ndarray, ...], cols: int, head_rows: int, ulp_scale: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(G, Gd, E, equal, row sums of the head rows, column sums of the head rows, rounding floor) of one chunk.

    E[i, j] = sum (x_i - x_j)^2, taken in float64 where the difference of two float32 values and its square are
    exact: a residual read off E cannot cancel away (a copy gives exactly 0, a recast its rounding error), unlike
    G_ii - 2 G_ij + G_jj, whose error is that of G's largest entry.

    `arrs`: the same rows of one slot in every model (suspect first), raw 1-D uint16 (bf16) or uint32 (f32).
    `ulp_scale`: 2**(-2 * mantissa bits) / 12 of the suspect's storage dtype (0 for float32: no floor).
    G and Gd come back upper-triangular-filled and symmetrised here.
    """
    m = len(arrs)
    g = np.zeros((m, m))
    gd = np.zeros((m, m))
    e = np.zeros((m, m))
    eq = np.zeros(m, dtype=np.int64)
    rowsum = np.zeros((m, head_rows))
    colsum = np.zeros((m, cols))
    from modeltrace.detectors.jit_kernels import chunk

    noise = chunk(tuple(arrs), cols, head_rows, float(ulp_scale), g, gd, e, eq, rowsum, colsum)
    for x in (g, gd, e):
        x += np.triu(x, 1).T
    return g, gd, e, eq, rowsum, colsum, float(noise)


__all__ = ["available", "chunk_stats", "itemsize", "sqdiff_f32", "RAW"]
