"""A fingerprint: the sampled coordinates of every canonical tensor, their summary vector and a content hash.

Binary format "MTFP" version 2 (documented in docs/index.md): `MTFP`, u32 version, u32 header length, a JSON
header, then each slot's sample in header order as little-endian float16 (`f2`, values divided by 2**exp, exact for
bf16/fp16/fp8 weights) or float32 (`f4`), then the disguise-robust section's arrays (robust.py: token rows keyed by
token string, reader products, norm gains). Version 1 (no robust section) is still read. Everything identify needs
is in here; no weights are needed again.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from modeltrace.architectures import Slot
from modeltrace.errors import InputError, ModelTraceError
from modeltrace.fingerprint.robust import Collector, RobustSection
from modeltrace.fingerprint.robust import decode as decode_robust
from modeltrace.fingerprint.robust import encode as encode_robust
from modeltrace.fingerprint.sampling import (
    HALF_EXACT,
    KEEP_COLS,
    SlotPlan,
    column_order,
    plan,
    seeded,
    widen_scaled,
)
from modeltrace.sources.base import Source

if TYPE_CHECKING:
    from modeltrace.align.view import ModelView

MAGIC = b"MTFP"
FORMAT_VERSION = 2
#: Length of the summary vector used to rank an index before any sample is compared.
SKETCH_DIM = 1024
#: A fingerprint larger than this is refused on load (16 MB budget plus generous slack for the header).
MAX_BLOB = 32 * 1024 * 1024
#: Sampled blocks read at once (bounds memory while reads overlap).
READ_WINDOW = 32

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class SlotSample:
    """The sample of one canonical tensor: rows [row0, row0 + nrows) at the kept columns, as float32."""

    slot: Slot
    rows: int  # shape of the canonical tensor
    cols: int
    dtype: str  # its storage dtype
    row0: int
    structured: bool
    values: np.ndarray  # float32 (nrows, ncols)
    stats: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mean, rms, excess kurtosis of the sample

    @property
    def shape_key(self) -> tuple[int, int]:
        return self.rows, self.cols


@dataclass
class Fingerprint:
    model: dict[str, Any]  # label, spec, family, model_type, layers, parameters, total_bytes, card, ...
    content_hash: str
    bytes_read: int
    requests: int
    slots: dict[Slot, SlotSample]
    elapsed: float = 0.0
    #: disguise-robust content (token rows, reader products, gains); None in version-1 fingerprints
    robust: RobustSection | None = None
    #: derived arrays (summary vector, centred unit samples), computed once per fingerprint
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        return str(self.model.get("label", "?"))

    @property
    def spec(self) -> str:
        return str(self.model.get("spec", ""))

    def sketch(self) -> np.ndarray:
        if "sketch" not in self.cache:
            self.cache["sketch"] = summary_vector(self.slots.values())
        return self.cache["sketch"]

    # ---- serialization -------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        rows, payload = [], []
        for s in self.slots.values():
            store, exp, data = _encode(s.values, s.dtype)
            nr, nc = s.values.shape
            rows.append([s.slot.role, s.slot.layer, s.slot.expert, s.rows, s.cols, s.dtype, s.row0, nr, nc, store,
                         exp, int(s.structured), *(round(float(x), 6) for x in s.stats)])
            payload.append(data)
        header = {"format": "modeltrace-fingerprint", "version": FORMAT_VERSION, "model": self.model,
                  "content_hash": self.content_hash, "bytes_read": self.bytes_read, "requests": self.requests,
                  "slots": rows}  # no timings: the same model gives the same bytes on any machine
        if self.robust is not None:
            header["robust"], extra = encode_robust(self.robust)
            payload.append(extra)
        hb = json.dumps(header, separators=(",", ":"), default=str).encode()
        return b"".join([MAGIC, struct.pack("<II", FORMAT_VERSION, len(hb)), hb, *payload])

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "fingerprint") -> Fingerprint:
        try:
            return _decode(memoryview(blob))
        except ModelTraceError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, struct.error, UnicodeDecodeError) as exc:
            raise InputError(f"{where} is corrupt ({type(exc).__name__})") from None

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())


def _encode(values: np.ndarray, dtype: str) -> tuple[str, int, bytes]:
    """float16 after a power-of-two scale when that is exact for the source dtype, else float32."""
    finite = values[np.isfinite(values)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    if dtype in HALF_EXACT and peak > 0:
        exp = math.ceil(math.log2(peak / 32768.0))
        return "f2", exp, np.ldexp(values, -exp).astype("<f2").tobytes()
    if dtype in HALF_EXACT:
        return "f2", 0, values.astype("<f2").tobytes()
    return "f4", 0, values.astype("<f4").tobytes()


def _decode(buf: memoryview) -> Fingerprint:
    if len(buf) > MAX_BLOB:
        raise InputError(f"fingerprint of {len(buf)} bytes exceeds the {MAX_BLOB >> 20} MB limit")
    if bytes(buf[:4]) != MAGIC:
        raise InputError("not a modeltrace fingerprint (bad magic)")
    version, hlen = struct.unpack("<II", bytes(buf[4:12]))
    if version > FORMAT_VERSION:
        raise InputError(f"fingerprint format v{version} is newer than this modeltrace reads (v{FORMAT_VERSION}); "
                         "upgrade modeltrace")
    if 12 + hlen > len(buf):
        raise ValueError("header runs past the end")
    header = json.loads(bytes(buf[12:12 + hlen]).decode())
    off = 12 + hlen
    slots: dict[Slot, SlotSample] = {}
    for row in header["slots"]:
        role, layer, expert, rows, cols, dtype, row0, nr, nc, store, exp, structured, *st = row
        size = int(nr) * int(nc)
        width = 2 if store == "f2" else 4 if store == "f4" else 0
        if not width or size <= 0 or off + size * width > len(buf):
            raise ValueError("slot data runs past the end")
        arr = np.frombuffer(buf[off:off + size * width], dtype="<f2" if width == 2 else "<f4")
        off += size * width
        values = widen_scaled(arr, int(exp)).reshape(int(nr), int(nc))
        slot = Slot(str(role), int(layer), int(expert))
        slots[slot] = SlotSample(slot, int(rows), int(cols), str(dtype), int(row0), bool(structured), values,
                                 tuple(float(x) for x in st[:3]))  # type: ignore[arg-type]
    robust = None
    if header.get("robust") is not None:
        robust, off = decode_robust(header["robust"], buf, off)
    if off != len(buf):
        raise ValueError("trailing bytes")
    return Fingerprint(dict(header["model"]), str(header["content_hash"]), int(header["bytes_read"]),
                       int(header.get("requests", 0)), slots, robust=robust)


# ---- summary vector -------------------------------------------------------------------------------------------
def centred_unit(values: np.ndarray) -> np.ndarray:
    """Double-centred (row and column means removed), unit-norm sample: the statistic the independence test uses."""
    x = values.astype(np.float64)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if x.shape[0] > 1 and x.shape[1] > 1:
        x = x - x.mean(axis=1, keepdims=True) - x.mean(axis=0, keepdims=True) + x.mean()
    else:
        x = x - x.mean()
    n = float(np.linalg.norm(x))
    return (x / n if n > 0 else x).astype(np.float32)


@lru_cache(maxsize=512)
def _buckets(role: str, rows: int, cols: int, nrows: int) -> tuple[np.ndarray, np.ndarray]:
    g = seeded("sketch", role, rows, cols)
    width = min(cols, KEEP_COLS)
    return (g.integers(0, SKETCH_DIM, size=(nrows, width)), g.choice(np.array([-1.0, 1.0]), size=(nrows, width)))


def summary_vector(samples: Iterable[SlotSample]) -> np.ndarray:
    """Count-sketch of every matrix sample, keyed by role and shape but not by layer or expert, so layers moved by a
    stack still meet. The cosine of two summary vectors estimates the mean per-tensor correlation; unrelated models
    score about 0 +- 0.03. Samples sharing a key share their buckets, so they are summed before hashing."""
    groups: dict[tuple[str, int, int, int, int], np.ndarray] = {}
    for s in samples:
        if s.structured:
            continue
        u = centred_unit(s.values)
        key = (s.slot.role, s.rows, s.cols, *u.shape)
        groups[key] = groups[key] + u if key in groups else u
    acc = np.zeros(SKETCH_DIM)
    for (role, rows, cols, nr, nc), u in groups.items():
        b, g = _buckets(role, rows, cols, nr)
        acc += np.bincount(b[:, :nc].ravel(), weights=(g[:, :nc] * u).ravel(), minlength=SKETCH_DIM)
    n = float(np.linalg.norm(acc))
    return (acc / n if n > 0 else acc).astype(np.float32)


# ---- making one -----------------------------------------------------------------------------------------------
def _window_map(fn: Callable[[T], R], items: list[T], threads: int) -> Iterator[R]:
    """Ordered map with at most READ_WINDOW results held, so memory stays bounded whatever the model size."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i in range(0, len(items), READ_WINDOW):
            yield from pool.map(fn, items[i:i + READ_WINDOW])


