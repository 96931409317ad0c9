"""Fused chunk statistics over stored bf16/f32 bytes: the audit's hot loop, compiled with numba.

The numpy path decodes every chunk to a float32 copy (a full extra write and read of twice the stored bytes) and
then makes several passes over it (Gram, equality counts, sums, exponent histogram). Here every element is loaded
once, widened in a register and fed to all the sums of its block, so the stored bytes are read once, in place
(from the page cache when the store can map files).

bf16 is the top half of a float32 and f32 is itself: bf16 is read as uint16, zero-extended and shifted up by 16,
f32 as uint32, and the bits reinterpreted as float32, all in 32-bit lanes so the loops vectorise 8 wide on AVX2
(~11 GB/s of stored bytes per core for three models, measured). Products of bf16 values are exact in float32, and
float32 block sums of 256 products added in float64 stay within ~5e-8 relative, better than the numpy path's float32
BLAS blocks.

This module imports numba (~0.3 s): kernels.py, the front the audit uses, imports it on the first chunk, after the
first weight byte was read. Without numba (or with MODELTRACE_KERNEL=numpy) the audit uses the numpy path, which
computes the same statistics.
"""

from __future__ import annotations

import numpy as np

try:  # pragma: no cover - exercised by whichever path the environment has
    import numba as _nb
except ImportError:  # pragma: no cover
    _nb = None  # kernels.available() is then False and nothing here is called

