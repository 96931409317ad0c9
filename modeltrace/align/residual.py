"""Vocabulary and residual-stream correspondence between a suspect and a candidate, from their token rows
(embedding and untied lm_head), and norm-gain folding: the first steps of the audit's disguise search.

Data flow: align/disguise.py's `align_pair` calls `vocab_map` (token strings, else `vocab_by_rows`), `fold` and then
`residual`, which matches residual dimensions as units (a permutation) and, when every norm gain is constant, fits an
orthogonal map (align/core.orthogonal) on streamed cross-products, keeping whichever explains held-out tokens better.
Memory: TOKEN_SAMPLE token rows per matrix (fewer for very wide models: <= 128 MB), and for the orthogonal fit two
H x H float64 cross-products plus the SVD's; which roles are norm gains comes from the family data (align/roles.py).
"""

from __future__ import annotations

import json

import numpy as np

from modeltrace.align.core import (
    ACCEPT_LOG10P,
    IDENTITY_TAU,
    RESIDUAL_MIN_COS,
    ROTATION_MIN_R2,
    Z_IDENTITY,
    ResidualMap,
    heldout_r2,
    orthogonal,
)
from modeltrace.align.match import agreements, identity_score, match, standardize
from modeltrace.align.roles import roles_of
from modeltrace.align.sketch import TOKEN_SAMPLE, Sketcher, res_coords
from modeltrace.align.transform import gather
from modeltrace.align.view import ModelView
from modeltrace.architectures import Slot
from modeltrace.errors import InputError
from modeltrace.stats import poisson_log10_sf

__all__ = ["embed_identity", "fold", "hidden", "residual", "token_strings", "vocab_by_rows", "vocab_map"]


def embed_identity(s: ModelView, c: ModelView) -> float:
    slot = Slot("embed")
    if slot not in s.parts or slot not in c.parts or s.parts[slot].cols != c.parts[slot].cols:
        return 1.0
    n = min(s.parts[slot].rows, c.parts[slot].rows)
    # two contiguous blocks of 16 rows (two reads, also over HTTP ranges)
    ids = np.unique(np.concatenate([np.arange(16), n // 2 + np.arange(16)]).clip(0, n - 1))
    a: np.ndarray = gather(s, slot, ids).ravel().astype(np.float64)
    b: np.ndarray = gather(c, slot, ids).ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den > 0 else 0.0


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


def vocab_map(s: ModelView, c: ModelView) -> tuple[np.ndarray | None, bool, str]:
    ts, tc = token_strings(s), token_strings(c)
    if ts is None or tc is None or ts == tc[: len(ts)] or tc == ts[: len(tc)]:
        return None, False, ""
    where = {t: i for i, t in enumerate(tc) if t}
    vmap = np.array([where.get(t, -1) for t in ts], dtype=np.int64)
    rows_c = c.parts[Slot("embed")].rows if Slot("embed") in c.parts else len(tc)
    vmap[vmap >= rows_c] = -1
    shared = int((vmap >= 0).sum())
    return vmap, False, f"vocabulary re-mapped by token string ({shared} of {len(ts)} suspect tokens shared)"


def vocab_by_rows(s: ModelView, c: ModelView) -> np.ndarray | None:
    """Embedding rows matched as units (tokens), when no tokenizer is there to map them by string."""
    slot = Slot("embed")
    if slot not in s.parts or slot not in c.parts or s.parts[slot].cols != c.parts[slot].cols:
        return None
    if max(s.parts[slot].rows, c.parts[slot].rows) > 65536:
        return None
    coords = res_coords(s.parts[slot].cols, 256)
    xs, xc = Sketcher(s).cols(slot, coords), Sketcher(c).cols(slot, coords)
    # two matchings on disjoint halves of the coordinates must agree far beyond chance (as in the match test)
    half = len(coords) // 2
    m1 = match([standardize(xs[:, :half])], [standardize(xc[:, :half])])
    m2 = match([standardize(xs[:, half:])], [standardize(xc[:, half:])])
    agree, both = agreements(m1.perm, m2.perm)
    if poisson_log10_sf(agree, both / max(xc.shape[0], 1)) > ACCEPT_LOG10P:
        return None
    return match([standardize(xs)], [standardize(xc)]).filled(xc.shape[0])


# ---- residual stream ----------------------------------------------------------------------------------------


def hidden(view: ModelView) -> int:
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


def residual(s: ModelView, c: ModelView, vocab: np.ndarray | None, gains: dict[Slot, np.ndarray] | None = None
              ) -> tuple[ResidualMap, bool, str]:
    """Residual stream correspondence from embedding (and untied lm_head) rows of shared tokens."""
    # tokens sampled per matrix: 2048, fewer for very wide models (4 x tokens x hidden x 4 bytes stays <= 128 MB)
    rows = _token_rows(s, c, vocab, int(min(TOKEN_SAMPLE, max(512, (1 << 23) // max(hidden(s), 1)))), gains)
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
    r2_perm = heldout_r2(es, ec[:, perm]) if perm_ok else -np.inf
    rot, r2_rot = _streamed_procrustes(s, c, vocab, gains) if _constant_gains(s) else (None, -np.inf)
    if rot is not None and r2_rot >= ROTATION_MIN_R2 and r2_rot > r2_perm + 0.1:
        return ResidualMap(rot=rot), True, f"residual stream rotated (orthogonal map, held-out R² {r2_rot:.3f})"
    if perm_ok:
        if np.array_equal(perm, np.arange(len(perm))):
            return ResidualMap(), False, ""
        return ResidualMap(perm=perm), True, "residual stream permuted"
    return ResidualMap(), False, ""


def _constant_gains(view: ModelView) -> bool:
    """Every norm gain vector constant (folded, or an untrained init): only then does a rotation of the residual
    stream leave the function unchanged, so only then is one looked for."""
    roles = roles_of(view.family)
    for sl in view.parts:
        if roles.is_gain(sl.role):
            g = view.read(sl).ravel()
            if float(g.max() - g.min()) > 1e-3 * max(float(np.abs(g).max()), 1e-12):
                return False
    return True


def _streamed_procrustes(s: ModelView, c: ModelView, vocab: np.ndarray | None, gains: dict[Slot, np.ndarray] | None,
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
            xs: np.ndarray = gather(s, slot, ids[a:a + chunk]).astype(np.float64)
            xc: np.ndarray = gather(c, slot, cids[a:a + chunk]).astype(np.float64)
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
    m = orthogonal(cf)
    scale = float((m * cf).sum()) / nf_c
    resid = held_ss - 2 * scale * float((m * ch).sum()) + scale * scale * nh_c  # |M| orthogonal keeps norms
    den = held_ss - float(held_sum @ held_sum) / n_held
    r2 = 1 - resid / den if den > 0 else -np.inf
    return orthogonal(cf + ch).astype(np.float32), r2


def fold(s: ModelView, c: ModelView) -> tuple[bool, dict[Slot, np.ndarray]]:
    """Fold the candidate's norm gains when the suspect's are all exactly one (folded) and the candidate's not."""
    rs, rc = roles_of(s.family), roles_of(c.family)
    ns = [sl for sl in s.parts if rs.is_gain(sl.role)]
    nc = [sl for sl in c.parts if rc.is_gain(sl.role)]
    if not ns or not nc:
        return False, {}
    if not all(np.allclose(s.read(sl), 1.0, atol=1e-3) for sl in ns):
        return False, {}
    gains = {sl: c.read(sl).ravel() for sl in nc}
    if all(np.allclose(g, 1.0, atol=1e-3) for g in gains.values()):
        return False, {}
    return True, gains