def _moments(v: np.ndarray) -> tuple[float, float, float]:
    x = v.astype(np.float64).ravel()
    if not np.isfinite(x).all():
        x = x[np.isfinite(x)]
    if x.size == 0:
        return 0.0, 0.0, 0.0
    mean = float(x.mean())
    c2 = x - mean
    c2 *= c2
    var = float(c2.mean())
    kurt = float(np.dot(c2, c2) / c2.size / var**2 - 3.0) if var > 0 else 0.0
    return mean, math.sqrt(var + mean * mean), kurt


def normalize_spec(spec: str) -> str:
    """Absolute local paths (so `audit` can be handed the spec from anywhere); hf:// specs as given."""
    text = str(spec)
    if text.startswith("hf://"):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def _view_of(source: Source, label: str) -> ModelView:
    """A model view over an already open source (what `open_view` does for a spec)."""
    from modeltrace.align.view import ModelView
    from modeltrace.architectures import canonical_parts, detect_family
    from modeltrace.describe import text_config

    tensors = source.tensors()
    cfg = text_config(source.config())
    mt = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None
    fam = detect_family(list(tensors), mt)
    parts, unknown = canonical_parts(tensors, fam, cfg)
    return ModelView(label, source.location, source, fam, parts, cfg, unknown)


def make_fingerprint(spec: str | Source, label: str | None = None, allow_pickle: bool = False,
                     threads: int | None = None) -> Fingerprint:
    """Fingerprint a model wherever it lives (a spec, or an open Source), reading one block of rows per sampled
    tensor: one ranged read each, in parallel for remote models. (fingerprint/shards.py makes the same fingerprint,
    byte for byte, with each shard's blocks read by a separate work item.)"""
    from modeltrace.align.view import label_for, open_view

    t0 = time.perf_counter()
    owned = not isinstance(spec, Source)  # a source handed in stays open for its owner
    if isinstance(spec, Source):
        view = _view_of(spec, label or label_for(spec.location))
        spec = spec.location
    else:
        spec = normalize_spec(spec)
        view = open_view(spec, label or label_for(spec), allow_pickle=allow_pickle)
    try:
        return fingerprint_view(view, spec, threads, t0)
    finally:
        if owned:
            view.close()


