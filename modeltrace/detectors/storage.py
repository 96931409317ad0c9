"""Storage dtypes as numbers: how much rounding each float type and GGUF block quantization leaves, which of two
dtypes is the narrower, and rounding a value to a storage dtype. The accumulator (accumulate.py), the verdict and
the family tree's evidence read these; nothing here reads a model.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GGUF_QUANT", "MANTISSA", "PRECISION", "ULP2", "is_block_quantized", "is_lossy", "quant_variance",
           "round_to", "rounding_variance", "ulp_scale", "widen"]

#: mantissa bits of the float storage types whose rounding the detectors model
MANTISSA = {"BF16": 7, "F16": 10, "F8_E4M3": 3, "F8_E5M2": 2}
#: squared ulp of a float32 exponent field e (0..255), per mantissa width, divided by 12 (uniform rounding error)
ULP2 = {m: np.where((np.arange(256) > 0) & (np.arange(256) < 255),
                    np.exp2(2.0 * (np.arange(256) - 127 - m)), 0.0) / 12.0 for m in MANTISSA.values()}


def ulp_scale(mant: int | None) -> float:
    """ULP2[mant][e] / 2**(2 * (e - 127)): what the fused kernel multiplies squared powers of two by."""
    return 0.0 if mant is None else 2.0 ** (-2 * mant) / 12.0


def widen(raw: np.ndarray, shift: int) -> np.ndarray:
    """Stored bf16 (uint16, shift 16) or f32 (uint32, shift 0) bits as a float32 copy."""
    return (raw.astype(np.uint32) << np.uint32(shift)).view(np.float32)


#: GGUF block quantization: (values per scale block, levels, symmetric around 0). The rounding step of a block is
#: 2 max|x| / (levels - 1) (symmetric) or (max - min) / (levels - 1); importance-matrix types are approximated.
GGUF_QUANT = {
    "Q8_0": (32, 255, True), "Q8_1": (32, 255, True), "Q6_K": (16, 65, True), "Q5_0": (32, 33, True),
    "Q5_1": (32, 32, False), "Q5_K": (32, 32, False), "Q4_0": (32, 17, True), "Q4_1": (32, 16, False),
    "Q4_K": (32, 16, False), "Q3_K": (16, 9, True), "Q2_K": (16, 4, False), "IQ4_NL": (32, 16, True),
    "IQ4_XS": (32, 16, True), "IQ3_S": (32, 8, True), "IQ3_XXS": (32, 8, True), "IQ2_XXS": (32, 4, True),
    "IQ2_XS": (32, 4, True), "IQ2_S": (32, 4, True), "IQ1_S": (32, 3, True), "IQ1_M": (32, 3, True),
    "TQ1_0": (32, 3, True), "TQ2_0": (32, 3, True), "MXFP4": (32, 16, True), "NVFP4": (16, 16, True),
}


def is_block_quantized(dtype: str) -> bool:
    """A GGUF block-quantization type (Q8_0, Q6_K, IQ4_XS, ...)."""
    return dtype in GGUF_QUANT


def is_lossy(dtype: str) -> bool:
    """Storage that loses more than bf16 does: block quantization and fp8 (a candidate stored so is noisy)."""
    return is_block_quantized(dtype) or dtype.startswith("F8")


def quant_variance(x: np.ndarray, dtype: str) -> float:
    """Expected squared error of block-quantizing float32 `x` as GGUF `dtype` (uniform within half a step)."""
    block, levels, sym = GGUF_QUANT[dtype]
    x = np.asarray(x, dtype=np.float32)
    cols = x.shape[-1] if x.ndim > 1 else x.size
    b = block if cols % block == 0 else cols
    v = x.reshape(-1, b)
    if sym:
        step = 2 * np.abs(v).max(axis=1) / (levels - 1)
    else:
        step = (v.max(axis=1) - v.min(axis=1)) / (levels - 1)
    return float((step.astype(np.float64) ** 2).sum() * b / 12.0)


def rounding_variance(x: np.ndarray, dtype: str) -> float:
    """Expected squared rounding error of storing float32 `x` in `dtype` (uniform error within half an ulp, or
    half a quantization step for GGUF block types).

    Float types: from a histogram of float32 exponent fields, one cheap integer pass, no logarithms.
    """
    if dtype in GGUF_QUANT:
        return quant_variance(x, dtype)
    mant = MANTISSA.get(dtype)
    if mant is None:
        return 0.0
    e = (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 23) & 0xFF
    return float(np.bincount(e.ravel(), minlength=256) @ ULP2[mant])


#: numpy/ml_dtypes types for rounding a wider candidate to the suspect's storage (recast evidence).
def round_to(x: np.ndarray, dtype: str) -> np.ndarray | None:
    import ml_dtypes

    t = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
         "F8_E5M2": ml_dtypes.float8_e5m2}.get(dtype)
    if t is None:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(t).astype(np.float32)


#: bits of mantissa per storage dtype, to tell which of two float dtypes is the narrower
PRECISION = {"F64": 52, "F32": 23, "BF16": 7, "F16": 10, "F8_E4M3": 3, "F8_E5M2": 2}
