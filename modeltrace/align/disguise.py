"""Seeing through disguises: recover how a suspect's units, heads, experts, layers, vocabulary and residual stream
correspond to a candidate's, when a function-preserving transformation has changed the numbers.

Runs only for a candidate whose identity alignment fails somewhere (the layer map's sampled rows do not correlate,
or embeddings do not), so an undisguised audit pays nothing. Everything is read as sketches, never whole models:

- residual stream (align/residual.py): columns of sampled embedding (and lm_head) rows, matched as units (a
  permutation), else an orthogonal Procrustes fit on half the sampled tokens checked on the other half (a rotation);
- norm gains: when every suspect gain is exactly 1 and the candidate's are not, the candidate's are folded into the
  matrices that read them;
- layers (align/units.py): a unit-permutation-invariant signature per layer (cosine Gram of sampled residual rows of
  the residual writers, summed over experts), matched only where the layer map found no identity;
- per layer: KV groups, then query heads within groups; MLP units (`align.match_test`, which also gives the
  permutation-invariant independence p-value); experts by router row and invariant expert summaries, then each
  expert's units.

Which tensors play which part comes from the family's data (align/roles.py): a family is searched when its data
declares the role semantics (`Roles.ready`). Data flow: `discover` -> `align_pair` per candidate -> an `Alignment`
(align/alignment.py) that the audit's streaming pass reads slot by slot. Memory: per model, the sampled rows
(`RES_SAMPLE` residual coordinates, `TOKEN_SAMPLE` tokens) plus, for the layer being aligned, units x 3 x RES_SAMPLE
float32 features for each model (a 20k-unit layer: ~30 MB each), plus the integer maps kept for the streaming pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from modeltrace.align import units
from modeltrace.align.alignment import Alignment
from modeltrace.align.core import ACCEPT_LOG10P, IDENTITY_TAU
from modeltrace.align.layers import LayerMatch
from modeltrace.align.residual import embed_identity, fold, hidden, residual, token_strings, vocab_by_rows, vocab_map
from modeltrace.align.roles import UNIT_SPACES, roles_of
from modeltrace.align.sketch import Sketcher, res_coords
from modeltrace.align.transform import gather
from modeltrace.align.view import ModelView
from modeltrace.errors import InputError

__all__ = ["Alignment", "align_pair", "discover", "needs_alignment", "token_strings"]


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
    return embed_identity(s, c) < IDENTITY_TAU or _routers_moved(s, c) or fold(s, c)[0]


def _routers_moved(s: ModelView, c: ModelView, k: int = 8, layers: int = 4) -> bool:
    """Experts permuted while expert 0 (the one the layer map samples) stayed: the first router rows of a few MoE
    layers (one contiguous read each), compared at the same expert index, show it."""
    names = roles_of(s.family).writing("experts")
    routers = sorted(sl for sl in s.parts if sl.role in names)
    if len(routers) > layers:
        routers = [routers[int(i)] for i in np.linspace(0, len(routers) - 1, layers)]
    for slot in routers:
        part, cp = s.parts[slot], c.parts.get(slot)
        if cp is None or (cp.rows, cp.cols) != (part.rows, part.cols) or part.rows < 2:
            continue
        ids = np.arange(min(k, part.rows))
        a: np.ndarray = gather(s, slot, ids).astype(np.float64)
        b: np.ndarray = gather(c, slot, ids).astype(np.float64)
        a -= a.mean(axis=1, keepdims=True)
        b -= b.mean(axis=1, keepdims=True)
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), 0.0)
        if float(cos.min()) < IDENTITY_TAU:
            return True
    return False


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
    return max((p.rows for p in view.parts.values()), default=0) <= 4096 and hidden(view) <= 1024


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
        if not roles_of(s.family).ready or not roles_of(c.family).ready:
            warnings.append(f"{c.label}: disguise checks (permutations, rotations) are not available for the "
                            f"{c.family.name} naming family; compared in stored order")
            out.append(None)
            continue
        try:
            out.append(align_pair(s, c, i, matches))
        except InputError:
            raise
        except (ValueError, np.linalg.LinAlgError, KeyError) as exc:  # an odd shape must not sink the audit
            hs, hc = hidden(s), hidden(c)
            why = (f"hidden size {hc}, the suspect's {hs}" if hs and hc and hs != hc else
                   "no consistent unit matching" if not isinstance(exc, np.linalg.LinAlgError) else
                   "a numerical failure")  # never numpy's own text: it names shapes, not the problem
            warnings.append(f"{c.label}: could not be aligned to the suspect ({why}); compared in stored order")
            out.append(None)
    return out


def align_pair(s: ModelView, c: ModelView, ci: int, matches: list[LayerMatch]) -> Alignment:
    al = Alignment(ci, roles=roles_of(s.family))
    h = hidden(s)
    al.vocab, al.vocab_selected, vnote = vocab_map(s, c)
    al.fold, al.gains = fold(s, c)
    al.residual, al.residual_selected, rnote = residual(s, c, al.vocab, al.gains if al.fold else None)
    if al.residual.kind == "identity" and al.vocab is None and embed_identity(s, c) < IDENTITY_TAU:
        vmap = vocab_by_rows(s, c)  # no tokenizer: match embedding rows themselves (residual not permuted)
        if vmap is not None:
            al.vocab, al.vocab_selected, vnote = vmap, True, "vocabulary rows re-ordered (matched by embedding)"
    for note in (vnote, rnote):
        if note:
            al.notes.append(note)
    if al.fold:
        al.notes.append("norm gains folded into the matrices that read them")
    sk_s = Sketcher(s)
    sk_c = Sketcher(c, al.residual, al.gains if al.fold else None)
    coords = res_coords(h)
    units.layer_map(al, s, c, sk_s, sk_c, coords, ci, matches)
    hs, hc = units.head_dims(s), units.head_dims(c)
    al.head_dim = (hs[2], hc[2])
    al.cand_heads = (hc[0], hc[1])
    counts: dict = {"mlp": 0, "heads": 0, "kv": 0, "experts": 0, "expert_units": 0, "pruned": 0, "heads_pruned": "",
                    "heads_pruned_layers": 0}
    layers = sorted({sl.layer for sl in s.parts if sl.layer >= 0})
    for layer in layers:
        cl = al.cand_layer(layer)
        if hs[2] and hc[2] and hs[2] == hc[2]:
            units.heads(al, s, c, sk_s, sk_c, coords, layer, cl, hs, hc, counts)
        for kind in UNIT_SPACES:
            units.mlp(al, sk_s, sk_c, coords, layer, cl, kind, counts)
        units.experts(al, s, c, sk_s, sk_c, coords, layer, cl, counts)
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


