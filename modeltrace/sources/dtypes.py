"""Storage dtypes of checkpoints and how to view their bytes as numpy arrays (bf16/fp8 through ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# safetensors dtype string -> little-endian numpy dtype.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def itemsize(dtype: str) -> int:
    return SAFETENSORS_DTYPES[dtype].itemsize


def decode(raw: bytes | bytearray | memoryview, dtype: str) -> np.ndarray:
    """View raw little-endian bytes as `dtype` and convert to float32 (one copy).

    bf16 is the top half of a float32, so it widens with a shift instead of ml_dtypes' slower element-wise cast.
    """
    if dtype == "BF16":
        u16 = np.frombuffer(raw, dtype="<u2")
        out = np.empty(u16.shape, dtype=np.uint32)
        np.left_shift(u16, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    arr = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[dtype])
    return arr.astype(np.float32)
