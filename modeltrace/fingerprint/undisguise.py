"""Seeing through disguises with fingerprints alone: evidence that survives them, and fingerprints re-expressed in
a common basis so that `identify`'s lineage and recipe fits still apply (align/disguise.py does this for the audit,
on full weights).

Evidence (`evidence`), per suspect and candidate, each a one-sided p-value of "independent":

- reader products (robust.py) compared as the coordinate samples are (compare.py: double-centred correlation per
  matrix, Fisher z, Stouffer, and the layer-matched version): unchanged by a permuted or rotated residual stream,
  folded gains and a re-ordered vocabulary (tokens are matched by the hash of their string);
- token rows at the same residual columns (vocabulary re-ordered by token string, residual stream in place);
- residual-stream permutation: the residual dimensions of the two models' token rows matched as units twice, on
  disjoint halves of the tokens, and the agreements counted (the match test of detectors/match_test.py). Independent
  models trained on the same data agree on a few privileged dimensions beyond the Poisson(1) null (11 of 64 in the
  test corpus, Poisson p ~ 1e-8), so the permutation is accepted only when at least half of the dimensions agree,
  and only then does the count's p-value count as evidence.

Lineage (`align_group`): when the coordinate samples of the suspect relate to a candidate's, slots that do not (units,
heads or experts permuted; vocabulary re-ordered) are left out of the fits and a candidate's norm gains are folded
when the suspect's are all 1; when only the token rows relate (residual stream permuted) or only the products do
(rotated), suspect and candidates are re-expressed as their token rows in the suspect's basis (a permutation, or an
orthogonal fit when there are >= 3 x hidden token rows) and the recipe is fitted on those. Otherwise only invariant
evidence exists and `identify` says so and points at `modeltrace audit`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from modeltrace.architectures import Slot
from modeltrace.fingerprint.compare import PairEvidence, compare, units
from modeltrace.fingerprint.core import Fingerprint, SlotSample, centred_unit
from modeltrace.fingerprint.robust import GAIN_OF, RobustSection
from modeltrace.fingerprint.sampling import column_order
from modeltrace.stats import fisher_z, log10_sf, poisson_log10_sf

#: Residual permutation accepted when two matchings on disjoint token halves agree on this share of dimensions.
MIN_AGREE_SHARE = 0.5
#: ... and their agreement count is at least this significant (log10 p under Poisson).
ACCEPT_LOG10P = -6.0
#: Suspect dimensions matched for the agreement test in wide models (all of them once accepted).
TEST_DIMS = 512
#: Token-row identity (same columns) taken as "residual stream in place" above this z.
Z_IDENTITY = 8.0
#: An orthogonal map of the residual stream is fitted only with at least this many token rows per hidden dimension.
ROTATION_ROWS_PER_DIM = 3
#: A rotation is used for the recipe when it explains this share of held-out token rows.
ROTATION_MIN_R2 = 0.2
#: A slot whose same-slot z stays below Z_WEAK while another role of its layer exceeds Z_STRONG is disguised.
Z_WEAK, Z_STRONG = 3.0, 10.0

ROLE_GROUPS = {"mlp": ("mlp_gate", "mlp_up", "mlp_down", "shared_gate", "shared_up", "shared_down"),
               "attention": ("attn_q", "attn_k", "attn_v", "attn_o"),
               "experts": ("expert_gate", "expert_up", "expert_down", "router"),
               "vocabulary": ("embed", "lm_head")}
GROUP_NOTE = {"mlp": "MLP units permuted (or replaced) in {n} of {L} layers",
              "attention": "attention heads permuted (or replaced) in {n} of {L} layers",
              "experts": "experts or expert units permuted (or replaced) in {n} of {L} layers",
              "vocabulary": "vocabulary rows re-ordered (or replaced)"}
NORM_ROLES = ("attn_norm", "mlp_norm", "final_norm", "mlp_norm_extra")


# ---- token alignment ------------------------------------------------------------------------------------------
def shared_tokens(a: RobustSection, b: RobustSection, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices into a's and b's token arrays of the tokens both hold (same hash), in hash order."""
    if a.token_kind != b.token_kind:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ka, kb = (a.keys, b.keys) if limit is None else (a.keys[:limit], b.keys[:limit])
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    return ia.astype(np.int64), ib.astype(np.int64)


