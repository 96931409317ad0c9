"""Fused chunk statistics over stored bf16/f32 bytes: the audit's hot loop, compiled with numba.

The numpy path decodes every chunk to a float32 copy (a full extra write and read of twice the stored bytes) and
then makes several passes over it (Gram, equality counts, sums, exponent histogram). Here every element is loaded
once, widened in a register and fed to all the sums of its block, so the stored bytes are read once, in place
(from the page cache when the store can map files).

bf16 is the top half of a float32 and f32 is itself, so one widening serves both: `bits << shift` reinterpreted as
float32, with shift 16 for bf16 (read as uint16) and 0 for f32 (read as uint32). Products of bf16 values are exact
in float32, and float32 block sums of 256 products added in float64 stay within ~5e-8 relative, better than
the numpy path's float32 BLAS blocks.

numba is optional at import: without it (or with MODELTRACE_KERNEL=numpy) `available()` is False and the audit
uses the numpy path, which computes the same statistics.
"""

from __future__ import annotations

import os

import numpy as np

try:  # pragma: no cover - exercised by whichever path the environment has
    import numba as _nb
except ImportError:  # pragma: no cover
    _nb = None

#: Elements per float32 partial sum (then added in float64): 256 keeps the Gram within ~5e-8 relative on AVX2
#: (4e-8 measured; 512 gave 1.5e-7, while 128 costs 15% more time for 2e-8).
BLOCK = 256
#: Storage dtypes the kernel reads directly, and how: (numpy view of the raw bytes, left shift to float32 bits).
RAW = {"BF16": ("<u2", 16), "F32": ("<u4", 0)}


def itemsize(dtype: str) -> int:
    """Stored bytes per element of a kernel dtype."""
    return np.dtype(RAW[dtype][0]).itemsize


def available() -> bool:
    """True when the compiled kernel can be used (numba importable, not switched off by MODELTRACE_KERNEL)."""
    return _nb is not None and os.environ.get("MODELTRACE_KERNEL", "numba").lower() != "numpy"


def _identity(fn):  # noqa: ANN001, ANN202
    return fn


#: numba compiles each function lazily on its first call and caches it on disk, so importing costs nothing.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; NaN/Inf semantics kept (they are detected)
njit = _nb.njit(nogil=True, fastmath=_FASTMATH, cache=True) if _nb is not None else _identity

if _nb is not None:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def _bits_to_f32(typingctx, bits):  # noqa: ANN001, ANN202, ARG001
        """Reinterpret uint32 bits as float32 (an LLVM bitcast): lets the widening vectorise inside the sums."""
        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen
else:  # pragma: no cover
    def _bits_to_f32(bits):  # noqa: ANN001, ANN202
        return np.uint32(bits).view(np.float32)


@njit
def f32(v, shift):  # noqa: ANN001, ANN202
    return _bits_to_f32(np.uint32(v) << np.uint32(shift))


@njit
def fused3(x, y, z, shift, g, eq):  # noqa: ANN001, ANN202
    """Gram and equality counts of three blocks in one pass: each element loaded and widened once (2x faster than
    pairwise dots, for the common audit of a suspect against two candidates)."""
    s00 = s01 = s02 = s11 = s12 = s22 = np.float32(0.0)
    e1 = e2 = 0
    for k in range(x.shape[0]):
        a, b, c = f32(x[k], shift), f32(y[k], shift), f32(z[k], shift)
        s00 += a * a
        s01 += a * b
        s02 += a * c
        s11 += b * b
        s12 += b * c
        s22 += c * c
        e1 += np.int32(a == b)
        e2 += np.int32(a == c)
    g[0, 0] += s00
    g[0, 1] += s01
    g[0, 2] += s02
    g[1, 1] += s11
    g[1, 2] += s12
    g[2, 2] += s22
    eq[1] += e1
    eq[2] += e2


@njit
def fused2(x, y, shift, g, eq):  # noqa: ANN001, ANN202
    """Gram and equality count of two blocks in one pass (a suspect against one candidate)."""
    s00 = s01 = s11 = np.float32(0.0)
    e1 = 0
    for k in range(x.shape[0]):
        a, b = f32(x[k], shift), f32(y[k], shift)
        s00 += a * a
        s01 += a * b
        s11 += b * b
        e1 += np.int32(a == b)
    g[0, 0] += s00
    g[0, 1] += s01
    g[1, 1] += s11
    eq[1] += e1