#: Elements per float32 partial sum (then added in float64): 256 keeps the Gram within ~5e-8 relative on AVX2
#: (4e-8 measured; 512 gave 1.5e-7, while 128 costs 15% more time for 2e-8).
BLOCK = 256
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
    def _bits(typingctx, raw):  # noqa: ANN001, ANN202, ARG001
        """float32 bits of one stored element, in 32-bit integer lanes: bf16 (uint16) zero-extended and shifted up
        by 16, f32 (uint32) as it is. Typed per dtype, so LLVM sees 32-bit lanes and vectorises 8 wide on AVX2
        (a runtime shift made numba widen to 64 bits and run 4 wide, 2.4x slower)."""
        if raw == types.uint16:
            def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
                x = builder.zext(args[0], ir.IntType(32))
                return builder.shl(x, ir.Constant(ir.IntType(32), 16))
            return types.uint32(types.uint16), codegen
        if raw == types.uint32:
            def codegen32(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
                return args[0]
            return types.uint32(types.uint32), codegen32
        return None

    @intrinsic
    def _as_f32(typingctx, bits):  # noqa: ANN001, ANN202, ARG001
        """Reinterpret uint32 bits as float32 (an LLVM bitcast)."""
        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen
else:  # pragma: no cover
    def _bits(raw):  # noqa: ANN001, ANN202
        return np.uint32(raw) << np.uint32(16 if np.asarray(raw).dtype == np.uint16 else 0)

    def _as_f32(bits):  # noqa: ANN001, ANN202
        return np.uint32(bits).view(np.float32)


@njit
def f32(v):  # noqa: ANN001, ANN202
    """One stored bf16 (uint16) or f32 (uint32) element as float32."""
    return _as_f32(_bits(v))


#: Equality counts are float32 sums of 0/1 inside a block (exact below 2**24, blocks are far shorter): integer
#: counters were widened to 64 bits by numba and kept the loop from vectorising 8 wide.
_ONE, _ZERO = np.float32(1.0), np.float32(0.0)


@njit
def fused3(x, y, z, lo, hi, g, e, eq):  # noqa: ANN001, ANN202
    """Gram, squared pairwise differences and equality counts of elements [lo, hi) of three arrays in one pass: each
    element loaded and widened once (2x faster than pairwise dots, for the common audit of a suspect against two
    candidates). Gram: float32 sums within blocks of BLOCK elements, float64 across them. Differences: taken and
    squared in float64, where both are exact (see `e` in `chunk_stats`)."""
    t00 = t01 = t02 = t11 = t12 = t22 = 0.0
    q01 = q02 = q12 = 0.0
    n1 = n2 = 0
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        xs, ys, zs = x[b0:b1], y[b0:b1], z[b0:b1]  # views over a range from 0: numba drops the index checks
        s00 = s01 = s02 = s11 = s12 = s22 = e1 = e2 = np.float32(0.0)
        for k in range(xs.shape[0]):
            a, b, c = f32(xs[k]), f32(ys[k]), f32(zs[k])
            s00 += a * a
            s01 += a * b
            s02 += a * c
            s11 += b * b
            s12 += b * c
            s22 += c * c
            da, db, dc = np.float64(a), np.float64(b), np.float64(c)
            q01 += (da - db) * (da - db)
            q02 += (da - dc) * (da - dc)
            q12 += (db - dc) * (db - dc)
            e1 += _ONE if a == b else _ZERO
            e2 += _ONE if a == c else _ZERO
        t00 += s00
        t01 += s01
        t02 += s02
        t11 += s11
        t12 += s12
        t22 += s22
        n1 += np.int64(e1)
        n2 += np.int64(e2)
    g[0, 0] += t00
    g[0, 1] += t01
    g[0, 2] += t02
    g[1, 1] += t11
    g[1, 2] += t12
    g[2, 2] += t22
    e[0, 1] += q01
    e[0, 2] += q02
    e[1, 2] += q12
    eq[1] += n1
    eq[2] += n2


@njit
def fused2(x, y, lo, hi, g, e, eq):  # noqa: ANN001, ANN202
    """`fused3` for two arrays (a suspect against one candidate)."""
    t00 = t01 = t11 = 0.0
    q01 = 0.0
    n1 = 0
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        xs, ys = x[b0:b1], y[b0:b1]
        s00 = s01 = s11 = e1 = np.float32(0.0)
        for k in range(xs.shape[0]):
            a, b = f32(xs[k]), f32(ys[k])
            s00 += a * a
            s01 += a * b
            s11 += b * b
            da, db = np.float64(a), np.float64(b)
            q01 += (da - db) * (da - db)
            e1 += _ONE if a == b else _ZERO
        t00 += s00
        t01 += s01
        t11 += s11
        n1 += np.int64(e1)
    g[0, 0] += t00
    g[0, 1] += t01
    g[1, 1] += t11
    e[0, 1] += q01
    eq[1] += n1


@njit
def fused4(w, x, y, z, lo, hi, g, e, eq):  # noqa: ANN001, ANN202
    """`fused3` for four arrays (a suspect, two parents and their base)."""
    t00 = t01 = t02 = t03 = t11 = t12 = t13 = t22 = t23 = t33 = 0.0
    q01 = q02 = q03 = q12 = q13 = q23 = 0.0
    n1 = n2 = n3 = 0
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        ws, xs, ys, zs = w[b0:b1], x[b0:b1], y[b0:b1], z[b0:b1]
        s00 = s01 = s02 = s03 = s11 = s12 = s13 = s22 = s23 = s33 = e1 = e2 = e3 = np.float32(0.0)
        for k in range(ws.shape[0]):
            a, b, c, d = f32(ws[k]), f32(xs[k]), f32(ys[k]), f32(zs[k])
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
            fa, fb, fc, fd = np.float64(a), np.float64(b), np.float64(c), np.float64(d)
            q01 += (fa - fb) * (fa - fb)
            q02 += (fa - fc) * (fa - fc)
            q03 += (fa - fd) * (fa - fd)
            q12 += (fb - fc) * (fb - fc)
            q13 += (fb - fd) * (fb - fd)
            q23 += (fc - fd) * (fc - fd)
            e1 += _ONE if a == b else _ZERO
            e2 += _ONE if a == c else _ZERO
            e3 += _ONE if a == d else _ZERO
        t00 += s00
        t01 += s01
        t02 += s02
        t03 += s03
        t11 += s11
        t12 += s12
        t13 += s13
        t22 += s22
        t23 += s23
        t33 += s33
        n1 += np.int64(e1)
        n2 += np.int64(e2)
        n3 += np.int64(e3)
    g[0, 0] += t00
    g[0, 1] += t01
    g[0, 2] += t02
    g[0, 3] += t03
    g[1, 1] += t11
    g[1, 2] += t12
    g[1, 3] += t13
    g[2, 2] += t22
    g[2, 3] += t23
    g[3, 3] += t33
    e[0, 1] += q01
    e[0, 2] += q02
    e[0, 3] += q03
    e[1, 2] += q12
    e[1, 3] += q13
    e[2, 3] += q23
    eq[1] += n1
    eq[2] += n2
    eq[3] += n3


@njit
def pair(x, y, lo, hi):  # noqa: ANN001, ANN202
    """Dot product, squared difference and equality count of elements [lo, hi) of two arrays."""
    t = q = 0.0
    n = 0
    for b0 in range(lo, hi, BLOCK):
        b1 = min(b0 + BLOCK, hi)
        xs, ys = x[b0:b1], y[b0:b1]
        s = e = np.float32(0.0)
        for k in range(xs.shape[0]):
            a, b = f32(xs[k]), f32(ys[k])
            s += a * b
            da, db = np.float64(a), np.float64(b)
            q += (da - db) * (da - db)
            e += _ONE if a == b else _ZERO
        t += s
        n += np.int64(e)
    return t, q, n


@njit
def span(arrs, lo, hi, g, e, eq):  # noqa: ANN001, ANN202
    """Add the Gram, squared differences and equality counts of elements [lo, hi) of every array (float32 partial
    sums over BLOCK elements stay exact to ~5e-8 relative; differences are exact)."""
    m = len(arrs)
    if m == 2:
        fused2(arrs[0], arrs[1], lo, hi, g, e, eq)
    elif m == 3:
        fused3(arrs[0], arrs[1], arrs[2], lo, hi, g, e, eq)
    elif m == 4:
        fused4(arrs[0], arrs[1], arrs[2], arrs[3], lo, hi, g, e, eq)
    else:
        for i in range(m):
            for j in range(i, m):
                s, q, c = pair(arrs[i], arrs[j], lo, hi)
                g[i, j] += s
                e[i, j] += q
                if i == 0 and j > 0:
                    eq[j] += c


@njit
def sqdiff_f32(arrs, e):  # noqa: ANN001, ANN202
    """E[i, j] += sum (x_i - x_j)^2 of flat float32 arrays, differences and squares in float64 (exact)."""
    m = len(arrs)
    for i in range(m):
        for j in range(i + 1, m):
            a, b = arrs[i], arrs[j]
            q = 0.0
            for k in range(a.shape[0]):
                d = np.float64(a[k]) - np.float64(b[k])
                q += d * d
            e[i, j] += q
            e[j, i] += q


#: float32 bits of the exponent field: masked off, they are the float 2**(e - 127) of a normal number, 0 for zeros
#: and subnormals (chunks with Inf/NaN are recomputed on the numpy path, so e = 255 never counts).
_EXP_MASK = np.uint32(0x7F800000)


@njit
def chunk(arrs, cols, head_rows, ulp_scale, g, gd, e, eq, rowsum, colsum):  # noqa: ANN001, ANN202
    """Statistics of one chunk: the first `head_rows` rows row by row (Gram into gd and g, row and column sums,
    the suspect's rounding floor), the rest in flat blocks (Gram and equality only). Returns the floor:
    sum over the suspect's head elements of ulp(x)**2 / 12 = (2**(e - 127))**2 * ulp_scale."""
    m = len(arrs)
    size = arrs[0].shape[0]
    noise = 0.0
    for r in range(head_rows):
        base = r * cols
        for c0 in range(0, cols, BLOCK):
            c1 = min(c0 + BLOCK, cols)
            span(arrs, base + c0, base + c1, gd, e, eq)
            for i in range(m):
                x = arrs[i][base + c0:base + c1]
                cs = colsum[i][c0:c1]
                t = np.float32(0.0)
                for k in range(x.shape[0]):
                    v = f32(x[k])
                    t += v
                    cs[k] += v
                rowsum[i, r] += t
            x = arrs[0][base + c0:base + c1]
            q = 0.0
            for k in range(x.shape[0]):
                p = np.float64(_as_f32(_bits(x[k]) & _EXP_MASK))
                q += p * p
            noise += q * ulp_scale
    span(arrs, head_rows * cols, size, g, e, eq)
    for i in range(m):
        for j in range(i, m):
            g[i, j] += gd[i, j]
    return noise


__all__ = ["chunk", "sqdiff_f32"]
