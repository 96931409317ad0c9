"""Checksums of stored fingerprints, and what is wrong with an index entry (if anything).

Data flow: `Index._add` stores `sketch_checksum(content_hash, sketch)` and `blob_checksum(fingerprint)` beside each
entry (index format v2); every read (`Index.sketches`, `Index.load`, `Index.check`) recomputes them and hands the row
to `problem_of`, which names what is wrong in a few words. Entries written before checksums existed (format v1) are
"unverified": they are checked by structure instead (the blob parses, and its recomputed summary vector and content
hash match the stored ones, its numbers are finite and its token keys ascend), which catches random damage in all
but the rarest cases. `Problem` is what `index check`
lists and `index repair` drops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from modeltrace.errors import ModelTraceError
from modeltrace.fingerprint.core import SKETCH_DIM, Fingerprint

__all__ = ["Problem", "blob_checksum", "legacy_problem", "problem_of", "sketch_checksum", "sketch_problem"]

#: float16 summary vectors recomputed from a fingerprint differ from the stored ones by rounding at most
SKETCH_TOLERANCE = 2e-3


@dataclass(frozen=True)
class Problem:
    """A damaged index entry: its name and what is wrong with it, in a few words."""

    name: str
    problem: str


def sketch_checksum(content_hash: str, sketch: bytes) -> str:
    return hashlib.sha256(content_hash.encode() + b"\0" + bytes(sketch)).hexdigest()


def blob_checksum(blob: bytes) -> str:
    return hashlib.sha256(bytes(blob)).hexdigest()


def sketch_problem(content_hash: object, sketch: object, checksum: str | None) -> str | None:
    """What is wrong with an entry's summary vector (None: nothing, or nothing checkable without a checksum)."""
    if not isinstance(sketch, bytes) or len(sketch) != 2 * SKETCH_DIM:
        return "summary vector has the wrong size"
    if checksum is not None and sketch_checksum(str(content_hash), sketch) != checksum:
        return "summary vector does not match its checksum"
    return None


def problem_of(content_hash: object, sketch: object, blob: object, sketch_sum: str | None, blob_sum: str | None
               ) -> str | None:
    """What is wrong with a whole entry, or None. Without checksums (a v1 entry) the structure is checked."""
    bad = sketch_problem(content_hash, sketch, sketch_sum)
    if bad:
        return bad
    if not isinstance(blob, bytes):
        return "fingerprint is missing"
    if blob_sum is not None:
        return None if blob_checksum(blob) == blob_sum else "fingerprint does not match its checksum"
    return legacy_problem(str(content_hash), sketch, blob)  # type: ignore[arg-type]


def legacy_problem(content_hash: str, sketch: bytes, blob: bytes) -> str | None:
    """An entry without checksums: does its fingerprint parse, and agree with the stored hash and summary vector?"""
    try:
        with np.errstate(all="ignore"):
            fp = Fingerprint.from_bytes(blob)
    except ModelTraceError:
        return "fingerprint is unreadable"
    if fp.content_hash != content_hash:
        return "fingerprint does not match the stored content hash"
    r = fp.robust
    arrays = [s.values for s in fp.slots.values()]
    if r is not None:
        arrays += [*r.rows.values(), *r.gains.values(), *r.products.values()]
        if r.keys.size > 1 and not bool((r.keys[1:] > r.keys[:-1]).all()):
            return "fingerprint's token keys are out of order"
    if not all(bool(np.isfinite(a).all()) for a in arrays):
        return "fingerprint holds non-finite numbers"
    with np.errstate(all="ignore"):
        now: np.ndarray = fp.sketch().astype(np.float32)
        stored = np.frombuffer(sketch, dtype="<f2").astype(np.float32)
        if not np.isfinite(stored).all() or not np.isfinite(now).all() or \
                float(np.abs(now - stored).max(initial=0.0)) > SKETCH_TOLERANCE:
            return "fingerprint does not match its summary vector"
    return None
