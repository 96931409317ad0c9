"""The disguise-robust part of a fingerprint: what survives permutations, rotations, folded gains and re-ordered
vocabularies, so `identify` can see through them (the audit's `align/disguise.py` does the same on full weights).

Coordinate samples (sampling.py) sit at fixed (row, column) positions: a model whose hidden units, residual stream or
vocabulary were permuted, or whose residual stream was rotated, keeps the numbers but not the positions. This
section keeps three things that do not depend on those positions:

- token rows: the embedding (and untied lm_head) rows of `k` tokens chosen by a hash of the token *string* when the
  model has a tokenizer (else of the token id): the bottom-k of the hashes, so a re-ordered, extended or truncated
  vocabulary keeps (most of) the same tokens, found again by their hash. All columns are kept, so a permuted
  residual stream is recovered by matching columns between two fingerprints (and, for models with fewer than
  k / 3 hidden dimensions, a rotation by an orthogonal fit);
- reader products: for every sampled row block of a matrix that reads the normalised residual stream (q, k, v,
  gate, up, router, experts), the products `e_t / rms(e_t) * g @ W_block.T` of the first `PRODUCT_TOKENS` sampled
  token embeddings through the layer's norm gain `g`. They are unchanged by any orthogonal map of the residual
  stream (a permutation, a rotation) and by folding gains into the matrices, yet they sit in the matrix's own unit
  basis, which independent models do not share. Their tokens are shared, though, and models trained on alike data
  have alike token structure, so they are tested against the permutation distribution of the candidate's units
  (undisguise.exchangeable_z), not with the coordinate test's Fisher z (calibrated in
  tests/fingerprint/test_disguised_identify.py);
- norm gains at the columns the coordinate samples keep (to fold a candidate's gains when the suspect's are 1).

Memory and reads: `k` rows of one or two vocabulary matrices (scattered ranged reads), one read per gain vector;
products are computed from the row blocks the coordinate sample reads anyway.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from modeltrace.align.roles import Roles, roles_of
from modeltrace.architectures import Slot
from modeltrace.fingerprint.sampling import HALF_EXACT, KEEP_COLS, column_order, widen_scaled

__all__ = ["FLUSH_ROWS", "MAX_TOKENS", "MIN_PRODUCT_TOKENS", "MIN_TOKENS", "PRODUCT_BYTES", "PRODUCT_TOKENS",
           "TOKEN_BYTES", "VOCAB_ROLES", "Collector", "RobustSection", "decode", "encode", "from_names", "n_tokens",
           "read_gains", "token_keys"]

if TYPE_CHECKING:
    from modeltrace.align.view import ModelView
    from modeltrace.fingerprint.sampling import SlotPlan

#: Bytes the token rows may take (embed + lm_head); `k` follows from the hidden size.
TOKEN_BYTES = 2 * 1024 * 1024
MIN_TOKENS, MAX_TOKENS = 32, 256
#: Tokens whose embeddings probe the reader matrices (the first ones by hash, shared by every model): at most
#: PRODUCT_TOKENS, fewer (down to MIN_PRODUCT_TOKENS) when the products would exceed PRODUCT_BYTES (float16).
PRODUCT_TOKENS, MIN_PRODUCT_TOKENS = 64, 16
PRODUCT_BYTES = 1024 * 1024
#: Reader rows gathered before their products are computed in one matrix product.
FLUSH_ROWS = 2048
#: Which matrices read the normalised residual stream, and which norm gain normalises it, come from the family data
#: (align/roles.py: `Roles.readers`, `Roles.gain_slot`, `read_gains`).
VOCAB_ROLES = ("embed", "lm_head")
_ID_SALT = 0x9E3779B97F4A7C15


def _splitmix(x: np.ndarray) -> np.ndarray:
    z = (x.astype(np.uint64) + np.uint64(_ID_SALT)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def token_keys(view: ModelView, n: int) -> tuple[str, np.ndarray]:
    """("string", 64-bit hashes of token strings) when the model names its tokens, else ("id", hashes of ids).
    Ids without a string (holes, padding rows) get the largest key, so they are never chosen."""
    from modeltrace.align.residual import token_strings

    strings = None
    try:
        strings = token_strings(view)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a damaged tokenizer must not sink a fingerprint: fall back to ids
        strings = None
    if strings:
        keys: np.ndarray = np.full(n, np.iinfo(np.uint64).max, dtype=np.uint64)
        seen: set[str] = set()
        for i, t in enumerate(strings[:n]):
            if t and t not in seen:
                seen.add(t)
                keys[i] = int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8)
                                         .digest(), "little")
        if (keys != np.iinfo(np.uint64).max).sum() >= min(n, MIN_TOKENS):
            return "string", keys
    return "id", _splitmix(np.arange(n, dtype=np.uint64))


def read_gains(roles: Roles) -> frozenset[str]:
    """Norm roles whose gains some matrix reads through (kept in the section, to fold gains by)."""
    return frozenset(g for s in roles.sem.values() for g in (s.gain, s.gain_first) if g)


def n_tokens(hidden: int, mats: int, half: bool, vocab: int) -> int:
    per = mats * hidden * (2 if half else 4)
    return int(min(vocab, max(MIN_TOKENS, min(MAX_TOKENS, TOKEN_BYTES // max(per, 1)))))


@dataclass
class RobustSection:
    """Disguise-robust content of one fingerprint (see the module docstring)."""

    token_kind: str  # "string" | "id"
    keys: np.ndarray  # uint64 (k,), ascending
    ids: np.ndarray  # int64 (k,): the token id of each key in this model
    rows: dict[str, np.ndarray]  # "embed" / "lm_head" -> float32 (k, hidden)
    dtypes: dict[str, str]  # storage dtype of those matrices
    gain_idx: np.ndarray  # int64 (n,): residual columns at which layer gains are kept
    gains: dict[Slot, np.ndarray]  # norm slot -> float32 (n,) at gain_idx; the final norm's whole (hidden,)
    products: dict[Slot, np.ndarray] = field(default_factory=dict)  # reader slot -> float32 (kp, block rows)
    product_tokens: int = 0  # kp: products use keys[:kp]

    @property
    def hidden(self) -> int:
        r = next(iter(self.rows.values()), None)
        return int(r.shape[1]) if r is not None else 0

    def folded(self) -> bool:
        """Every kept norm gain is exactly 1 (folded into the matrices, or an untrained init)."""
        return bool(self.gains) and all(np.allclose(g, 1.0, atol=1e-3) for g in self.gains.values())

    @property
    def nbytes(self) -> int:
        """Bytes the section takes in a fingerprint (payload, without its header entry)."""
        return len(encode(self)[1])


# ---- collection -----------------------------------------------------------------------------------------------
class Collector:
    """Reads token rows and gains before the coordinate pass, then turns each sampled reader block into products.
    `observe` is called with every block the coordinate pass reads (full rows), from any thread."""

    def __init__(self, view: ModelView, plans: list[SlotPlan], h: Any = None) -> None:
        self.ok = False
        self.products: dict[Slot, np.ndarray] = {}
        self.pending: list[tuple[Slot, np.ndarray]] = []
        self.pending_rows = 0
        self.lock = threading.Lock()
        vocab = [r for r in VOCAB_ROLES if Slot(r) in view.parts]
        if not vocab:
            return
        first = view.parts[Slot(vocab[0])]
        hidden, n = first.cols, first.rows
        vocab = [r for r in vocab if view.parts[Slot(r)].cols == hidden]
        tensors = view.source.tensors()
        dtypes = {r: tensors[view.parts[Slot(r)].name].dtype for r in vocab}
        half = all(d in HALF_EXACT for d in dtypes.values())
        kind, keys = token_keys(view, n)
        k = n_tokens(hidden, len(vocab), half, n)
        order = np.argsort(keys, kind="stable")[:k]
        order = order[keys[order] != np.iinfo(np.uint64).max]
        if len(order) < 2:
            return
        from modeltrace.align.transform import gather, gather_spans

        ids = order.astype(np.int64)
        srt = np.argsort(ids)
        rows: dict[str, np.ndarray] = {}
        # every read below announced at once, exactly as it will be made: a remote model fetches token rows and
        # norm gains in a few coalesced requests in flight together, not one 20 ms round trip after another (9 s of
        # a 400B MoE's fingerprint); a span announced and never read could serve a later block read from memory
        # and make the recorded requests depend on how the blocks were read (fingerprint/shards.py)
        vocab = [r for r in vocab if bool((ids < view.parts[Slot(r)].rows).all())]
        if "embed" not in vocab and "lm_head" not in vocab:
            return
        self.roles = roles = roles_of(view.family)
        gain_roles = read_gains(roles)
        gain_slots = [slot for slot, part in view.parts.items()
                      if slot.role in gain_roles and slot.expert < 0
                      and ((part.cols == 1 and part.rows == hidden) or (part.rows == 1 and part.cols == hidden))]
        spans = [(Slot(r), lo, hi) for r in vocab for lo, hi in gather_spans(ids)]
        spans += [(sl, 0, view.parts[sl].rows) for sl in gain_slots]
        view.source.prefetch([(view.parts[sl].name, view.parts[sl].row_start + lo, view.parts[sl].row_start + hi)
                              for sl, lo, hi in spans])
        for r in vocab:
            got: np.ndarray = np.empty((len(ids), hidden), dtype=np.float32)
            got[srt] = gather(view, Slot(r), ids[srt])  # type: ignore[arg-type]
            rows[r] = got
        # gains at every column a coordinate sample keeps of a matrix that reads the residual stream
        idx: set[int] = set()
        for p in plans:
            if p.part.cols == hidden and roles.residual_axis(p.slot.role) == 1 \
                    and roles.gain_slot(p.slot) is not None:
                idx.update(int(c) for c in column_order(p.part.rows, p.part.cols)[:KEEP_COLS])
        gain_idx = np.array(sorted(idx), dtype=np.int64)
        full_gains: dict[Slot, np.ndarray] = {slot: view.read(slot).ravel().astype(np.float32) for slot in gain_slots}
        self.full_gains = full_gains
        block_rows = sum(p.nrows for p in plans if p.slot.role in roles.readers and p.part.cols == hidden)
        kp = min(len(ids), PRODUCT_TOKENS, max(MIN_PRODUCT_TOKENS, PRODUCT_BYTES // max(2 * block_rows, 1)))
        emb = rows.get("embed")
        if emb is not None:
            e: np.ndarray = emb[:kp].astype(np.float64)
            rms = np.sqrt(np.mean(e * e, axis=1, keepdims=True))
            self.probe = np.divide(e, rms, out=np.zeros_like(e), where=rms > 0).astype(np.float32)
        else:
            self.probe = None
        if h is not None:  # what was read goes into the content hash
            h.update(f"robust|{kind}|{len(ids)}\n".encode())
            h.update(ids.tobytes())
            for r in sorted(rows):
                h.update(rows[r].tobytes())
            for s in sorted(full_gains):
                h.update(full_gains[s].tobytes())
        self.section = RobustSection(kind, keys[order].astype(np.uint64), ids, rows, dtypes, gain_idx,
                                     {s: g if s.role == "final_norm" else g[gain_idx] for s, g in full_gains.items()},
                                     {}, kp)
        self.hidden = hidden
        self.ok = True

    def __getstate__(self) -> dict[str, Any]:  # travels between processes with a begun fingerprint
        return {k: v for k, v in vars(self).items() if k != "lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def observe(self, p: SlotPlan, block: np.ndarray) -> None:
        """Products of the probe tokens with one sampled block of a reader matrix (its full rows)."""
        if not self.ok or self.probe is None or p.slot.role not in self.roles.readers or block.ndim != 2:
            return
        if block.shape[1] != self.hidden or block.shape[0] < 2:
            return
        gain_slot = self.roles.gain_slot(p.slot)
        g = self.full_gains.get(gain_slot) if gain_slot is not None else None
        w: np.ndarray = block.astype(np.float64)
        if not np.isfinite(w).all():
            w = np.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
        if g is not None:
            w = w * g[None, :]
        with self.lock:  # products are batched: one large product is far cheaper than many tiny ones
            self.pending.append((p.slot, w.astype(np.float32)))
            self.pending_rows += w.shape[0]
            if self.pending_rows >= FLUSH_ROWS:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        # float64 products: float32 BLAS sums in an order that depends on threads, batch size and CPU, and the
        # float16 stored values would differ by a unit between machines; in float64 they practically never do
        prod = self.probe.astype(np.float64) @ np.concatenate([w for _, w in self.pending]).astype(np.float64).T
        at = 0
        for slot, w in self.pending:
            self.products[slot] = np.ascontiguousarray(prod[:, at:at + w.shape[0]], dtype=np.float32)
            at += w.shape[0]
        self.pending, self.pending_rows = [], 0

    def finish(self) -> RobustSection | None:
        if not self.ok:
            return None
        with self.lock:
            self._flush()
        self.section.products = dict(sorted(self.products.items()))
        return self.section


# ---- serialization --------------------------------------------------------------------------------------------
def _arrays(sec: RobustSection) -> list[tuple[str, np.ndarray]]:
    named: list[tuple[str, np.ndarray]] = [("keys", sec.keys), ("ids", sec.ids)]
    named += [(f"rows:{r}", v) for r, v in sec.rows.items()]
    named.append(("gain_idx", sec.gain_idx))
    named += [(f"gain:{s.role}:{s.layer}", v) for s, v in sec.gains.items()]
    named += [(f"prod:{s.role}:{s.layer}:{s.expert}", v) for s, v in sec.products.items()]
    return named


def from_names(named: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[Slot, np.ndarray],
                                                       dict[Slot, np.ndarray]]:
    """(token rows, gains, products) from arrays named as `_arrays` names them (rows:ROLE, gain:ROLE:LAYER,
    prod:ROLE:LAYER:EXPERT); other names are ignored."""
    rows, gains, products = {}, {}, {}
    for name, v in named.items():
        kind, _, rest = name.partition(":")
        if kind == "rows":
            rows[rest] = v
        elif kind == "gain":
            role, layer = rest.rsplit(":", 1)
            gains[Slot(role, int(layer))] = v
        elif kind == "prod":
            role, layer, expert = rest.rsplit(":", 2)
            products[Slot(role, int(layer), int(expert))] = v
    return rows, gains, products


def _store(name: str, v: np.ndarray, dtypes: dict[str, str]) -> tuple[str, int, bytes]:
    if name == "keys":
        return "u8", 0, v.astype("<u8").tobytes()
    if name in ("ids", "gain_idx"):
        return "u4", 0, v.astype("<u4").tobytes()
    finite = v[np.isfinite(v)]
    peak = float(np.abs(finite).max()) if finite.size else 0.0
    exp = math.ceil(math.log2(peak / 32768.0)) if peak > 0 else 0
    if name.startswith("rows:") and dtypes.get(name[5:]) not in HALF_EXACT:
        return "f4", 0, v.astype("<f4").tobytes()
    return "f2", exp, np.ldexp(v.astype(np.float32), -exp).astype("<f2").tobytes()


def encode(sec: RobustSection) -> tuple[dict[str, Any], bytes]:
    """(header entry, payload) of a section: arrays listed as [name, store, shape, exp], data in that order."""
    meta, payload = [], []
    for name, v in _arrays(sec):
        store, exp, data = _store(name, v, sec.dtypes)
        meta.append([name, store, list(v.shape), exp])
        payload.append(data)
    head = {"tokens": sec.token_kind, "product_tokens": sec.product_tokens, "dtypes": sec.dtypes, "arrays": meta}
    return head, b"".join(payload)


_WIDTH = {"u8": ("<u8", 8), "u4": ("<u4", 4), "f2": ("<f2", 2), "f4": ("<f4", 4)}


def decode(head: dict[str, Any], buf: memoryview, off: int) -> tuple[RobustSection, int]:
    arrays: dict[str, np.ndarray] = {}
    order: list[str] = []
    for name, store, shape, exp in head["arrays"]:
        dt, width = _WIDTH[store]
        shape = tuple(int(x) for x in shape)
        size = int(np.prod(shape)) if shape else 1
        if size < 0 or off + size * width > len(buf):
            raise ValueError("robust section runs past the end")
        a = np.frombuffer(buf[off:off + size * width], dtype=dt).reshape(shape)
        off += size * width
        if store in ("f2", "f4"):
            a = widen_scaled(a, int(exp))
        arrays[str(name)] = a
        order.append(str(name))
    rows, gains, products = from_names({name: arrays[name] for name in order})
    sec = RobustSection(str(head["tokens"]), arrays["keys"].astype(np.uint64), arrays["ids"].astype(np.int64), rows,
                        {str(k): str(v) for k, v in head.get("dtypes", {}).items()},
                        arrays["gain_idx"].astype(np.int64), gains, products, int(head.get("product_tokens", 0)))
    return sec, off
