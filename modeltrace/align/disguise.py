"""Seeing through disguises: recover how a suspect's units, heads, experts, layers, vocabulary and residual stream
correspond to a candidate's, when a function-preserving transformation has changed the numbers.

Runs only for a candidate whose identity alignment fails somewhere (the layer map's sampled rows do not correlate,
or embeddings do not), so an undisguised audit pays nothing. Everything is read as sketches, never whole models:

- residual stream: columns of sampled embedding (and lm_head) rows, matched as units (a permutation), else an
  orthogonal Procrustes fit on half the sampled tokens checked on the other half (a rotation);
- norm gains: when every suspect gain is exactly 1 and the candidate's are not, the candidate's are folded into the
  matrices that read them;
- layers: a unit-permutation-invariant signature per layer (cosine Gram of sampled residual rows of o_proj and
  down_proj, sum over experts), matched only where the layer map found no identity;
- per layer: KV groups, then query heads within groups; MLP units (`detectors.match_test`, which also gives the
  permutation-invariant independence p-value); experts by router row and invariant expert summaries, then each
  expert's units.

Memory: per model, the sampled rows (`RES_SAMPLE` residual coordinates, `TOKEN_SAMPLE` tokens) plus, for the layer
being aligned, units x 3 x RES_SAMPLE float32 features for each model (a 20k-unit layer: ~30 MB each), plus the
integer maps kept for the streaming pass (one int per unit, head and expert).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from modeltrace.align.layers import LayerMatch, sample_row_ids
from modeltrace.align.match import agreements, identity_score, match, standardize
from modeltrace.align.match_test import UnitTest, unit_test
from modeltrace.align.transform import ResidualMap, SlotTransform, gather
from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot
from modeltrace.errors import InputError
from modeltrace.stats import fisher_log10, poisson_log10_sf, z_from_log10p

#: Residual coordinates sampled for unit features (rows of output-side, columns of input-side matrices); layers
#: with more units than `WIDE_LAYER` use `RES_SAMPLE_WIDE` (the n^2 k similarity product is the alignment's cost).
RES_SAMPLE, RES_SAMPLE_WIDE, WIDE_LAYER = 128, 64, 8192
#: Token rows of the embeddings sampled for the residual alignment.
TOKEN_SAMPLE = 2048
#: The layer map's identity similarity (centred cosine of sampled rows) below which a candidate is aligned.
IDENTITY_TAU = 0.2
#: z of the mean same-index cosine above which a group is taken as not permuted.
Z_IDENTITY = 8.0
#: A unit permutation is applied only where the agreement test is at least this significant (log10 p).
ACCEPT_LOG10P = -6.0
#: Residual permutation accepted when the median matched column cosine reaches this.
RESIDUAL_MIN_COS = 0.3
#: Rotation accepted when an orthogonal fit on half the tokens explains this share of the other half (a merge's
#: minor parent explains ~0.3; an unrelated model gives <= 0).
ROTATION_MIN_R2 = 0.2
#: Head, group and expert matchings accepted when the matched pairs' mean cosine reaches this.
SMALL_MIN_COS = 0.3
#: A layer is remapped when its signature matches another layer this well and clearly better than the runner-up.
LAYER_MIN_SIM, LAYER_MARGIN = 0.5, 0.1
SUPPORTED_FAMILIES = ("llama", "mixtral", "qwen_moe")

IN_ROLES = ("attn_q", "attn_k", "attn_v", "mlp_gate", "mlp_up", "expert_gate", "expert_up", "shared_gate",
            "shared_up", "router", "shared_expert_gate", "embed", "lm_head")
OUT_ROLES = ("attn_o", "mlp_down", "expert_down", "shared_down")
NORM_ROLES = ("attn_norm", "mlp_norm", "final_norm", "mlp_norm_extra")
GAIN_OF = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm", "mlp_gate": "mlp_norm",
           "mlp_up": "mlp_norm", "expert_gate": "mlp_norm", "expert_up": "mlp_norm", "shared_gate": "mlp_norm",
           "shared_up": "mlp_norm", "router": "mlp_norm", "shared_expert_gate": "mlp_norm", "lm_head": "final_norm"}


@dataclass
class Alignment:
    """How one candidate's tensors map onto the suspect's; empty maps mean identity."""

    candidate: int  # index into the audit's views
    residual: ResidualMap = field(default_factory=ResidualMap)
    residual_selected: bool = False
    fold: bool = False
    vocab: np.ndarray | None = None  # candidate token per suspect token (-1: none)
    vocab_selected: bool = False
    layers: dict[int, int] = field(default_factory=dict)  # suspect layer -> candidate layer, where not identity
    layers_selected: set[int] = field(default_factory=set)
    q_heads: dict[int, np.ndarray] = field(default_factory=dict)
    kv_heads: dict[int, np.ndarray] = field(default_factory=dict)
    head_dim: tuple[int, int] = (0, 0)  # suspect, candidate
    mlp: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (mlp|shared, layer) -> unit map
    experts: dict[int, np.ndarray] = field(default_factory=dict)
    expert_units: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    tests: list[UnitTest] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gains: dict[Slot, np.ndarray] = field(default_factory=dict)  # candidate norm gains (folded on read)

    # ---- evidence ------------------------------------------------------------------------------------------
    @property
    def log10p(self) -> float:
        return fisher_log10([t.log10p for t in self.tests]) if self.tests else 0.0

    def layer_z(self, layer: int) -> float | None:
        lp = [t.log10p for t in self.tests if t.layer == layer]
        return z_from_log10p(fisher_log10(lp)) if lp else None

    @property
    def selected_any(self) -> bool:
        return bool(self.residual_selected or self.vocab_selected or self.layers_selected or self.q_heads
                    or self.kv_heads or self.mlp or self.experts or self.expert_units)

    def summary(self) -> dict:
        return {"undone": list(self.notes), "residual": self.residual.kind, "folded_gains": self.fold,
                "layer_map": {str(k): v for k, v in sorted(self.layers.items())},
                "match_test": {"log10_p": round(self.log10p, 2), "groups": len(self.tests),
                               "agreements": sum(t.agree for t in self.tests),
                               "units": sum(t.n_s for t in self.tests)}}

    # ---- reading -------------------------------------------------------------------------------------------
    def skip(self, slot: Slot) -> bool:
        """Slots with no counterpart by construction: norm gains in a rotated (or folded) residual basis."""
        return slot.role in NORM_ROLES and (self.residual.rot is not None or self.fold)

    def cand_layer(self, layer: int) -> int:
        return self.layers.get(layer, layer)

    def transform(self, slot: Slot, cview: ModelView) -> SlotTransform | None:
        """Where suspect slot `slot` sits in the candidate and how to read it there; None if nowhere."""
        layer = self.cand_layer(slot.layer) if slot.layer >= 0 else -1
        expert = slot.expert
        if expert >= 0 and slot.layer in self.experts:
            expert = int(self.experts[slot.layer][expert])
        cs = Slot(slot.role, layer, expert)
        if cs not in cview.parts:
            return None
        tf = SlotTransform(cs)
        role = slot.role
        base = role[:-5] if role.endswith("_bias") else role
        sel = slot.layer in self.layers_selected or (expert != slot.expert)
        res = self.residual
        # rows
        rows = None
        if base in ("embed", "lm_head") and self.vocab is not None:
            rows = self.vocab
            sel |= self.vocab_selected
        elif base == "attn_q" and slot.layer in self.q_heads:
            rows = _blocks(self.q_heads[slot.layer], self.head_dim[1])
        elif base in ("attn_k", "attn_v") and slot.layer in self.kv_heads:
            rows = _blocks(self.kv_heads[slot.layer], self.head_dim[1])
        elif base in ("mlp_gate", "mlp_up") and ("mlp", slot.layer) in self.mlp:
            rows = self.mlp[("mlp", slot.layer)]
        elif base in ("shared_gate", "shared_up") and ("shared", slot.layer) in self.mlp:
            rows = self.mlp[("shared", slot.layer)]
        elif base in ("expert_gate", "expert_up") and (slot.layer, slot.expert) in self.expert_units:
            rows = self.expert_units[(slot.layer, slot.expert)]
        elif base == "router" and slot.layer in self.experts:
            rows = self.experts[slot.layer]
        if rows is not None:
            tf.rows = np.asarray(rows, dtype=np.int64)
            sel = True if base not in ("embed", "lm_head") else sel
        is_vector = role.endswith("_bias") or base in NORM_ROLES
        if (base in OUT_ROLES or base in NORM_ROLES) and res.kind != "identity":
            if res.rot is not None:
                if base in NORM_ROLES:
                    return None  # a gain vector has no counterpart in a rotated basis
                tf.row_mat = res.rot.T
            else:
                tf.rows = res.perm
            sel |= self.residual_selected
        if is_vector:
            tf.selected = sel
            return tf
        # columns
        if base in IN_ROLES:
            if self.fold and base in GAIN_OF:
                g = self.gains.get(Slot(GAIN_OF[base], layer if base != "lm_head" else -1))
                if g is not None:
                    tf.col_scale = g
            if res.rot is not None:
                tf.col_mat = res.rot
            elif res.perm is not None:
                tf.cols = res.perm
            sel |= res.kind != "identity" and self.residual_selected
        elif base == "attn_o" and slot.layer in self.q_heads:
            tf.cols = _blocks(self.q_heads[slot.layer], self.head_dim[1])
            sel = True
        elif base == "mlp_down" and ("mlp", slot.layer) in self.mlp:
            tf.cols = self.mlp[("mlp", slot.layer)]
            sel = True
        elif base == "shared_down" and ("shared", slot.layer) in self.mlp:
            tf.cols = self.mlp[("shared", slot.layer)]
            sel = True
        elif base == "expert_down" and (slot.layer, slot.expert) in self.expert_units:
            tf.cols = self.expert_units[(slot.layer, slot.expert)]
            sel = True
        tf.selected = sel
        return tf


def _blocks(heads: np.ndarray, hd: int) -> np.ndarray:
    return (np.asarray(heads, dtype=np.int64)[:, None] * hd + np.arange(hd)[None, :]).ravel()


def res_coords(h: int, k: int = RES_SAMPLE) -> np.ndarray:
    return sample_row_ids(h, 0x5EED, k) if h > k else np.arange(h)


# ---------------------------------------------------------------------------------------------------- sketches


class _Sketcher:
    """Sketches of one model's tensors in the suspect's residual coordinates (a candidate through its map)."""

    def __init__(self, view: ModelView, res: ResidualMap | None = None, gains: dict[Slot, np.ndarray] | None = None,
                 chunk_bytes: int = 4 << 20) -> None:
        self.view, self.res, self.gains = view, res or ResidualMap(), gains or {}
        self.chunk = chunk_bytes

    def has(self, slot: Slot) -> bool:
        return slot in self.view.parts

    def gain(self, slot: Slot) -> np.ndarray | None:
        base = GAIN_OF.get(slot.role)
        if base is None:
            return None
        return self.gains.get(Slot(base, slot.layer if slot.role != "lm_head" else -1))

    def cols(self, slot: Slot, coords: np.ndarray) -> np.ndarray:
        """Every row of an input-side part at suspect residual coordinates `coords` (streamed): rows x k."""
        part = self.view.parts[slot]
        per = max(1, self.chunk // max(1, part.cols * 4))
        g = self.gain(slot)
        out = [self.res.cols(self.view.read(slot, a, a + per), coords, g) for a in range(0, part.rows, per)]
        return np.concatenate(out) if out else np.zeros((0, len(coords)), np.float32)

    def rows(self, slot: Slot, coords: np.ndarray) -> np.ndarray:
        """Output-side part at suspect residual rows `coords`: k x cols (cheap unless the residual is rotated)."""
        if self.res.rot is not None:
            return (self.res.rot[:, coords].T @ self.view.read(slot)).astype(np.float32)
        idx = coords if self.res.perm is None else self.res.perm[coords]
        return gather(self.view, slot, np.asarray(idx))

    def token_rows(self, slot: Slot, tokens: np.ndarray) -> np.ndarray:
        return gather(self.view, slot, tokens)


# ---------------------------------------------------------------------------------------------------- discovery


def needs_alignment(s: ModelView, c: ModelView, cidx: int, matches: list[LayerMatch]) -> bool:
    """True when some layer neither correlates with the same layer of candidate `cidx` (0-based) nor is an exact
    copy of a candidate layer, or when the embeddings do not correlate at the same token ids."""
    for m in matches:
        if m.exact:
            continue
        sims = m.identity_min if m.identity_min is not None else m.identity_similarity
        v = sims[cidx] if cidx < len(sims) else None
        if v is None or v < IDENTITY_TAU:
            return True
    for slot, part in s.parts.items():  # pruned heads or units: same slot, fewer rows or columns
        cp = c.parts.get(slot)
        if slot.layer >= 0 and cp is not None and (cp.rows, cp.cols) != (part.rows, part.cols):
            return True
    return _embed_identity(s, c) < IDENTITY_TAU or _routers_moved(s, c) or _fold(s, c)[0]


def _routers_moved(s: ModelView, c: ModelView, k: int = 8, layers: int = 4) -> bool:
    """Experts permuted while expert 0 (the one the layer map samples) stayed: the first router rows of a few MoE
    layers (one contiguous read each), compared at the same expert index, show it."""
    routers = sorted(sl for sl in s.parts if sl.role == "router")
    if len(routers) > layers:
        routers = [routers[int(i)] for i in np.linspace(0, len(routers) - 1, layers)]
    for slot in routers:
        part, cp = s.parts[slot], c.parts.get(slot)
        if cp is None or (cp.rows, cp.cols) != (part.rows, part.cols) or part.rows < 2:
            continue
        ids = np.arange(min(k, part.rows))
        a, b = gather(s, slot, ids).astype(np.float64), gather(c, slot, ids).astype(np.float64)
        a -= a.mean(axis=1, keepdims=True)
        b -= b.mean(axis=1, keepdims=True)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), 0.0)
        if float(cos.min()) < IDENTITY_TAU:
            return True
    return False


def _embed_identity(s: ModelView, c: ModelView) -> float:
    slot = Slot("embed")
    if slot not in s.parts or slot not in c.parts or s.parts[slot].cols != c.parts[slot].cols:
        return 1.0
    n = min(s.parts[slot].rows, c.parts[slot].rows)
    # two contiguous blocks of 16 rows (two reads, also over HTTP ranges)
    ids = np.unique(np.concatenate([np.arange(16), n // 2 + np.arange(16)]).clip(0, n - 1))
    a = gather(s, slot, ids).ravel().astype(np.float64)
    b = gather(c, slot, ids).ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


@contextlib.contextmanager
def _blas_threads(n: int | None) -> Iterator[None]:
    """Small products run faster on one BLAS thread (thread start-up dominates, worse on a busy machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    if n is None:
        yield
        return
    with threadpool_limits(n, user_api="blas"):
        yield


def _small(view: ModelView) -> bool:
    return max((p.rows for p in view.parts.values()), default=0) <= 4096 and _hidden(view) <= 1024


def discover(views: list[ModelView], matches: list[LayerMatch], warnings: list[str]) -> list[Alignment | None]:
    """Per candidate (views[1:]), its alignment to the suspect, or None where the identity already holds."""
    need = [needs_alignment(views[0], views[i], i - 1, matches) for i in range(1, len(views))]
    if not any(need):
        return [None] * (len(views) - 1)
    with _blas_threads(1 if all(_small(v) for v in views) else None):
        return _discover(views, matches, warnings, need)


def _discover(views: list[ModelView], matches: list[LayerMatch], warnings: list[str], need: list[bool]
              ) -> list[Alignment | None]:
    s = views[0]
    out: list[Alignment | None] = []
    for i in range(1, len(views)):
        c = views[i]
        if not need[i - 1]:
            out.append(None)
            continue
        if s.family.name not in SUPPORTED_FAMILIES or c.family.name not in SUPPORTED_FAMILIES:
            warnings.append(f"{c.label}: disguise checks (permutations, rotations) are not available for the "
                            f"{c.family.name} naming family; compared in stored order")
            out.append(None)
            continue
        try:
            out.append(align_pair(s, c, i, matches))
        except InputError:
            raise
        except (ValueError, np.linalg.LinAlgError, KeyError) as exc:  # an odd shape must not sink the audit
            hs, hc = _hidden(s), _hidden(c)
            why = (f"hidden size {hc}, the suspect's {hs}" if hs and hc and hs != hc else
                   "no consistent unit matching" if not isinstance(exc, np.linalg.LinAlgError) else
                   "a numerical failure")  # never numpy's own text: it names shapes, not the problem
            warnings.append(f"{c.label}: could not be aligned to the suspect ({why}); compared in stored order")
            out.append(None)
    return out


def align_pair(s: ModelView, c: ModelView, ci: int, matches: list[LayerMatch]) -> Alignment:
    al = Alignment(ci)
    h = _hidden(s)
    al.vocab, al.vocab_selected, vnote = _vocab_map(s, c)
    al.fold, al.gains = _fold(s, c)
    al.residual, al.residual_selected, rnote = _residual(s, c, al.vocab, al.gains if al.fold else None)
    if al.residual.kind == "identity" and al.vocab is None and _embed_identity(s, c) < IDENTITY_TAU:
        vmap = _vocab_by_rows(s, c)  # no tokenizer: match embedding rows themselves (residual not permuted)
        if vmap is not None:
            al.vocab, al.vocab_selected, vnote = vmap, True, "vocabulary rows re-ordered (matched by embedding)"
    for note in (vnote, rnote):
        if note:
            al.notes.append(note)
    if al.fold:
        al.notes.append("norm gains folded into the matrices that read them")
    sk_s = _Sketcher(s)
    sk_c = _Sketcher(c, al.residual, al.gains if al.fold else None)
    coords = res_coords(h)
    _layer_map(al, s, c, sk_s, sk_c, coords, ci, matches)
    hs, hc = _head_dims(s), _head_dims(c)
    al.head_dim = (hs[2], hc[2])
    counts: dict = {"mlp": 0, "heads": 0, "kv": 0, "experts": 0, "expert_units": 0, "pruned": 0, "heads_pruned": "",
                    "heads_pruned_layers": 0}
    layers = sorted({sl.layer for sl in s.parts if sl.layer >= 0})
    for layer in layers:
        cl = al.cand_layer(layer)
        if hs[2] and hc[2] and hs[2] == hc[2]:
            _heads(al, s, c, sk_s, sk_c, coords, layer, cl, hs, hc, counts)
        for kind in ("mlp", "shared"):
            _mlp(al, sk_s, sk_c, coords, layer, cl, kind, counts)
        _experts(al, s, c, sk_s, sk_c, coords, layer, cl, counts)
    if al.fold and al.log10p > ACCEPT_LOG10P:  # gains of 1 in an unrelated suspect: an untrained init, not a fold
        al.fold, al.gains = False, {}
        al.notes.remove("norm gains folded into the matrices that read them")
    n = len(layers)
    if counts["mlp"]:
        al.notes.append(f"MLP units permuted in {counts['mlp']} of {n} layers")
    if counts["pruned"]:
        al.notes.append(f"MLP units pruned (suspect keeps {counts['pruned_units']}) in {counts['pruned']} layers")
    if counts["heads_pruned"]:
        al.notes.append(f"attention heads pruned (suspect keeps {counts['heads_pruned']}) in "
                        f"{counts['heads_pruned_layers']} layers")
    if counts["kv"]:
        al.notes.append(f"KV head groups permuted in {counts['kv']} layers")
    if counts["heads"]:
        al.notes.append(f"attention heads permuted in {counts['heads']} layers")
    if counts["experts"]:
        al.notes.append(f"experts permuted in {counts['experts']} of {n} layers")
    if counts["expert_units"]:
        al.notes.append(f"expert units permuted in {counts['expert_units']} experts")
    return al


# ---- vocabulary ---------------------------------------------------------------------------------------------


def token_strings(view: ModelView) -> list[str] | None:
    """Token id -> string from tokenizer.json (vocab plus added tokens) or the GGUF token list; None if absent."""
    src = view.source
    if src.format == "gguf":
        reader = getattr(src, "_reader", None)
        f = reader.get_field("tokenizer.ggml.tokens") if reader is not None else None
        if f is None:
            return None
        try:
            return [str(f.contents(i)) for i in range(len(f.data))]
        except (ValueError, IndexError, UnicodeDecodeError):
            return None
    try:
        tj = src.json_file("tokenizer.json")
    except (InputError, json.JSONDecodeError):
        return None
    if not tj:
        return None
    vocab = (tj.get("model") or {}).get("vocab")
    pairs: dict[int, str] = {}
    if isinstance(vocab, dict):
        pairs = {v: k for k, v in vocab.items() if isinstance(v, int)}
    elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
        pairs = {i: (p[0] if isinstance(p, list) else str(p)) for i, p in enumerate(vocab)}
    for t in tj.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str):
            pairs[t["id"]] = t["content"]
    if not pairs:
        return None
    out: list[str] = [""] * (max(pairs) + 1)
    for i, t in pairs.items():
        out[i] = t
    return out


