"""Content identity of a model, independent of how it is stored: a per-tensor digest manifest and a model digest.

Data flow: `content_digest(source)` lists the source's tensors (any Source: local safetensors or shards, GGUF,
hf://, restricted pickles), and for each one streams its stored bytes in row-major, little-endian order in windows
of bounded size (local files mapped in place, others read by row range) into a BLAKE3 hasher, on a few threads,
one tensor per task. Each tensor gives a `TensorDigest` (name, dtype, shape, digest of the stored values) and a
*value digest*: the digest of its values in their canonical float type, the first of BF16, F16, F32, F64 that holds
every value exactly (streamed candidates are dropped as soon as a value does not fit, so a bf16 tensor costs one
hash and an f32 one a check). The model digest is BLAKE3 over the sorted manifest lines (name, dtype, shape,
digest); the values digest over (name, shape, value digest). Hence:

- re-sharded, renamed files, re-ordered tensors, another container: the same model digest (files play no part);
- converted to another dtype exactly (bf16 -> f32) : another model digest, the same values digest ("same values,
  other dtype"); converted there and back: the same model digest;
- one changed element: another model digest and another values digest, and `compare` names the tensor.

Integer and quantized (GGUF block) tensors take their stored bytes as their value form: a re-quantization is
another identity.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import ml_dtypes
import numpy as np

from modeltrace.errors import InputError
from modeltrace.sources.base import Source, TensorInfo
from modeltrace.sources.dtypes import SAFETENSORS_DTYPES

__all__ = ["SCHEME", "PREFIX", "VALUES_PREFIX", "TensorDigest", "ContentDigest", "Comparison", "content_digest",
           "digest_model", "compare", "parse_digest"]

SCHEME = "modeltrace-content/1"
#: printed forms: model digest "mtc1:<hex>", values digest "mtv1:<hex>"
PREFIX = "mtc1:"
VALUES_PREFIX = "mtv1:"
#: bytes per window of a tensor (mapped in place for local files; read as one range for others)
WINDOW = 16 * 1024 * 1024
#: order of canonical value forms: the first that holds every value exactly wins
VALUE_FORMS = ("BF16", "F16", "F32", "F64")
_F8 = {"F8_E4M3", "F8_E5M2"}  # every value is exact in BF16


@dataclass(frozen=True)
class TensorDigest:
    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str  # BLAKE3 of the stored values, row-major little-endian
    value_dtype: str  # canonical value form (narrowest exact float type; the stored dtype for non-floats)
    value_digest: str

    def line(self) -> str:
        return f"{self.name}\t{self.dtype}\t{list(self.shape)}\t{self.digest}\n"

    def value_line(self) -> str:
        return f"{self.name}\t{list(self.shape)}\t{self.value_digest}\n"


@dataclass(frozen=True)
class ContentDigest:
    """A model's content identity; `model` and `values` are hex digests (printed with PREFIX / VALUES_PREFIX)."""

    model: str
    values: str
    tensors: tuple[TensorDigest, ...]
    bytes_hashed: int = 0
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)  # weight file -> SHA-256 where known for free (hf:// LFS)

    @property
    def model_id(self) -> str:
        return PREFIX + self.model

    @property
    def values_id(self) -> str:
        return VALUES_PREFIX + self.values

    def manifest_text(self) -> str:
        return "".join(t.line() for t in self.tensors)

    def to_dict(self) -> dict:
        return {"scheme": SCHEME, "algorithm": "blake3", "model_digest": self.model_id,
                "values_digest": self.values_id, "tensors": len(self.tensors), "bytes_hashed": self.bytes_hashed,
                "seconds": round(self.seconds, 3), "files": dict(self.files),
                "manifest": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "digest": t.digest,
                              "value_dtype": t.value_dtype, "value_digest": t.value_digest} for t in self.tensors]}

    @classmethod
    def from_dict(cls, d: dict, where: str = "content digest") -> ContentDigest:
        try:
            if d.get("scheme") != SCHEME:
                raise InputError(f"{where}: digest scheme {d.get('scheme')!r} is not {SCHEME}")
            tensors = tuple(TensorDigest(str(t["name"]), str(t["dtype"]), tuple(int(x) for x in t["shape"]),
                                         str(t["digest"]), str(t["value_dtype"]), str(t["value_digest"]))
                            for t in d["manifest"])
            out = _finish(list(tensors), int(d.get("bytes_hashed", 0)), float(d.get("seconds", 0.0)),
                          dict(d.get("files") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{where}: malformed content digest ({type(exc).__name__})") from None
        if out.model_id != d.get("model_digest") or out.values_id != d.get("values_digest"):
            raise InputError(f"{where}: the model digest does not match its manifest")
        return out


@dataclass(frozen=True)
class Comparison:
    """How two content digests relate."""

    relation: str  # identical | same-values | different
    text: str
    differing: tuple[str, ...] = ()  # tensors whose values differ
    recast: tuple[str, ...] = ()  # tensors with the same values in another dtype
    only_a: tuple[str, ...] = ()
    only_b: tuple[str, ...] = ()


def parse_digest(text: str) -> tuple[str, str]:
    """('model' | 'values' | 'sha256', hex) from a printed digest; bare 64-hex strings are taken as either."""
    t = text.strip().lower()
    kind = "any"
    for prefix, what in ((PREFIX, "model"), (VALUES_PREFIX, "values"), ("sha256:", "sha256")):
        if t.startswith(prefix):
            t, kind = t[len(prefix):], what
            break
    if len(t) != 64 or any(c not in "0123456789abcdef" for c in t):
        raise InputError(f"{text!r} is not a digest (expected {PREFIX}HEX, {VALUES_PREFIX}HEX, sha256:HEX or 64 hex "
                         "digits)")
    return kind, t


def _finish(tensors: list[TensorDigest], nbytes: int, seconds: float, files: dict[str, str]) -> ContentDigest:
    tensors.sort(key=lambda t: t.name)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise InputError("content digest: a tensor name appears twice")
    model = blake3.blake3((SCHEME + "\n" + "".join(t.line() for t in tensors)).encode()).hexdigest()
    values = blake3.blake3((SCHEME + " values\n" + "".join(t.value_line() for t in tensors)).encode()).hexdigest()
    return ContentDigest(model, values, tuple(tensors), nbytes, seconds, files)


# ---- hashing ------------------------------------------------------------------------------------------------------
def _narrow(vals: np.ndarray, form: str) -> np.ndarray | None:
    """`vals` (float32 or float64) in `form` as little-endian bytes-like, or None when a value does not fit."""
    if form == "F32":
        f32 = vals.astype(np.float32)
        return f32 if _same_bits(f32.astype(np.float64), vals) else None
    if vals.dtype == np.float64:
        vals = _narrow(vals, "F32")
        if vals is None:
            return None
    if form == "BF16":  # exact iff the low half of every float32 is zero; the value is then the high half
        halves = vals.view("<u2").reshape(-1, 2)
        return None if halves[:, 0].any() else np.ascontiguousarray(halves[:, 1])
    f16 = vals.astype(np.float16)
    return f16 if _same_bits(f16.astype(np.float32), vals) else None


class _ValueForm:
    """The canonical value form of a float tensor, found in one pass in the common cases.

    Candidates are tried narrowest first (BF16, F16, F32 below the stored type); only the current one is hashed. A
    candidate that fails on the first window gives way to the next on the same window; one that fails later (the
    tensor's first windows fit, a later one does not) leaves `restart` set: the caller re-reads the tensor for the
    remaining candidates. None left: the stored form is canonical."""

    def __init__(self, dtype: str, candidates: tuple[str, ...]) -> None:
        self.dtype = dtype
        self.candidates = list(candidates)
        self.hasher = blake3.blake3()
        self.fed = False
        self.restart = False

    @staticmethod
    def for_dtype(dtype: str) -> _ValueForm | None:
        if dtype in _F8:
            return _ValueForm(dtype, ("BF16",))
        if dtype in VALUE_FORMS and dtype != "BF16":
            return _ValueForm(dtype, VALUE_FORMS[:VALUE_FORMS.index(dtype)])
        return None

    def update(self, raw: np.ndarray) -> None:
        if self.restart or not self.candidates:
            return
        vals = raw.view(SAFETENSORS_DTYPES[self.dtype])
        if vals.dtype not in (np.float32, np.float64):
            vals = vals.astype(np.float32)  # F16, F8: exact
        while self.candidates:
            narrow = _narrow(vals, self.candidates[0])
            if narrow is not None:
                self.hasher.update(narrow.view(np.uint8))
                self.fed = True
                return
            if self.fed:
                self.restart = True
                self.candidates.pop(0)
                return
            self.candidates.pop(0)

    def result(self) -> tuple[str, str] | None:
        return (self.candidates[0], self.hasher.hexdigest()) if self.candidates and not self.restart else None


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))