def _token_matrix(r: RobustSection, idx: np.ndarray, roles: list[str], fold: bool = False) -> np.ndarray:
    """Token rows of `roles` stacked (float64); `fold`: lm_head rows times the final norm gain."""
    out = []
    for x in roles:
        v = r.rows[x][idx].astype(np.float64)
        if fold and x == "lm_head":
            g = r.gains.get(Slot("final_norm"))
            if g is not None and len(g) == v.shape[1]:
                v = v * g[None, :]
        out.append(v)
    return np.concatenate(out)


def _roles(a: RobustSection, b: RobustSection) -> list[str]:
    h = a.hidden
    return [x for x in ("embed", "lm_head") if x in a.rows and x in b.rows and b.rows[x].shape[1] == h]


# ---- pseudo-fingerprints --------------------------------------------------------------------------------------
def product_fp(fp: Fingerprint, idx: np.ndarray) -> Fingerprint:
    """The reader products at tokens `idx` as a fingerprint (slots keyed like the sampled reader blocks), for
    compare(): the same double-centred correlation and null as coordinate samples."""
    from modeltrace.architectures import STRUCTURED_ROLES

    r = fp.robust
    slots: dict[Slot, SlotSample] = {}
    if r is not None and len(idx) > 2:
        for s, p in r.products.items():
            base = fp.slots.get(s)
            if base is None or p.shape[1] < 2:
                continue
            structured = any(s.role.startswith(x) for x in STRUCTURED_ROLES)
            slots[s] = SlotSample(s, base.rows, base.cols, "F32", base.row0, structured, p[idx])
    return Fingerprint(fp.model, fp.content_hash, 0, 0, slots)


def token_fp(fp: Fingerprint, idx: np.ndarray, rows: int, cols: np.ndarray | None = None,
             rot: np.ndarray | None = None, fold: bool = False) -> Fingerprint:
    """Token rows at `idx` as a fingerprint with slots embed and lm_head, columns re-indexed by `cols` (candidate
    column per suspect column) or mapped by `rot` into the suspect's basis; `fold` multiplies lm_head rows by the
    final norm gain (when the suspect's gains are folded in). `rows` labels the shape so every model matches."""
    r = fp.robust
    assert r is not None
    slots: dict[Slot, SlotSample] = {}
    for role in r.rows:
        x = _token_matrix(r, idx, [role], fold)
        if cols is not None:
            x = x[:, cols]
        if rot is not None:
            x = x @ rot
        slot = Slot(role)
        slots[slot] = SlotSample(slot, rows, x.shape[1], r.dtypes.get(role, "F32"), 0, False, x.astype(np.float32))
    return Fingerprint(fp.model, fp.content_hash, fp.bytes_read, fp.requests, slots, robust=r)


# ---- evidence -------------------------------------------------------------------------------------------------
@dataclass
class ResidualMap:
    kind: str  # identity | permuted | none
    perm: np.ndarray | None = None  # candidate dimension per suspect dimension
    agree: int = 0
    tested: int = 0
    log10_p: float = 0.0  # agreement count's p; 0 unless accepted

    @property
    def share(self) -> float:
        return self.agree / self.tested if self.tested else 0.0


@dataclass
class DisguiseEvidence:
    """What the robust sections of a suspect and a candidate say, beyond their coordinate samples."""

    tokens: int  # shared tokens
    token_corr: float  # centred correlation of token rows at the same columns
    token_z: float
    residual: ResidualMap
    products: PairEvidence | None
    log10_p: float  # best of the three tests, Bonferroni over them
    notes: list[str] = field(default_factory=list)

    @property
    def z(self) -> float:
        return max(self.token_z, self.products.z if self.products else 0.0,
                   _z_of(self.residual.log10_p))