def _vocab_map(s: ModelView, c: ModelView) -> tuple[np.ndarray | None, bool, str]:
    ts, tc = token_strings(s), token_strings(c)
    if ts is None or tc is None or ts == tc[: len(ts)] or tc == ts[: len(tc)]:
        return None, False, ""
    where = {t: i for i, t in enumerate(tc) if t}
    vmap = np.array([where.get(t, -1) for t in ts], dtype=np.int64)
    rows_c = c.parts[Slot("embed")].rows if Slot("embed") in c.parts else len(tc)
    vmap[vmap >= rows_c] = -1
    shared = int((vmap >= 0).sum())
    return vmap, False, f"vocabulary re-mapped by token string ({shared} of {len(ts)} suspect tokens shared)"


def _vocab_by_rows(s: ModelView, c: ModelView) -> np.ndarray | None:
    """Embedding rows matched as units (tokens), when no tokenizer is there to map them by string."""
    slot = Slot("embed")
    if slot not in s.parts or slot not in c.parts or s.parts[slot].cols != c.parts[slot].cols:
        return None
    if max(s.parts[slot].rows, c.parts[slot].rows) > 65536:
        return None
    coords = res_coords(s.parts[slot].cols, 256)
    xs, xc = _Sketcher(s).cols(slot, coords), _Sketcher(c).cols(slot, coords)
    # two matchings on disjoint halves of the coordinates must agree far beyond chance (as in the match test)
    half = len(coords) // 2
    m1 = match([standardize(xs[:, :half])], [standardize(xc[:, :half])])
    m2 = match([standardize(xs[:, half:])], [standardize(xc[:, half:])])
    agree, both = agreements(m1.perm, m2.perm)
    if poisson_log10_sf(agree, both / max(xc.shape[0], 1)) > ACCEPT_LOG10P:
        return None
    return match([standardize(xs)], [standardize(xc)]).filled(xc.shape[0])


