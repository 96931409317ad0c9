"""Seeing through disguises with fingerprints alone: fingerprints re-expressed in a common basis so that `identify`'s
lineage and recipe fits still apply (align/disguise.py does this for the audit, on full weights). The evidence that
survives disguises is computed in fingerprint/invariant.py (re-exported here), the per-slot placement tests in
fingerprint/placement.py; thresholds and the orthogonal fit are the alignment core's (align/core.py), and which
roles read which norm gain comes from the family data (align/roles.py).

Lineage (`align_group`): when the coordinate samples of the suspect relate to a candidate's, slots that do not (units,
heads or experts permuted; vocabulary re-ordered) are left out of the fits and a candidate's norm gains are folded
when the suspect's are all 1. When the products relate but the token rows are not in place (residual stream permuted
or rotated; the coordinates then relate only through a permutation's fixed points), or when no matrix is left in
place, suspect and candidates are re-expressed as their token rows in the suspect's basis (a permutation, accepted
only if it fits about as well as a rotation, or an orthogonal fit when there are >= 3 x hidden token rows) and the
recipe is fitted on those. Otherwise only invariant evidence exists and `identify` says so and points at `modeltrace
audit`. Folded gains together with every matrix of a layer permuted leave nothing that tells that layer from one
taken from another model: `identify` then reports a partial relation (the audit matches the units on the full
weights).

Data flow: identify -> `align_group(suspect, fingerprints, related, evidence...)` -> `Aligned` (pseudo-fingerprints
for lineage). Memory: copies of the suspect's and related candidates' fingerprints with slots dropped or re-based
(token rows: <= 256 x H per model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from modeltrace.align.core import PERMUTATION_R2_SLACK, ROTATION_MIN_R2, Z_IDENTITY, procrustes, scaled_r2
from modeltrace.align.roles import Roles
from modeltrace.architectures import Slot
from modeltrace.fingerprint.compare import PairEvidence
from modeltrace.fingerprint.core import Fingerprint, SlotSample
from modeltrace.fingerprint.invariant import (
    DisguiseEvidence,
    evidence,
    exchangeable_z,
    fp_roles,
    residual_map,
    shared_tokens,
    token_matrix,
)
from modeltrace.fingerprint.placement import disguised_slots, gain_z, mixed_slots, placed_z, slot_z
from modeltrace.fingerprint.sampling import column_order

__all__ = ["Aligned", "DisguiseEvidence", "align_group", "evidence", "fold_candidate", "token_fp"]

#: An orthogonal map of the residual stream is fitted only with at least this many token rows per hidden dimension.
ROTATION_ROWS_PER_DIM = 3

#: Notes by group of the spaces a disguised slot's units lie in (align/roles.py).
GROUP_OF_SPACE = {"mlp": "mlp", "shared": "mlp", "heads": "attention", "kv_heads": "attention", "qkv": "attention",
                  "expert": "experts", "experts": "experts", "vocab": "vocabulary"}
GROUP_NOTE = {"mlp": "MLP units permuted (or replaced) in {n} of {L} layers",
              "attention": "attention heads permuted (or replaced) in {n} of {L} layers",
              "experts": "experts or expert units permuted (or replaced) in {n} of {L} layers",
              "vocabulary": "vocabulary rows re-ordered (or replaced)"}


# ---- pseudo-fingerprints --------------------------------------------------------------------------------------
def token_fp(fp: Fingerprint, idx: np.ndarray, rows: int, cols: np.ndarray | None = None,
             rot: np.ndarray | None = None, fold: bool = False) -> Fingerprint:
    """Token rows at `idx` as a fingerprint with slots embed and lm_head, columns re-indexed by `cols` (candidate
    column per suspect column) or mapped by `rot` into the suspect's basis; `fold` multiplies lm_head rows by the
    final norm gain (when the suspect's gains are folded in). `rows` labels the shape so every model matches."""
    r = fp.robust
    assert r is not None
    slots: dict[Slot, SlotSample] = {}
    for role in r.rows:
        x = token_matrix(r, idx, [role], fold)
        if cols is not None:
            x = x[:, cols]
        if rot is not None:
            x = x @ rot
        slot = Slot(role)
        slots[slot] = SlotSample(slot, rows, x.shape[1], r.dtypes.get(role, "F32"), 0, False, x.astype(np.float32))
    return Fingerprint(fp.model, fp.content_hash, fp.bytes_read, fp.requests, slots, robust=r)




def _group(roles: Roles, role: str) -> str:
    """The note group of a role: the group of the space it reads or writes other than the residual stream."""
    sem = roles.of(role)
    if sem is None:
        return ""
    return GROUP_OF_SPACE.get(sem.writes if sem.reads == "residual" else sem.reads, "")


def _slot_notes(bad: set[Slot], n_layers: int, roles: Roles) -> list[str]:
    notes = []
    for group in GROUP_NOTE:
        hit = {k.layer for k in bad if _group(roles, k.role) == group}
        if hit:
            notes.append(GROUP_NOTE[group].format(n=len(hit - {-1}), L=n_layers))
    other = sorted({k.role for k in bad if not _group(roles, k.role)})
    if other:
        notes.append("no relation in " + ", ".join(other))
    return notes


def fold_candidate(c: Fingerprint) -> Fingerprint | None:
    """The candidate with its norm gains folded into the sampled columns of the matrices that read them (what a
    suspect whose gains are all 1 holds); None when its kept gains do not cover those columns."""
    r = c.robust
    if r is None or not len(r.gain_idx):
        return None
    slots = dict(c.slots)
    pos = {int(v): i for i, v in enumerate(r.gain_idx)}
    roles = fp_roles(c)
    for k, smp in c.slots.items():
        gslot = roles.gain_slot(k) if roles.residual_axis(k.role) == 1 else None
        if gslot is None:
            continue
        g = r.gains.get(gslot)
        if g is None:
            continue
        cols = column_order(smp.rows, smp.cols)[:smp.values.shape[1]]
        if len(g) == smp.cols:  # kept whole (the final norm)
            gk = g[cols]
        else:
            at = [pos.get(int(x)) for x in cols]
            if any(p is None for p in at):
                return None
            gk = g[np.array(at, dtype=np.int64)]
        slots[k] = SlotSample(k, smp.rows, smp.cols, smp.dtype, smp.row0, smp.structured,
                              (smp.values * gk[None, :]).astype(np.float32), smp.stats)
    return Fingerprint(c.model, c.content_hash, c.bytes_read, c.requests, slots, robust=r)


# ---- aligning a group for lineage -----------------------------------------------------------------------------
@dataclass
class Aligned:
    """Suspect and candidates as `identify`'s lineage stage should see them."""

    mode: str  # coordinates | tokens | invariant
    suspect: Fingerprint
    fps: dict[str, Fingerprint]
    notes: list[str]
    per_candidate: dict[str, list[str]] = field(default_factory=dict)  # what was undone for each candidate


def align_group(suspect: Fingerprint, fps: dict[str, Fingerprint], related: list[str],
                ev: dict[str, PairEvidence], dv: dict[str, DisguiseEvidence | None], alpha_log10: float) -> Aligned:
    """How lineage should see the suspect and its related candidates (strongest evidence first in `related`)."""
    coord = [n for n in related if ev[n].log10_p < alpha_log10]
    undone: list[str] = []
    if coord:
        d = dv.get(coord[0])
        if (d is not None and d.tokens >= 16 and d.token_z < Z_IDENTITY and d.products is not None
                and d.products.log10_p < alpha_log10):
            # the reader products relate but the token rows are not in place: the residual stream was re-based, and
            # what coordinates still relate (a permutation's fixed points) is too little to fit on
            tok = _token_mode(suspect, fps, related, dv)
            if tok is not None:
                return tok
        al = _coordinate_mode(suspect, fps, related, ev, dv, coord[0])
        if any(not v.structured for v in al.suspect.slots.values()):
            return al
        undone = al.notes  # every matrix was disguised: what is left to fit is the token rows
    tok = _token_mode(suspect, fps, related, dv)
    if tok is not None:
        tok.notes = list(dict.fromkeys([*undone, *tok.notes]))
        return tok
    if undone:
        return Aligned("invariant", suspect, fps, undone)
    return Aligned("invariant", suspect, fps, ["residual stream rotated or otherwise re-based (only evidence "
                                               "unchanged by such maps: reader products)"])


def _coordinate_mode(suspect: Fingerprint, fps: dict[str, Fingerprint], related: list[str],
                     ev: dict[str, PairEvidence], dv: dict[str, DisguiseEvidence | None], top: str) -> Aligned:
    notes: list[str] = []
    out = dict(fps)
    s = suspect
    folded = s.robust is not None and s.robust.folded()
    if folded:
        changed = []
        for n in related:
            r = fps[n].robust
            if r is not None and not r.folded():
                f = fold_candidate(fps[n])
                if f is not None:
                    out[n] = f
                    changed.append(n)
        if changed:
            notes.append("norm gains folded into the matrices that read them")
            gains = fp_roles(s)
            s = Fingerprint(s.model, s.content_hash, s.bytes_read, s.requests,
                            {k: v for k, v in s.slots.items() if not gains.is_gain(k.role)}, robust=s.robust)
    lm = ev[top].layer_map
    bad = disguised_slots(slot_z(s, out[top], lm), gain_z(s, out[top], lm), placed_z(s, out[top], lm))
    bad |= mixed_slots(s, out[top], lm)
    if bad:
        notes += _slot_notes(bad, suspect.model.get("layers") or 0, fp_roles(suspect))
        vocab = {k.role for k in bad if k.role in ("embed", "lm_head")}
        if vocab and all(_role_token_z(suspect, fps[top], r) >= Z_IDENTITY for r in vocab):
            notes = [x if not x.startswith("vocabulary") else "vocabulary re-ordered (rows matched by token string)"
                     for x in notes]
        # a layer left without any matrix keeps only slots that were moved with them (k and v with the heads, the
        # router with the experts) or that cannot place it (gains): the fits leave it out altogether
        kept = {k.layer for k, v in s.slots.items() if k not in bad and not v.structured}
        gone = {k.layer for k in bad if k.layer >= 0} - kept
        s = Fingerprint(s.model, s.content_hash, s.bytes_read, s.requests,
                        {k: v for k, v in s.slots.items() if k not in bad and k.layer not in gone}, robust=s.robust)
    if s is suspect:
        return Aligned("coordinates", suspect, fps, [])
    return Aligned("coordinates", s, out, notes)


def _role_token_z(s: Fingerprint, c: Fingerprint, role: str) -> float:
    """`exchangeable_z` of one vocabulary matrix's token rows, matched by token (0 when they cannot be)."""
    a, b = s.robust, c.robust
    if a is None or b is None or role not in a.rows or role not in b.rows or a.hidden != b.hidden:
        return 0.0
    ia, ib = shared_tokens(a, b)
    return exchangeable_z([(token_matrix(a, ia, [role]), token_matrix(b, ib, [role]))])[0] if len(ia) >= 8 else 0.0


def _token_mode(suspect: Fingerprint, fps: dict[str, Fingerprint], related: list[str],
                dv: dict[str, DisguiseEvidence | None]) -> Aligned | None:
    """Suspect and candidates as token rows in the suspect's residual basis, when a permutation (or, for narrow
    models, a rotation) of the residual stream can be recovered against the strongest candidate."""
    a = suspect.robust
    if a is None:
        return None
    rob = {n: r for n in related if (r := fps[n].robust) is not None and dv.get(n) is not None}
    group = list(rob)
    if not group:
        return None
    keys = a.keys
    for n in group:
        r = rob[n]
        keys = np.intersect1d(keys, r.keys if r.token_kind == a.token_kind else np.zeros(0, np.uint64))
    roles = [x for x in ("embed", "lm_head") if x in a.rows and all(x in rob[n].rows for n in group)]
    if len(keys) < 16 or not roles:
        return None
    idx: dict[str, np.ndarray] = {n: np.asarray(np.searchsorted(rob[n].keys, keys)) for n in group}
    ia: np.ndarray = np.asarray(np.searchsorted(a.keys, keys))
    xs = token_matrix(a, ia, roles)
    h = xs.shape[1]
    folded = a.folded()
    maps: dict[str, tuple[str, np.ndarray | None, np.ndarray | None]] = {}
    for n in group:
        r = rob[n]
        if r.hidden != h:
            continue
        xc = token_matrix(r, idx[n], roles, fold=folded and not r.folded())
        if exchangeable_z([(xs, xc)])[0] >= Z_IDENTITY:
            maps[n] = ("identity", None, None)
            continue
        res = residual_map(xs, xc)
        rot, r2 = procrustes(xs, xc) if xs.shape[0] >= ROTATION_ROWS_PER_DIM * h else (None, -math.inf)
        # the two matchings also agree on many dimensions of a rotated stream (each rotated dimension leans on a few
        # of the candidate's, 30 of 64 in the test corpus): a permutation must fit about as well as a rotation
        if res.kind in ("permuted", "identity") and (
                rot is None or scaled_r2(xs[1::2], xc[1::2][:, _perm(res.perm, h)]) >= r2 - PERMUTATION_R2_SLACK):
            maps[n] = (res.kind, res.perm, None)
            continue
        if rot is not None and r2 >= ROTATION_MIN_R2:
            maps[n] = ("rotated", None, rot)
    if not maps:
        return None
    rows = int(suspect.slots[Slot("embed")].rows) if Slot("embed") in suspect.slots else len(keys)
    out = {n: token_fp(fps[n], idx[n], rows, cols=m[1], rot=m[2], fold=folded and not rob[n].folded())
           for n, m in maps.items()}
    kinds = {m[0] for m in maps.values()}
    notes = []
    if "permuted" in kinds:
        notes.append("residual stream permuted")
    if "rotated" in kinds:
        notes.append("residual stream rotated (orthogonal map fitted on token rows)")
    if folded and any(not rob[n].folded() for n in maps):
        notes.append("norm gains folded into the matrices that read them")
    notes.append(f"recipe from {len(keys)} shared token rows of {' and '.join(roles)} only")
    s_fp = token_fp(suspect, ia, rows)
    per = {n: [{"identity": "residual stream in place", "permuted": "residual stream permuted",
                "rotated": "residual stream rotated"}[m[0]]] for n, m in maps.items()}
    return Aligned("tokens", s_fp, {**fps, **out}, notes, per)


def _perm(perm: np.ndarray | None, h: int) -> np.ndarray:
    return np.arange(h) if perm is None else perm