def _z_of(log10_p: float) -> float:
    from modeltrace.stats import z_from_log10p

    return z_from_log10p(log10_p) if log10_p < 0 else 0.0


def _dims_features(x: np.ndarray) -> np.ndarray:
    from modeltrace.align.match import standardize

    y = x.T
    return standardize(y - y.mean(axis=1, keepdims=True))


def residual_map(xs: np.ndarray, xc: np.ndarray, full: bool = True) -> ResidualMap:
    """Residual dimensions of the suspect's token rows `xs` matched to the candidate's `xc` (rows: the same tokens).
    Two matchings on disjoint halves of the tokens must agree on at least MIN_AGREE_SHARE of the (tested)
    dimensions; then the permutation comes from a matching on all tokens (`full`)."""
    from modeltrace.align.match import agreements, match

    n, h = xs.shape
    if n < 16 or xc.shape[1] != h or h < 4:
        return ResidualMap("none")
    dims = np.arange(h)
    if h > TEST_DIMS:
        from modeltrace.fingerprint.sampling import seeded

        dims = np.sort(seeded("residual-test", h).permutation(h)[:TEST_DIMS])
    ev, od = slice(0, None, 2), slice(1, None, 2)
    m1 = match([_dims_features(xs[ev])[dims]], [_dims_features(xc[ev])])
    m2 = match([_dims_features(xs[od])[dims]], [_dims_features(xc[od])])
    agree, both = agreements(m1.perm, m2.perm)
    out = ResidualMap("none", None, agree, len(dims))
    lp = poisson_log10_sf(agree, both / h)
    if agree < MIN_AGREE_SHARE * len(dims) or lp > ACCEPT_LOG10P:
        return out
    out.log10_p = lp
    out.kind = "permuted"
    if full:
        out.perm = match([_dims_features(xs)], [_dims_features(xc)]).filled(h)
        if np.array_equal(out.perm, np.arange(h)):
            out.kind = "identity"
    return out


def evidence(s: Fingerprint, c: Fingerprint, coord: PairEvidence | None = None) -> DisguiseEvidence | None:
    """Disguise-robust evidence between a suspect and a candidate (None when either lacks a robust section).
    The residual-permutation test runs only when nothing else already shows the relation (`coord` and products
    not significant), since it is the costly one."""
    a, b = s.robust, c.robust
    if a is None or b is None:
        return None
    ia, ib = shared_tokens(a, b)
    roles = _roles(a, b)
    tz, tcorr = 0.0, 0.0
    res = ResidualMap("none")
    if len(ia) >= 8 and roles:
        xs, xc = _token_matrix(a, ia, roles), _token_matrix(b, ib, roles)
        ua, ub = centred_unit(xs), centred_unit(xc)
        tcorr = float(np.dot(ua.ravel(), ub.ravel()))
        tz = fisher_z(tcorr, (ua.shape[0] - 1) * (ua.shape[1] - 1))
    prod = None
    if a.token_kind == b.token_kind:
        _, pa, pb = np.intersect1d(a.keys[:a.product_tokens], b.keys[:b.product_tokens], assume_unique=True,
                                   return_indices=True)
        if len(pa) >= 8:
            prod_s, prod_c = product_fp(s, pa.astype(np.int64)), product_fp(c, pb.astype(np.int64))
            if prod_s.slots and prod_c.slots:
                prod = compare(prod_s, prod_c)
    known = min(coord.log10_p if coord else 0.0, prod.log10_p if prod else 0.0)
    if len(ia) >= 16 and roles and tz < Z_IDENTITY and known > ACCEPT_LOG10P:
        res = residual_map(xs, xc, full=False)
    tests = [log10_sf(tz) if len(ia) >= 8 else 0.0, prod.log10_p if prod else 0.0, res.log10_p]
    lp = min(0.0, min(tests) + math.log10(len(tests)))
    return DisguiseEvidence(len(ia), tcorr, tz, res, prod, lp)