# ---- residual stream ----------------------------------------------------------------------------------------


def _hidden(view: ModelView) -> int:
    for role in ("embed", "lm_head"):
        if Slot(role) in view.parts:
            return view.parts[Slot(role)].cols
    h = view.config.get("hidden_size")
    if isinstance(h, int):
        return h
    raise InputError(f"{view.label}: cannot tell the hidden size")


def _token_sample(s: ModelView, vocab: np.ndarray | None, n_max: int = TOKEN_SAMPLE) -> tuple[np.ndarray, np.ndarray]:
    n = s.parts[Slot("embed")].rows if Slot("embed") in s.parts else 0
    ids = np.arange(n)
    cids = ids if vocab is None else vocab[:n]
    ok = cids >= 0
    ids, cids = ids[ok], cids[ok]
    if len(ids) > n_max:
        pick = np.unique(np.linspace(0, len(ids) - 1, n_max).astype(np.int64))
        ids, cids = ids[pick], cids[pick]
    return ids, cids


def _token_rows(s: ModelView, c: ModelView, vocab: np.ndarray | None, n_max: int,
                gains: dict[Slot, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows of shared tokens from the embeddings and (untied) lm_head, stacked: (suspect, candidate) float32. The
    candidate's lm_head is multiplied by its final norm gain when gains are folded."""
    blocks_s, blocks_c = [], []
    for role in ("embed", "lm_head"):
        slot = Slot(role)
        if slot not in s.parts or slot not in c.parts:
            continue
        ids, cids = _token_sample(s, vocab, n_max)
        keep = cids < c.parts[slot].rows
        ids, cids = ids[keep], cids[keep]
        if len(ids) < 8:
            continue
        xc = gather(c, slot, cids)
        g = (gains or {}).get(Slot("final_norm")) if role == "lm_head" else None
        blocks_s.append(gather(s, slot, ids))
        blocks_c.append(xc * g[None, :] if g is not None and len(g) == xc.shape[1] else xc)
    if not blocks_s or blocks_s[0].shape[1] != blocks_c[0].shape[1]:
        return None
    return np.concatenate(blocks_s), np.concatenate(blocks_c)


def _residual(s: ModelView, c: ModelView, vocab: np.ndarray | None, gains: dict[Slot, np.ndarray] | None = None
              ) -> tuple[ResidualMap, bool, str]:
    """Residual stream correspondence from embedding (and untied lm_head) rows of shared tokens."""
    # tokens sampled per matrix: 2048, fewer for very wide models (4 x tokens x hidden x 4 bytes stays <= 128 MB)
    rows = _token_rows(s, c, vocab, int(min(TOKEN_SAMPLE, max(512, (1 << 23) // max(_hidden(s), 1)))), gains)
    if rows is None:
        return ResidualMap(), False, ""
    es, ec = rows
    # residual dimensions as units, tokens as coordinates; each dimension centred over tokens first
    fs = [standardize(es.T - es.T.mean(axis=1, keepdims=True))]
    fc = [standardize(ec.T - ec.T.mean(axis=1, keepdims=True))]
    mean, z = identity_score(fs, fc)
    if z >= Z_IDENTITY and mean >= IDENTITY_TAU:
        return ResidualMap(), False, ""
    m = match(fs, fc)
    perm = m.filled(ec.shape[1])
    perm_ok = float(np.nanmedian(m.score)) >= RESIDUAL_MIN_COS
    # A rotation mixes every dimension, yet each rotated dimension still has a strongest component that a
    # permutation picks up: compare both maps on held-out tokens and keep the better one. The orthogonal fit needs
    # well over 2 x hidden tokens, read only now.
    r2_perm = _heldout_r2(es, ec[:, perm]) if perm_ok else -np.inf
    rot, r2_rot = _procrustes(s, c, vocab, gains) if _constant_gains(s) else (None, -np.inf)
    if rot is not None and r2_rot >= ROTATION_MIN_R2 and r2_rot > r2_perm + 0.1:
        return ResidualMap(rot=rot), True, f"residual stream rotated (orthogonal map, held-out R² {r2_rot:.3f})"
    if perm_ok:
        if np.array_equal(perm, np.arange(len(perm))):
            return ResidualMap(), False, ""
        return ResidualMap(perm=perm), True, "residual stream permuted"
    return ResidualMap(), False, ""


def _heldout_r2(es: np.ndarray, pred: np.ndarray) -> float:
    """R² of `pred` (best scalar multiple, fitted on even rows) for `es` on odd rows."""
    fit, held = slice(0, None, 2), slice(1, None, 2)
    den_fit = float((pred[fit] ** 2).sum())
    scale = float((es[fit] * pred[fit]).sum()) / den_fit if den_fit > 0 else 0.0
    tgt = es[held]
    den = float(((tgt - tgt.mean(axis=0)) ** 2).sum())
    return 1 - float(((tgt - scale * pred[held]) ** 2).sum()) / den if den > 0 else -np.inf


def _constant_gains(view: ModelView) -> bool:
    """Every norm gain vector constant (folded, or an untrained init): only then does a rotation of the residual
    stream leave the function unchanged, so only then is one looked for."""
    for sl in view.parts:
        if sl.role in NORM_ROLES:
            g = view.read(sl).ravel()
            if float(g.max() - g.min()) > 1e-3 * max(float(np.abs(g).max()), 1e-12):
                return False
    return True


def _procrustes(s: ModelView, c: ModelView, vocab: np.ndarray | None, gains: dict[Slot, np.ndarray] | None,
                chunk: int = 1024) -> tuple[np.ndarray | None, float]:
    """Orthogonal M with ec M ~ es (up to scale) over shared token rows of embed and lm_head: fitted on even
    tokens, scored by R² on odd ones (under independence the held-out R² is near or below zero), then refitted on
    all. Streams token rows in chunks and keeps only H x H cross-products (2 x 8 H^2 bytes plus the SVD's), since
    the fit needs well over 2 x hidden tokens."""
    roles = [r for r in ("embed", "lm_head") if Slot(r) in s.parts and Slot(r) in c.parts]
    if not roles:
        return None, -np.inf
    h = s.parts[Slot(roles[0])].cols
    n_tok = max(TOKEN_SAMPLE, -(-3 * h // len(roles)))
    cf, ch = np.zeros((h, h)), np.zeros((h, h))
    nf_c = nh_c = held_ss = 0.0
    held_sum = np.zeros(h)
    n_fit = n_held = 0
    for role in roles:
        slot = Slot(role)
        ids, cids = _token_sample(s, vocab, n_tok)
        keep = cids < c.parts[slot].rows
        ids, cids = ids[keep], cids[keep]
        g = (gains or {}).get(Slot("final_norm")) if role == "lm_head" else None
        for a in range(0, len(ids), chunk):
            xs = gather(s, slot, ids[a:a + chunk]).astype(np.float64)
            xc = gather(c, slot, cids[a:a + chunk]).astype(np.float64)
            if xs.shape[1] != h or xc.shape[1] != h:
                return None, -np.inf
            if g is not None and len(g) == h:
                xc *= g[None, :]
            ev, od = slice(0, None, 2), slice(1, None, 2)  # chunk starts are even: parity is global
            cf += xc[ev].T @ xs[ev]
            ch += xc[od].T @ xs[od]
            nf_c += float((xc[ev] ** 2).sum())
            nh_c += float((xc[od] ** 2).sum())
            held_ss += float((xs[od] ** 2).sum())
            held_sum += xs[od].sum(axis=0)
            n_fit += len(xs[ev])
            n_held += len(xs[od])
    if min(n_fit, n_held) < h + 1 or nf_c <= 0:
        return None, -np.inf
    u, _, vt = np.linalg.svd(cf)
    m = u @ vt
    scale = float((m * cf).sum()) / nf_c
    resid = held_ss - 2 * scale * float((m * ch).sum()) + scale * scale * nh_c  # |M| orthogonal keeps norms
    den = held_ss - float(held_sum @ held_sum) / n_held
    r2 = 1 - resid / den if den > 0 else -np.inf
    u, _, vt = np.linalg.svd(cf + ch)
    return (u @ vt).astype(np.float32), r2


def _fold(s: ModelView, c: ModelView) -> tuple[bool, dict[Slot, np.ndarray]]:
    """Fold the candidate's norm gains when the suspect's are all exactly one (folded) and the candidate's not."""
    ns = [sl for sl in s.parts if sl.role in NORM_ROLES]
    nc = [sl for sl in c.parts if sl.role in NORM_ROLES]
    if not ns or not nc:
        return False, {}
    if not all(np.allclose(s.read(sl), 1.0, atol=1e-3) for sl in ns):
        return False, {}
    gains = {sl: c.read(sl).ravel() for sl in nc}
    if all(np.allclose(g, 1.0, atol=1e-3) for g in gains.values()):
        return False, {}
    return True, gains


# ---- layers -------------------------------------------------------------------------------------------------


def _layer_signature(sk: _Sketcher, layer: int, coords: np.ndarray) -> np.ndarray | None:
    """Cosine Gram of sampled residual rows of o_proj and down_proj (summed over experts): unchanged by any
    permutation of heads, units or experts. Off-diagonal entries, each part standardized, concatenated."""
    parts = []
    view = sk.view
    groups: dict[str, list[Slot]] = {}
    for sl in view.parts:
        if sl.layer == layer and sl.role in ("attn_o", "mlp_down", "shared_down", "expert_down"):
            groups.setdefault("experts" if sl.role == "expert_down" else sl.role, []).append(sl)
    for key in ("attn_o", "mlp_down", "shared_down", "experts"):
        if key not in groups:
            continue
        g = np.zeros((len(coords), len(coords)))
        for sl in groups[key]:
            x = sk.rows(sl, coords).astype(np.float64)
            g += x @ x.T
        d = np.sqrt(np.maximum(np.diag(g), 1e-300))
        cg = g / d[:, None] / d[None, :]
        v = cg[np.triu_indices(len(coords), 1)]
        v = v - v.mean()
        nv = np.linalg.norm(v)
        parts.append(v / nv if nv > 0 else v)
    return np.concatenate(parts) / np.sqrt(len(parts)) if parts else None


def _layer_map(al: Alignment, s: ModelView, c: ModelView, sk_s: _Sketcher, sk_c: _Sketcher, coords: np.ndarray,
               ci: int, matches: list[LayerMatch]) -> None:
    exact = {m.layer: m.source_layer for m in matches if m.exact and m.candidate == ci - 1}
    s_layers = sorted({sl.layer for sl in s.parts if sl.layer >= 0})
    c_layers = sorted({sl.layer for sl in c.parts if sl.layer >= 0})
    sig_s = {layer: _layer_signature(sk_s, layer, coords) for layer in s_layers}
    sig_c = {layer: _layer_signature(sk_c, layer, coords) for layer in c_layers}
    moved, dup = [], []
    for layer in s_layers:
        if layer in exact:
            if exact[layer] != layer:
                al.layers[layer] = exact[layer]
            continue
        a = sig_s[layer]
        if a is None:
            continue
        sims = {m: float(a @ b) for m, b in sig_c.items() if b is not None and b.shape == a.shape}
        if not sims:
            continue
        order = sorted(sims, key=sims.get, reverse=True)
        best = order[0]
        second = sims[order[1]] if len(order) > 1 else 0.0
        if best != layer and sims[best] >= LAYER_MIN_SIM and sims[best] - max(second, sims.get(layer, -1)) \
                >= LAYER_MARGIN - 1e-12:
            al.layers[layer] = best
            al.layers_selected.add(layer)
            moved.append(f"{layer}←{best}")
        elif layer not in sims and sims[best] >= LAYER_MIN_SIM and sims[best] - second >= LAYER_MARGIN:
            al.layers[layer] = best
            al.layers_selected.add(layer)
            moved.append(f"{layer}←{best}")
    if moved:
        al.notes.append("layers re-mapped (suspect←candidate): " + ", ".join(moved))
    used = [al.cand_layer(x) for x in s_layers]
    dups = sorted({x for x in used if used.count(x) > 1})
    if dups:
        dup.append(", ".join(map(str, dups)))
        al.notes.append(f"candidate layers used more than once (duplicated): {dup[0]}")
    missing = [x for x in c_layers if x not in used]
    if missing and len(s_layers) < len(c_layers):
        al.notes.append(f"candidate layers absent from the suspect (dropped): {', '.join(map(str, missing))}")


# ---- attention heads ----------------------------------------------------------------------------------------


def _head_dims(view: ModelView) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) from the config and the q/k shapes; zeros when unknown."""
    cfg = view.config
    nh = cfg.get("num_attention_heads")
    nkv = cfg.get("num_key_value_heads") or nh
    q = next((p for sl, p in view.parts.items() if sl.role == "attn_q"), None)
    if not isinstance(nh, int) or not isinstance(nkv, int) or q is None or nh <= 0:
        return 0, 0, 0
    hd = cfg.get("head_dim") if isinstance(cfg.get("head_dim"), int) else q.rows // nh
    if hd <= 0 or q.rows % hd:
        return 0, 0, 0
    return nh, nkv, hd


def _small_match(fs: np.ndarray, fc: np.ndarray) -> tuple[np.ndarray | None, float, float]:
    """Exact assignment for a handful of units (heads, groups, experts) by centred cosine: (perm or None when the
    identity is as good, matched mean cosine, identity mean cosine)."""
    a = _rownorm(fs)
    b = _rownorm(fc)
    sim = a @ b.T
    n = min(sim.shape)
    ident = float(np.mean(np.diag(sim[:n, :n]))) if sim.shape[0] <= sim.shape[1] else -1.0
    from scipy.optimize import linear_sum_assignment  # 0.5 s to import: only audits that search for a disguise

    r, cidx = linear_sum_assignment(sim, maximize=True)
    matched = float(sim[r, cidx].mean())
    perm = np.full(sim.shape[0], -1)
    perm[r] = cidx
    if matched < SMALL_MIN_COS or (sim.shape[0] == sim.shape[1] and np.array_equal(perm, np.arange(len(perm)))):
        return None, matched, ident
    if matched - ident < 0.05 and sim.shape[0] == sim.shape[1]:
        return None, matched, ident
    return perm, matched, ident


def _rownorm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def _heads(al: Alignment, s: ModelView, c: ModelView, sk_s: _Sketcher, sk_c: _Sketcher, coords: np.ndarray,
           layer: int, cl: int, hs: tuple[int, int, int], hc: tuple[int, int, int], counts: dict) -> None:
    q, k, v, o = (Slot(r, layer) for r in ("attn_q", "attn_k", "attn_v", "attn_o"))
    qc, kc, vc, oc = (Slot(r, cl) for r in ("attn_q", "attn_k", "attn_v", "attn_o"))
    if not all(x in s.parts for x in (q, k, v, o)) or not all(x in c.parts for x in (qc, kc, vc, oc)):
        return
    nh_s, nkv_s, hd = hs
    nh_c, nkv_c, _ = hc
    if s.parts[q].rows != nh_s * hd or c.parts[qc].rows != nh_c * hd or nkv_s <= 0 or nkv_c <= 0:
        return
    ks, kcand = sk_s.cols(k, coords), sk_c.cols(kc, coords)
    vs, vcand = sk_s.cols(v, coords), sk_c.cols(vc, coords)
    gs = np.concatenate([ks.reshape(nkv_s, -1), vs.reshape(nkv_s, -1)], axis=1)
    gc = np.concatenate([kcand.reshape(nkv_c, -1), vcand.reshape(nkv_c, -1)], axis=1)
    gperm, _, _ = _small_match(gs, gc)
    groups = np.arange(nkv_s) if gperm is None else gperm
    if gperm is not None:
        al.kv_heads[layer] = gperm
        if np.any(np.diff(gperm) < 0):  # kept groups in their order are pruning, not a permutation
            counts["kv"] += 1
    qs_, qc_ = sk_s.cols(q, coords), sk_c.cols(qc, coords)
    os_, oc_ = sk_s.rows(o, coords), sk_c.rows(oc, coords)
    fs = np.concatenate([qs_.reshape(nh_s, -1), os_.reshape(len(coords), nh_s, hd).transpose(1, 0, 2)
                         .reshape(nh_s, -1)], axis=1)
    fc = np.concatenate([qc_.reshape(nh_c, -1), oc_.reshape(len(coords), nh_c, hd).transpose(1, 0, 2)
                         .reshape(nh_c, -1)], axis=1)
    per_s, per_c = nh_s // nkv_s, nh_c // nkv_c
    qmap = np.arange(nh_s)
    changed = False
    for g in range(nkv_s):
        gc_ = int(groups[g])
        if gc_ < 0:
            continue
        ids_s = np.arange(g * per_s, (g + 1) * per_s)
        ids_c = np.arange(gc_ * per_c, (gc_ + 1) * per_c)
        perm, _, _ = _small_match(fs[ids_s], fc[ids_c])
        if perm is None:
            qmap[ids_s] = ids_c[: len(ids_s)]
        else:
            qmap[ids_s] = ids_c[perm]
        if not np.array_equal(qmap[ids_s], ids_s):
            changed = True
    pruned = nh_s < nh_c
    if changed or pruned:
        al.q_heads[layer] = qmap
        if gperm is None and nkv_s < nkv_c:
            al.kv_heads[layer] = groups
        if pruned:
            counts["heads_pruned"] = f"{nh_s} of {nh_c}"
            counts["heads_pruned_layers"] += 1
        if np.any(np.diff(qmap) < 0):
            counts["heads"] += 1


# ---- MLP units and experts ----------------------------------------------------------------------------------


def _unit_features(sk: _Sketcher, gate: Slot, up: Slot, down: Slot, coords: np.ndarray
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    fin = [standardize(sk.cols(gate, coords)), standardize(sk.cols(up, coords))]
    fout = [standardize(sk.rows(down, coords).T)]
    return fin, fout


def _units(al: Alignment, sk_s: _Sketcher, sk_c: _Sketcher, coords: np.ndarray, roles: tuple[str, str, str],
           layer: int, cl: int, expert: int, cexpert: int, kind: str) -> tuple[np.ndarray | None, UnitTest] | None:
    ss = [Slot(r, layer, expert) for r in roles]
    cs = [Slot(r, cl, cexpert) for r in roles]
    if not all(sk_s.has(x) for x in ss) or not all(sk_c.has(x) for x in cs):
        return None
    n_s, n_c = sk_s.view.parts[ss[0]].rows, sk_c.view.parts[cs[0]].rows
    if n_s > n_c or n_s < 2:
        return None
    if n_c > WIDE_LAYER:
        coords = coords[np.linspace(0, len(coords) - 1, min(len(coords), RES_SAMPLE_WIDE)).astype(np.int64)]
    in_s, out_s = _unit_features(sk_s, *ss, coords)
    in_c, out_c = _unit_features(sk_c, *cs, coords)
    t = unit_test(in_s, in_c, out_s, out_c, layer, expert, kind)
    al.tests.append(t)
    if n_s == n_c and t.identity_z >= Z_IDENTITY:
        return None, t
    if t.log10p <= ACCEPT_LOG10P:
        perm = t.alignment()
        if n_s == n_c and np.array_equal(perm, np.arange(n_s)):
            return None, t
        return perm, t
    return None, t


def _mlp(al: Alignment, sk_s: _Sketcher, sk_c: _Sketcher, coords: np.ndarray, layer: int, cl: int, kind: str,
         counts: dict) -> None:
    roles = ("mlp_gate", "mlp_up", "mlp_down") if kind == "mlp" else ("shared_gate", "shared_up", "shared_down")
    got = _units(al, sk_s, sk_c, coords, roles, layer, cl, -1, -1, kind)
    if got is None or got[0] is None:
        return
    al.mlp[(kind, layer)] = got[0]
    if got[1].n_s < got[1].n_c:
        counts["pruned"] += 1
        counts["pruned_units"] = f"{got[1].n_s} of {got[1].n_c}"
    if np.any(np.diff(got[0]) < 0):  # survivors of pruning keep their order; a permutation does not
        counts["mlp"] += 1


def _experts(al: Alignment, s: ModelView, c: ModelView, sk_s: _Sketcher, sk_c: _Sketcher, coords: np.ndarray,
             layer: int, cl: int, counts: dict) -> None:
    es = sorted({sl.expert for sl in s.parts if sl.layer == layer and sl.role == "expert_down"})
    ec = sorted({sl.expert for sl in c.parts if sl.layer == cl and sl.role == "expert_down"})
    if not es or not ec:
        return
    emap = np.array(es)
    if len(es) > 1:
        fs = _expert_summary(sk_s, layer, es, coords)
        fc = _expert_summary(sk_c, cl, ec, coords)
        perm, _, _ = _small_match(fs, fc)
        if perm is not None:
            emap = np.array([ec[p] for p in perm])
            al.experts[layer] = emap
            counts["experts"] += 1
    roles = ("expert_gate", "expert_up", "expert_down")
    for e, ce in zip(es, emap, strict=True):
        got = _units(al, sk_s, sk_c, coords, roles, layer, cl, e, int(ce), "expert")
        if got is not None and got[0] is not None:
            al.expert_units[(layer, e)] = got[0]
            counts["expert_units"] += 1


def _expert_summary(sk: _Sketcher, layer: int, experts: list[int], coords: np.ndarray) -> np.ndarray:
    """Per expert, features unchanged by permuting its units: router row, sampled down rows summed over units,
    and their cosine Gram."""
    feats = []
    router = Slot("router", layer)
    rr = sk.cols(router, coords) if sk.has(router) else None
    iu = np.triu_indices(len(coords), 1)
    for j, e in enumerate(experts):
        x = sk.rows(Slot("expert_down", layer, e), coords).astype(np.float64)
        g = x @ x.T
        d = np.sqrt(np.maximum(np.diag(g), 1e-300))
        parts = [_unit(x.sum(axis=1)), _unit((g / d[:, None] / d[None, :])[iu])]
        if rr is not None and j < rr.shape[0]:
            parts.append(_unit(rr[e]))
        feats.append(np.concatenate(parts))
    return np.stack(feats)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64) - np.mean(v)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v