def _each_window(source: Source, info: TensorInfo, fn: Callable[[np.ndarray], None]) -> None:
    """Call `fn` on the tensor's stored bytes (uint8), row-major little-endian, in windows of about WINDOW bytes;
    local files are mapped in place, so a window lives only during its call."""
    swap = bool(getattr(source, "_swapped", False))  # big-endian GGUF: canonical order is little-endian
    item = SAFETENSORS_DTYPES.get(info.dtype)
    if len(info.shape) <= 1 or info.rows <= 1:
        spans = [(0, info.rows)]
    else:
        row_bytes = max(1, info.nbytes // info.rows)
        step = max(1, WINDOW // row_bytes)
        spans = [(a, min(a + step, info.rows)) for a in range(0, info.rows, step)]
    for a, b in spans:
        if source.can_map:
            with source.mapped_rows(info.name, a, b) as arr:
                if arr is not None:
                    fn(arr)
                    continue
        data = source.read_raw(info.name, a, b)
        if swap and item is not None and item.itemsize > 1:
            data = np.frombuffer(data, dtype=item.newbyteorder()).astype(item).tobytes()
        fn(np.frombuffer(data, dtype=np.uint8))


def _digest_tensor(source: Source, info: TensorInfo, progress: Callable[[int], None] | None) -> TensorDigest:
    h = blake3.blake3()
    form = _ValueForm.for_dtype(info.dtype)
    seen = [0]

    def feed(win: np.ndarray) -> None:
        h.update(win)
        if form is not None:
            form.update(win)
        seen[0] += win.nbytes
        if progress is not None:
            progress(win.nbytes)

    _each_window(source, info, feed)
    if seen[0] != info.nbytes:
        raise InputError(f"{source.location}: {info.name}: read {seen[0]} bytes, expected {info.nbytes}")
    digest = h.hexdigest()
    while form is not None and form.restart:  # rare: a narrower form held the first windows only
        form = _ValueForm(info.dtype, tuple(form.candidates))
        _each_window(source, info, form.update)
    vf = form.result() if form is not None else None
    value_dtype, value_digest = vf if vf is not None else (info.dtype, digest)
    return TensorDigest(info.name, info.dtype, tuple(info.shape), digest, value_dtype, value_digest)


def content_digest(source: Source, workers: int | None = None,
                   progress: Callable[[int], None] | None = None) -> ContentDigest:
    """The content identity of every tensor of `source`, streamed in bounded memory (one window per worker)."""
    t0 = time.perf_counter()
    infos = sorted(source.tensors().values(), key=lambda t: -t.nbytes)  # big first: threads finish together
    if not infos:
        raise InputError(f"{source.location}: no tensors to digest")
    remote = source.location.startswith("hf://")
    n = workers or (8 if remote else min(4, os.cpu_count() or 1))
    if not source.thread_safe:
        n = 1
    if n <= 1:
        digests = [_digest_tensor(source, i, progress) for i in infos]
    else:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="modeltrace-digest") as pool:
            digests = list(pool.map(lambda i: _digest_tensor(source, i, progress), infos))
    lfs = getattr(getattr(source, "store", None), "lfs_sha256", None) or {}
    files = {f: lfs[f] for f in sorted({i.file for i in infos}) if f in lfs}
    return _finish(digests, sum(i.nbytes for i in infos), time.perf_counter() - t0, files)



def digest_model(spec: str, allow_pickle: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> ContentDigest:
    """The content digest of the model at `spec` (opened here, every tensor read once); `progress(done, total)` in
    bytes as the windows are hashed (the one progress loop `identify --digest` and `index add --digest` share)."""
    import threading

    from modeltrace.sources import open_source

    with open_source(spec, allow_pickle=allow_pickle) as src:
        total = sum(t.nbytes for t in src.tensors().values())
        done = [0]
        lock = threading.Lock()

        def advance(n: int) -> None:
            with lock:
                done[0] += n
                if progress is not None:
                    progress(done[0], total)

        return content_digest(src, progress=advance)

# ---- comparison ---------------------------------------------------------------------------------------------------
def compare(a: ContentDigest, b: ContentDigest) -> Comparison:
    """identical (same model digest), same values in another dtype, or different (naming what differs)."""
    if a.model == b.model:
        return Comparison("identical", f"identical content ({a.model_id[:17]}…): every tensor, dtype and value")
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    only_a = tuple(sorted(set(ta) - set(tb)))
    only_b = tuple(sorted(set(tb) - set(ta)))
    common = sorted(set(ta) & set(tb))
    differing = tuple(n for n in common if ta[n].value_digest != tb[n].value_digest or ta[n].shape != tb[n].shape)
    recast = tuple(n for n in common if n not in differing and ta[n].dtype != tb[n].dtype)
    if a.values == b.values:
        kinds = sorted({f"{ta[n].dtype}->{tb[n].dtype}" for n in recast})
        return Comparison("same-values", f"same values, other dtype: {len(recast)} tensors stored differently "
                          f"({', '.join(kinds)}); every value equal", recast=recast)
    parts = []
    if differing:
        parts.append(f"{len(differing)} of {len(common)} common tensors differ in value (e.g. {differing[0]})")
    if only_a or only_b:
        parts.append(f"{len(only_a)} tensors only in the first, {len(only_b)} only in the second")
    if recast:
        parts.append(f"{len(recast)} more hold the same values in another dtype")
    return Comparison("different", "different content: " + "; ".join(parts or ["tensor names or shapes differ"]),
                      differing, recast, only_a, only_b)


def dumps(d: ContentDigest) -> str:
    return json.dumps(d.to_dict(), indent=1) + "\n"


def loads_digest(blob: bytes | str, where: str = "content digest") -> ContentDigest:
    try:
        doc = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{where}: not JSON") from None
    if not isinstance(doc, dict):
        raise InputError(f"{where}: not a content digest")
    return ContentDigest.from_dict(doc, where)


_ = ml_dtypes  # registers bfloat16/float8 with numpy for SAFETENSORS_DTYPES views