# ---- per-slot agreement (unit permutations) ----------------------------------------------------------------------
def slot_z(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None = None) -> dict[Slot, float]:
    """Same-slot Fisher z of every matrix slot the two share (through a layer map where layers were copied)."""
    us, uc = units(s), units(c)
    out: dict[Slot, float] = {}
    lm = layer_map or {}
    for slot, u in us.items():
        k = Slot(slot.role, lm.get(slot.layer, slot.layer), slot.expert) if slot.layer >= 0 else slot
        sc = c.slots.get(k)
        if sc is None or k not in uc or sc.shape_key != s.slots[slot].shape_key:
            continue
        a, b = u, uc[k]
        nc = min(a.shape[1], b.shape[1])
        if a.shape[1] != nc:
            a = centred_unit(s.slots[slot].values[:, :nc])
        if b.shape[1] != nc:
            b = centred_unit(sc.values[:, :nc])
        r = float(np.dot(a.ravel(), b.ravel()))
        dof = (a.shape[0] - 1) * (a.shape[1] - 1) if a.shape[0] > 1 and a.shape[1] > 1 else a.size - 1
        out[slot] = fisher_z(r, dof)
    return out


def disguised_slots(zs: dict[Slot, float]) -> set[Slot]:
    """Slots that do not relate while their layer (or, outside layers, the model) clearly does: the marks of
    permuted units, heads, experts or vocabulary rows."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    for k, z in zs.items():
        by_layer[k.layer].append(z)
    strong_layers = {layer for layer, v in by_layer.items() if max(v) >= Z_STRONG}
    inner = [max(v) for layer, v in by_layer.items() if layer >= 0]
    model_strong = bool(inner) and float(np.median(inner)) >= Z_STRONG
    out = set()
    for k, z in zs.items():
        if z >= Z_WEAK:
            continue
        if (k.layer >= 0 and k.layer in strong_layers) or (k.layer < 0 and model_strong):
            out.add(k)
    return out


def _slot_notes(bad: set[Slot], n_layers: int) -> list[str]:
    notes = []
    for group, roles in ROLE_GROUPS.items():
        hit = {k.layer for k in bad if k.role in roles}
        if hit:
            notes.append(GROUP_NOTE[group].format(n=len(hit - {-1}), L=n_layers))
    other = sorted({k.role for k in bad if not any(k.role in r for r in ROLE_GROUPS.values())})
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
    for k, smp in c.slots.items():
        if k.role in NORM_ROLES:
            continue
        gslot = GAIN_OF.get(k.role)
        if gslot is None:
            continue
        g = r.gains.get(Slot(gslot, k.layer if k.role != "lm_head" else -1))
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
    if coord:
        return _coordinate_mode(suspect, fps, related, ev, dv, coord[0])
    tok = _token_mode(suspect, fps, related, dv)
    if tok is not None:
        return tok
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
            s = Fingerprint(s.model, s.content_hash, s.bytes_read, s.requests,
                            {k: v for k, v in s.slots.items() if k.role not in NORM_ROLES}, robust=s.robust)
    bad = disguised_slots(slot_z(s, out[top], ev[top].layer_map))
    if bad:
        notes += _slot_notes(bad, suspect.model.get("layers") or 0)
        d = dv.get(top)
        if d is not None and any(k.role in ROLE_GROUPS["vocabulary"] for k in bad) and d.token_z >= Z_IDENTITY:
            notes = [x if not x.startswith("vocabulary") else "vocabulary re-ordered (rows matched by token string)"
                     for x in notes]
        s = Fingerprint(s.model, s.content_hash, s.bytes_read, s.requests,
                        {k: v for k, v in s.slots.items() if k not in bad}, robust=s.robust)
    if s is suspect:
        return Aligned("coordinates", suspect, fps, [])
    return Aligned("coordinates", s, out, notes)


def _token_mode(suspect: Fingerprint, fps: dict[str, Fingerprint], related: list[str],
                dv: dict[str, DisguiseEvidence | None]) -> Aligned | None:
    """Suspect and candidates as token rows in the suspect's residual basis, when a permutation (or, for narrow
    models, a rotation) of the residual stream can be recovered against the strongest candidate."""
    a = suspect.robust
    if a is None:
        return None
    group = [n for n in related if fps[n].robust is not None and dv.get(n) is not None]
    if not group:
        return None
    keys = a.keys
    for n in group:
        r = fps[n].robust
        keys = np.intersect1d(keys, r.keys if r.token_kind == a.token_kind else np.zeros(0, np.uint64))
    roles = [x for x in ("embed", "lm_head") if x in a.rows and all(x in fps[n].robust.rows for n in group)]
    if len(keys) < 16 or not roles:
        return None
    idx = {n: np.searchsorted(fps[n].robust.keys, keys) for n in group}
    ia = np.searchsorted(a.keys, keys)
    xs = _token_matrix(a, ia, roles)
    h = xs.shape[1]
    folded = a.folded()
    maps: dict[str, tuple[str, np.ndarray | None, np.ndarray | None]] = {}
    for n in group:
        r = fps[n].robust
        if r.hidden != h:
            continue
        xc = _token_matrix(r, idx[n], roles, fold=folded and not r.folded())
        ua, ub = centred_unit(xs), centred_unit(xc)
        if fisher_z(float(np.dot(ua.ravel(), ub.ravel())), (ua.shape[0] - 1) * (ua.shape[1] - 1)) >= Z_IDENTITY:
            maps[n] = ("identity", None, None)
            continue
        res = residual_map(xs, xc)
        if res.kind in ("permuted", "identity"):
            maps[n] = (res.kind, res.perm, None)
            continue
        if xs.shape[0] >= ROTATION_ROWS_PER_DIM * h:
            rot, r2 = _procrustes(xs, xc)
            if rot is not None and r2 >= ROTATION_MIN_R2:
                maps[n] = ("rotated", None, rot)
    if not maps:
        return None
    rows = int(suspect.slots[Slot("embed")].rows) if Slot("embed") in suspect.slots else len(keys)
    out = {n: token_fp(fps[n], idx[n], rows, cols=m[1], rot=m[2], fold=folded and not fps[n].robust.folded())
           for n, m in maps.items()}
    kinds = {m[0] for m in maps.values()}
    notes = []
    if "permuted" in kinds:
        notes.append("residual stream permuted")
    if "rotated" in kinds:
        notes.append("residual stream rotated (orthogonal map fitted on token rows)")
    if folded and any(not fps[n].robust.folded() for n in maps):
        notes.append("norm gains folded into the matrices that read them")
    notes.append(f"recipe from {len(keys)} shared token rows of {' and '.join(roles)} only")
    s_fp = token_fp(suspect, ia, rows)
    per = {n: [{"identity": "residual stream in place", "permuted": "residual stream permuted",
                "rotated": "residual stream rotated"}[m[0]]] for n, m in maps.items()}
    return Aligned("tokens", s_fp, {**fps, **out}, notes, per)


def _procrustes(xs: np.ndarray, xc: np.ndarray) -> tuple[np.ndarray | None, float]:
    """Orthogonal M with xc M ~ xs (up to scale): fitted on even rows, R² on odd rows, then refitted on all."""
    ev, od = slice(0, None, 2), slice(1, None, 2)
    u, _, vt = np.linalg.svd(xc[ev].T @ xs[ev])
    m = u @ vt
    pred = xc[od] @ m
    scale = float((pred * xs[od]).sum()) / max(float((pred * pred).sum()), 1e-300)
    tgt = xs[od]
    den = float(((tgt - tgt.mean(axis=0)) ** 2).sum())
    r2 = 1 - float(((tgt - scale * pred) ** 2).sum()) / den if den > 0 else -np.inf
    u, _, vt = np.linalg.svd(xc.T @ xs)
    return (u @ vt), r2