@njit
def fused4(w, x, y, z, shift, g, eq):  # noqa: ANN001, ANN202
    """Gram and equality counts of four blocks in one pass (a suspect, two parents and their base)."""
    s00 = s01 = s02 = s03 = s11 = s12 = s13 = s22 = s23 = s33 = np.float32(0.0)
    e1 = e2 = e3 = 0
    for k in range(w.shape[0]):
        a, b, c, d = f32(w[k], shift), f32(x[k], shift), f32(y[k], shift), f32(z[k], shift)
        s00 += a * a
        s01 += a * b
        s02 += a * c
        s03 += a * d
        s11 += b * b
        s12 += b * c
        s13 += b * d
        s22 += c * c
        s23 += c * d
        s33 += d * d
        e1 += np.int32(a == b)
        e2 += np.int32(a == c)
        e3 += np.int32(a == d)
    g[0, 0] += s00
    g[0, 1] += s01
    g[0, 2] += s02
    g[0, 3] += s03
    g[1, 1] += s11
    g[1, 2] += s12
    g[1, 3] += s13
    g[2, 2] += s22
    g[2, 3] += s23
    g[3, 3] += s33
    eq[1] += e1
    eq[2] += e2
    eq[3] += e3


@njit
def pair(x, y, shift):  # noqa: ANN001, ANN202
    """Dot product and equality count of two blocks."""
    s = np.float32(0.0)
    e = 0
    for k in range(x.shape[0]):
        a, b = f32(x[k], shift), f32(y[k], shift)
        s += a * b
        e += np.int32(a == b)
    return s, e


@njit
def block(arrs, lo, hi, shift, g, eq):  # noqa: ANN001, ANN202
    """Add the Gram and equality counts of elements [lo, hi) (at most BLOCK: float32 partial sums stay exact to
    ~1e-7 relative)."""
    m = len(arrs)
    if m == 2:
        fused2(arrs[0][lo:hi], arrs[1][lo:hi], shift, g, eq)
    elif m == 3:
        fused3(arrs[0][lo:hi], arrs[1][lo:hi], arrs[2][lo:hi], shift, g, eq)
    elif m == 4:
        fused4(arrs[0][lo:hi], arrs[1][lo:hi], arrs[2][lo:hi], arrs[3][lo:hi], shift, g, eq)
    else:
        for i in range(m):
            x = arrs[i][lo:hi]
            for j in range(i, m):
                s, e = pair(x, arrs[j][lo:hi], shift)
                g[i, j] += s
                if i == 0 and j > 0:
                    eq[j] += e


@njit
def chunk(arrs, shift, cols, head_rows, ulp2, g, gd, eq, rowsum, colsum):  # noqa: ANN001, ANN202
    """Statistics of one chunk: the first `head_rows` rows row by row (Gram into gd and g, row and column sums,
    the suspect's rounding floor), the rest in flat blocks (Gram and equality only). Returns the floor."""
    m = len(arrs)
    size = arrs[0].shape[0]
    noise = 0.0
    for r in range(head_rows):
        base = r * cols
        for c0 in range(0, cols, BLOCK):
            c1 = min(c0 + BLOCK, cols)
            block(arrs, base + c0, base + c1, shift, gd, eq)
            for i in range(m):
                x = arrs[i][base + c0:base + c1]
                cs = colsum[i, c0:c1]
                t = np.float32(0.0)
                for k in range(c1 - c0):
                    v = f32(x[k], shift)
                    t += v
                    cs[k] += v
                rowsum[i, r] += t
            x = arrs[0][base + c0:base + c1]
            for k in range(c1 - c0):
                noise += ulp2[(np.uint32(x[k]) << np.uint32(shift)) >> np.uint32(23) & np.uint32(0xFF)]
    for lo in range(head_rows * cols, size, BLOCK):
        block(arrs, lo, min(lo + BLOCK, size), shift, g, eq)
    for i in range(m):
        for j in range(i, m):
            g[i, j] += gd[i, j]
    return noise


def chunk_stats(arrs: tuple[np.ndarray, ...], shift: int, cols: int, head_rows: int, ulp2: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(G, Gd, equal, row sums of the head rows, column sums of the head rows, rounding floor) of one chunk.

    `arrs`: the same rows of one slot in every model (suspect first), raw 1-D uint16 (bf16) or uint32 (f32).
    G and Gd come back upper-triangular-filled and symmetrised here.
    """
    m = len(arrs)
    g = np.zeros((m, m))
    gd = np.zeros((m, m))
    eq = np.zeros(m, dtype=np.int64)
    rowsum = np.zeros((m, head_rows))
    colsum = np.zeros((m, cols))
    noise = chunk(tuple(arrs), shift, cols, head_rows, ulp2, g, gd, eq, rowsum, colsum)
    for x in (g, gd):
        x += np.triu(x, 1).T
    return g, gd, eq, rowsum, colsum, float(noise)


__all__ = ["available", "chunk_stats", "itemsize", "RAW", "BLOCK"]