def fingerprint_view(view: ModelView, spec: str, threads: int | None = None, t0: float | None = None
                     ) -> Fingerprint:
    """The fingerprint of an open view (`spec` as normalized), all in this process."""
    t0 = time.perf_counter() if t0 is None else t0
    job = begin_fingerprint(view, spec)
    if threads:
        n_threads = threads
    elif spec.startswith("hf://"):  # one block a request: as many in flight as the connections allow
        from modeltrace.sources import remote

        n_threads = remote.settings().connections
    else:
        n_threads = 2

    def read(p: SlotPlan) -> np.ndarray:
        return view.read(p.slot, p.row0, p.row0 + p.nrows)

    h = hashlib.sha256(job.prefix)
    slots: dict[Slot, SlotSample] = {}
    for p, block in zip(job.plans, _window_map(read, job.plans, n_threads), strict=True):
        add_block(job, h, slots, p, block)
    stats = view.source.stats
    return finish_fingerprint(job, h, slots, stats.bytes_read, stats.requests, time.perf_counter() - t0)


class _Tape:
    """Stands in for the content hash while a fingerprint is begun: keeps what was fed, so the hash can be
    continued later, in another process if need be (hash objects do not pickle)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def update(self, data: bytes | memoryview) -> None:
        self.parts.append(bytes(data))

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


@dataclass
class FingerprintJob:
    """A fingerprint before its sampled blocks are read: the plan, the model facts, what the content hash covers
    before the first block, and the robust-section collector. Every read but the blocks' is done."""

    spec: str
    plans: list[SlotPlan]
    model: dict[str, Any]
    prefix: bytes
    robust: Collector


def begin_fingerprint(view: ModelView, spec: str) -> FingerprintJob:
    """Plan the samples and read all but the sampled blocks (headers, token rows, gains, card)."""
    from modeltrace.card import parse_card

    tensors = view.source.tensors()
    dtypes = {slot: tensors[p.name].dtype for slot, p in view.parts.items()}
    plans = plan(view.parts, dtypes)
    if not plans:
        raise InputError(f"{spec}: no tensors with a canonical role to fingerprint")
    h = _Tape()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{t.shape}\n".encode())
    robust = Collector(view, plans, h)  # token rows and gains first; products from the blocks below
    try:
        card = parse_card(view.source.card_text())
    except ModelTraceError:
        card = parse_card(None)
    cfg = view.config
    model = {
        "label": view.label, "spec": spec, "location": view.source.location, "format": view.source.format,
        "family": view.family.name, "model_type": cfg.get("model_type"), "layers": view.n_layers,
        "parameters": int(sum(t.numel for t in tensors.values())),
        "total_bytes": int(sum(t.nbytes for t in tensors.values())), "tensors": len(tensors),
        "dtypes": sorted({t.dtype for t in tensors.values()}),
        "card": {"base_model": card["base_model"], "base_model_relation": card["base_model_relation"],
                 "license": card["license"]},
    }
    return FingerprintJob(spec, plans, model, h.getvalue(), robust)


def add_block(job: FingerprintJob, h: Any, slots: dict[Slot, SlotSample], p: SlotPlan, block: np.ndarray) -> None:
    """One sampled block (float32, full rows) into the content hash, the robust section and the samples. Blocks
    go in plan order."""
    h.update(p.slot.key.encode())
    h.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    job.robust.observe(p, block)
    values = np.ascontiguousarray(block[:, column_order(p.part.rows, p.part.cols)[:p.ncols]]
                                  if p.part.cols > 1 else block, dtype=np.float32)
    slots[p.slot] = SlotSample(p.slot, p.part.rows, p.part.cols, p.dtype, p.row0, p.structured, values,
                               _moments(values))


def finish_fingerprint(job: FingerprintJob, h: Any, slots: dict[Slot, SlotSample], bytes_read: int, requests: int,
                       elapsed: float) -> Fingerprint:
    return Fingerprint(job.model, h.hexdigest(), bytes_read, requests, slots, elapsed, robust=job.robust.finish())
