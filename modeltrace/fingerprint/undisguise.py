"""Seeing through disguises with fingerprints alone: evidence that survives them, and fingerprints re-expressed in
a common basis so that `identify`'s lineage and recipe fits still apply (align/disguise.py does this for the audit,
on full weights).

Evidence (`evidence`), per suspect and candidate, each a one-sided p-value of "independent":

- reader products (robust.py), matrix by matrix (matrices whose units are permuted together, gate and up, k and v,
  as one): unchanged by a permuted or rotated residual stream, folded gains and a re-ordered vocabulary (tokens are
  matched by the hash of their string);
- token rows at the same residual columns (vocabulary re-ordered by token string, residual stream in place).

  Both are (tokens x units) matrices whose tokens are shared by every model: models trained on alike data have
  alike token structure (frequencies, similar tokens), so a Fisher z over all entries, as for coordinate samples,
  overstates the evidence (independent corpus pairs: token-row z up to 5.3, product p < 0.05 for 11% of pairs).
  The units (reader rows, residual dimensions) of independent models are in arbitrary order, though, so both are
  tested against the permutation distribution of the candidate's units (`exchangeable_z`), a valid null whatever
  the tokens share;
- residual-stream permutation: the residual dimensions of the two models' token rows matched as units twice, on
  disjoint halves of the tokens, and the agreements counted (the match test of detectors/match_test.py). Independent
  models trained on the same data agree on a few privileged dimensions beyond the Poisson(1) null (11 of 64 in the
  test corpus, Poisson p ~ 1e-8), so the permutation is accepted only when at least half of the dimensions agree,
  and only then does the count's p-value count as evidence.

Lineage (`align_group`): when the coordinate samples of the suspect relate to a candidate's, slots that do not (units,
heads or experts permuted; vocabulary re-ordered) are left out of the fits and a candidate's norm gains are folded
when the suspect's are all 1. A slot is out of place when its z is weak, when it fails the permutation null of its
own units (`placed_z`), or when some of its rows or columns match line for line and others not at all
(`mixed_slots`: a partial head permutation), in a layer whose matrices or norm gains (`gain_z`: untouched by unit
permutations) relate. When the products relate but the token rows are not in place (residual stream permuted or
rotated; the coordinates then relate only through a permutation's fixed points), or when no matrix is left in place,
suspect and candidates are re-expressed as their token rows in the suspect's basis (a permutation, accepted only if
it fits about as well as a rotation, or an orthogonal fit when there are >= 3 x hidden token rows) and the recipe is
fitted on those. Otherwise only invariant evidence exists and `identify` says so and points at `modeltrace audit`.
Folded gains together with every matrix of a layer permuted leave nothing that tells that layer from one taken from
another model: `identify` then reports a partial relation (the audit matches the units on the full weights).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from modeltrace.architectures import Slot
from modeltrace.fingerprint.compare import PairEvidence, units
from modeltrace.fingerprint.core import Fingerprint, SlotSample, centred_unit
from modeltrace.fingerprint.robust import GAIN_OF, RobustSection
from modeltrace.fingerprint.sampling import column_order
from modeltrace.stats import best_of_z, fisher_z, fisher_z_many, log10_sf, poisson_log10_sf, stouffer

#: Residual permutation accepted when two matchings on disjoint token halves agree on this share of dimensions.
MIN_AGREE_SHARE = 0.5
#: ... and their agreement count is at least this significant (log10 p under Poisson).
ACCEPT_LOG10P = -6.0
#: The (costly) residual-permutation test is skipped when other evidence is already this strong: it then survives
#: Holm over any index and every Bonferroni factor, so the test could not change whether the pair is related.
DECISIVE_LOG10P = -20.0
#: Suspect dimensions matched for the agreement test in wide models (all of them once accepted).
TEST_DIMS = 512
#: Wide models are screened first on this many of the tested dimensions: the full test is run only when at least
#: SCREEN_MIN_SHARE of them agree. A true share of MIN_AGREE_SHARE (0.5) gives fewer than 0.2 x 64 agreements with
#: probability < 1e-6 (binomial), so the screen costs no power to speak of, and skipping a test can only withhold
#: evidence, never make it: the null stays valid. It spares identify the full matchings of every unrelated model.
SCREEN_DIMS = 64
SCREEN_MIN_SHARE = 0.2
#: Token-row identity (same columns) taken as "residual stream in place" above this z.
Z_IDENTITY = 8.0
#: An orthogonal map of the residual stream is fitted only with at least this many token rows per hidden dimension.
ROTATION_ROWS_PER_DIM = 3
#: A rotation is used for the recipe when it explains this share of held-out token rows.
ROTATION_MIN_R2 = 0.2
#: ... and a matched permutation only when it explains held-out token rows nearly as well as a rotation (where one
#: can be fitted): true permutations fit at least as well in the test corpus (the rotation's freedom overfits),
#: rotated streams lose 0.9 to it.
PERMUTATION_R2_SLACK = 0.1
#: A slot whose same-slot z stays below Z_WEAK while another role of its layer exceeds Z_STRONG is disguised.
Z_WEAK, Z_STRONG = 3.0, 10.0
#: ... or whose `placed_z` stays below this share of an exact copy's.
MIN_PLACED_SHARE = 0.25
#: So is a slot among whose lines (rows or columns, of at least MIN_LINE values) some match the candidate's line for
#: line (z >= Z_STRONG) and some do not relate (z < Z_WEAK, or under half the lines' median z): units or heads
#: moved within the sampled block (a partial head permutation keeps the slot's z high but spoils its fit). The lines
#: of a merge or fine-tune relate alike (their z spread about 1 to 2 around the median in the test corpus).
MIN_LINE = 16

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
#: Reader roles whose rows (units) are permuted together with another's (same sampled row block): tested as one.
UNIT_GROUP = {"mlp_up": "mlp_gate", "expert_up": "expert_gate", "shared_up": "shared_gate", "attn_v": "attn_k"}


def _double_centred(x: np.ndarray) -> np.ndarray:
    """Row and column means removed from each matrix of a (..., n, m) stack (float64)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return x - x.mean(axis=-1, keepdims=True) - x.mean(axis=-2, keepdims=True) + x.mean(axis=(-2, -1), keepdims=True)


def _memo(fp: Fingerprint, key: tuple, make):  # noqa: ANN001, ANN202
    """`make()` once per fingerprint and key: identify tests one suspect against a whole shortlist, and the
    suspect's side of every test (centred token rows, their Gram, matching features) is the same each time."""
    got = fp.cache.get(key)  # type: ignore[call-overload]
    if got is None:
        got = fp.cache.setdefault(key, make())  # type: ignore[call-overload]
    return got


def _gram(x: np.ndarray) -> np.ndarray:
    """x x^T per stacked matrix when that is the smaller Gram (rows < columns), else None."""
    return x @ x.swapaxes(-1, -2) if x.shape[-2] < x.shape[-1] else None


def _exchangeable(x: np.ndarray, y: np.ndarray, xx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`exchangeable_z`'s (z, r) for stacks (g, n, m) of double-centred matrices (one test per stacked pair);
    `xx`: `_gram(x)`, when already known."""
    n, m = x.shape[-2:]
    t = np.einsum("gij,gij->g", x, y)
    na, nb = np.einsum("gij,gij->g", x, x), np.einsum("gij,gij->g", y, y)
    if n < m:  # sum C^2 = <x x^T, y y^T>: the smaller Gram
        c2 = np.einsum("gij,gij->g", _gram(x) if xx is None else xx, _gram(y))
    else:
        c = x.swapaxes(-1, -2) @ y
        c2 = np.einsum("gij,gij->g", c, c)
    var = c2 / (m - 1) if m > 2 else np.zeros_like(c2)
    z = np.divide(t, np.sqrt(var), out=np.zeros_like(t), where=var > 0)
    r = np.divide(t, np.sqrt(na * nb), out=np.zeros_like(t), where=(na > 0) & (nb > 0))
    return z, r


def exchangeable_z(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float, int]:
    """(z, r, dof) of suspect and candidate (tokens x units) matrices whose rows are the same tokens and whose
    columns are units that independent models order arbitrarily (reader rows, residual dimensions); `pairs` whose
    units are permuted together (same count) are tested as one.

    The statistic is the double-centred inner product, sum_u C[u, u] with C = sum A^T B (m x m). Under independence
    the candidate's units are exchangeable, and over their m! orders that sum has mean 0 and variance
    sum C^2 / (m - 1) (C is doubly centred; Hoeffding's combinatorial CLT), whatever the tokens share. `r` is the
    centred correlation and `dof` the count a Fisher z would use (a closeness, not a p-value)."""
    pairs = [(a, b) for a, b in pairs if a.shape == b.shape and a.ndim == 2 and a.shape[1] == pairs[0][0].shape[1]]
    if not pairs:
        return 0.0, 0.0, 0
    x = np.concatenate([_double_centred(a) for a, _ in pairs])[None]
    y = np.concatenate([_double_centred(b) for _, b in pairs])[None]
    z, r = _exchangeable(x, y)
    m = x.shape[-1]
    return float(z[0]), float(r[0]), sum(max(a.shape[0] - 1, 0) for a, _ in pairs) * max(m - 1, 0)


def product_evidence(a: RobustSection, b: RobustSection, ia: np.ndarray, ib: np.ndarray,
                     memo: Fingerprint | None = None) -> tuple[PairEvidence, float] | None:
    """Reader products at product tokens `ia` / `ib` (the same tokens), slot by slot (unit groups as one):
    `exchangeable_z` per group, combined over groups both by Stouffer (evidence spread over the model) and as the
    best group (Šidák over groups: a disguise that permutes most units leaves a few matrices in place), Bonferroni
    over the two; and the Fisher-z Stouffer of their correlations (how close, for ranking). None when no product
    slot is shared."""
    shared = [(s, p, b.products[s]) for s, p in a.products.items()
              if s in b.products and b.products[s].shape == p.shape and p.shape[1] >= 3]
    if not shared:
        return None
    centred: dict[Slot, tuple[np.ndarray, np.ndarray]] = {}
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (_, p, _) in enumerate(shared):
        by_shape[p.shape].append(i)
    for idx in by_shape.values():  # centred in one batch per shape (the suspect's once per identify, `memo`)
        def suspect_side(idx: list[int] = idx) -> np.ndarray:
            return _double_centred(np.stack([shared[i][1][ia] for i in idx]))

        key = ("products", ia.tobytes(), tuple(shared[i][0] for i in idx))
        x = suspect_side() if memo is None else _memo(memo, key, suspect_side)
        y = _double_centred(np.stack([shared[i][2][ib] for i in idx]))
        for j, i in enumerate(idx):
            centred[shared[i][0]] = (x[j], y[j])
    groups: dict[tuple[str, int, int], list[Slot]] = defaultdict(list)
    for s, _, _ in shared:
        groups[(UNIT_GROUP.get(s.role, s.role), s.layer, s.expert)].append(s)
    stacked: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for members in groups.values():
        x = np.concatenate([centred[s][0] for s in members])
        y = np.concatenate([centred[s][1] for s in members])
        stacked[x.shape].append((x, y))
    zs, rs, fz = [], [], []
    for (n, m), xy in stacked.items():
        z, r = _exchangeable(np.stack([x for x, _ in xy]), np.stack([y for _, y in xy]))
        zs += z.tolist()
        rs += r.tolist()
        fz += fisher_z_many(r, (n - n // len(ia)) * (m - 1)).tolist()  # n / len(ia) matrices of len(ia) rows
    z_all, z_best = stouffer(zs), float(best_of_z(max(zs), len(zs)))
    z = max(z_all, z_best)
    return (PairEvidence(min(0.0, log10_sf(z) + math.log10(2)), z, z_all, z_best, len(zs), float(np.median(rs))),
            stouffer(fz))


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
    token_z: float  # its exchangeable_z (residual dimensions exchangeable)
    residual: ResidualMap
    products: PairEvidence | None
    log10_p: float  # best of the three tests, Bonferroni over them
    notes: list[str] = field(default_factory=list)
    #: how close the two are, for ranking related candidates: Fisher z of the token-row and product correlations
    #: (the calibrated z saturates for any close relative; this keeps growing as the correlation nears 1)
    strength: float = 0.0

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


def residual_map(xs: np.ndarray, xc: np.ndarray, full: bool = True, memo: Fingerprint | None = None
                 ) -> ResidualMap:
    """Residual dimensions of the suspect's token rows `xs` matched to the candidate's `xc` (rows: the same tokens).
    Two matchings on disjoint halves of the tokens must agree on at least MIN_AGREE_SHARE of the (tested)
    dimensions; then the permutation comes from a matching on all tokens (`full`). Wide models are screened first
    on SCREEN_DIMS of the tested dimensions (see there). `memo`: the suspect's fingerprint, to keep its features."""
    from modeltrace.align.match import agreements, match

    n, h = xs.shape
    if n < 16 or xc.shape[1] != h or h < 4:
        return ResidualMap("none")
    dims = np.arange(h)
    if h > TEST_DIMS:
        from modeltrace.fingerprint.sampling import seeded

        dims = np.sort(seeded("residual-test", h).permutation(h)[:TEST_DIMS])
    ev, od = slice(0, None, 2), slice(1, None, 2)

    def suspect_features() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return xs, _dims_features(xs[ev])[dims], _dims_features(xs[od])[dims]

    got = None if memo is None else _memo(memo, ("residual", id(xs), dims.tobytes()), suspect_features)
    _, fs_ev, fs_od = got if got is not None and got[0] is xs else suspect_features()  # kept with the very `xs`
    fc_ev, fc_od = _dims_features(xc[ev]), _dims_features(xc[od])
    if len(dims) > 2 * SCREEN_DIMS:
        s1 = match([fs_ev[:SCREEN_DIMS]], [fc_ev])
        s2 = match([fs_od[:SCREEN_DIMS]], [fc_od])
        agree, _ = agreements(s1.perm, s2.perm)
        if agree < SCREEN_MIN_SHARE * SCREEN_DIMS:
            return ResidualMap("none", None, agree, SCREEN_DIMS)
    m1 = match([fs_ev], [fc_ev])
    m2 = match([fs_od], [fc_od])
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


def _token_side(a: RobustSection, ia: np.ndarray, roles: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The suspect's token rows at `ia`, double-centred (as a stack of one) and their Gram."""
    xs = _token_matrix(a, ia, roles)
    xdc = _double_centred(xs)[None]
    return xs, xdc, _gram(xdc)


def evidence(s: Fingerprint, c: Fingerprint, coord: PairEvidence | None = None) -> DisguiseEvidence | None:
    """Disguise-robust evidence between a suspect and a candidate (None when either lacks a robust section).
    The residual-permutation test runs only when nothing else already shows the relation decisively (`coord` and
    products above DECISIVE_LOG10P), since it is the costly one."""
    a, b = s.robust, c.robust
    if a is None or b is None:
        return None
    ia, ib = shared_tokens(a, b)
    roles = _roles(a, b)
    tz, tcorr, tstrength = 0.0, 0.0, 0.0
    res = ResidualMap("none")
    if len(ia) >= 8 and roles:
        key = ("tokens", tuple(roles), ia.tobytes())
        xs, xdc, xx = _memo(s, key, lambda: _token_side(a, ia, roles))
        xc = _token_matrix(b, ib, roles)
        if xc.shape == xs.shape:
            z, r = _exchangeable(xdc, _double_centred(xc)[None], xx)
            tz, tcorr = float(z[0]), float(r[0])
            tstrength = fisher_z(tcorr, max(xs.shape[0] - 1, 0) * max(xs.shape[1] - 1, 0))
    prod, pstrength = None, 0.0
    if a.token_kind == b.token_kind:
        _, pa, pb = np.intersect1d(a.keys[:a.product_tokens], b.keys[:b.product_tokens], assume_unique=True,
                                   return_indices=True)
        if len(pa) >= 8:
            got = product_evidence(a, b, pa.astype(np.int64), pb.astype(np.int64), memo=s)
            if got is not None:
                prod, pstrength = got
    known = min(coord.log10_p if coord else 0.0, prod.log10_p if prod else 0.0)
    if len(ia) >= 16 and roles and tz < Z_IDENTITY and known > DECISIVE_LOG10P:
        res = residual_map(xs, xc, full=False, memo=s)
    tests = [log10_sf(tz) if len(ia) >= 8 else 0.0, prod.log10_p if prod else 0.0, res.log10_p]
    lp = min(0.0, min(tests) + math.log10(len(tests)))
    return DisguiseEvidence(len(ia), tcorr, tz, res, prod, lp, strength=max(tstrength, pstrength,
                                                                             _z_of(res.log10_p)))


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


def gain_z(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None = None) -> dict[int, float]:
    """Per suspect layer, the best Fisher z of the centred correlation between its norm gains and the candidate's
    (their sampled 1-D slots). Gains are untouched by unit, head and expert permutations, so a layer whose matrices
    no longer line up while its gains do is the candidate's layer disguised, not a layer from elsewhere. Gains that
    are all alike (folded, or an untrained init) say nothing."""
    lm = layer_map or {}
    out: dict[int, float] = {}
    for slot, smp in s.slots.items():
        if slot.role not in NORM_ROLES or slot.layer < 0:
            continue
        sc = c.slots.get(Slot(slot.role, lm.get(slot.layer, slot.layer), slot.expert))
        if sc is None or sc.shape_key != smp.shape_key:
            continue
        n = min(smp.values.size, sc.values.size)
        a = np.nan_to_num(smp.values.ravel()[:n].astype(np.float64))
        b = np.nan_to_num(sc.values.ravel()[:n].astype(np.float64))
        a, b = a - a.mean(), b - b.mean()
        den = float(np.linalg.norm(a) * np.linalg.norm(b))
        if den > 0:
            out[slot.layer] = max(out.get(slot.layer, -math.inf), fisher_z(float(a @ b) / den, n))
    return out


def _paired_samples(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None
                    ) -> dict[tuple[int, int], list[tuple[Slot, np.ndarray, np.ndarray]]]:
    """The suspect's matrix samples and the candidate's at the same slot (through the layer map), cut to their
    shared columns, grouped by shape so that each group is handled as one stack."""
    lm = layer_map or {}
    out: dict[tuple[int, int], list[tuple[Slot, np.ndarray, np.ndarray]]] = defaultdict(list)
    for slot, smp in s.slots.items():
        if smp.structured or smp.values.ndim != 2:
            continue
        k = Slot(slot.role, lm.get(slot.layer, slot.layer), slot.expert) if slot.layer >= 0 else slot
        sc = c.slots.get(k)
        if sc is None or sc.shape_key != smp.shape_key or sc.values.shape[0] != smp.values.shape[0]:
            continue
        nc = min(smp.values.shape[1], sc.values.shape[1])
        out[(smp.values.shape[0], nc)].append((slot, smp.values[:, :nc], sc.values[:, :nc]))
    return out


def _line_z(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fisher z of the correlation of each row of `a` with the same row of `b`, over stacks (..., n, L) (NaN where
    a row is constant)."""
    x = np.nan_to_num(a.astype(np.float64))
    y = np.nan_to_num(b.astype(np.float64))
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    r = np.divide((x * y).sum(axis=-1), den, out=np.full(den.shape, np.nan), where=den > 0)
    return fisher_z_many(r, a.shape[-1])


def mixed_slots(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None = None) -> set[Slot]:
    """Slots whose rows or columns match the candidate's line for line but for some that do not relate at all:
    units, heads or experts moved within the sampled block (see MIN_LINE)."""
    out: set[Slot] = set()
    for items in _paired_samples(s, c, layer_map).values():
        a = np.stack([x for _, x, _ in items])
        b = np.stack([y for _, _, y in items])
        for x, y in ((a, b), (a.swapaxes(1, 2), b.swapaxes(1, 2))):
            if x.shape[2] < MIN_LINE or x.shape[1] < 2:
                continue
            for (slot, _, _), z in zip(items, _line_z(x, y), strict=True):
                z = z[np.isfinite(z)]
                if z.size and float(z.max()) >= Z_STRONG and float(z.min()) < max(Z_WEAK, float(np.median(z)) / 2):
                    out.add(slot)
    return out


def placed_z(s: Fingerprint, c: Fingerprint, layer_map: dict[int, int] | None = None
             ) -> dict[Slot, tuple[float, float]]:
    """Per shared matrix slot, how surely it is in place: (z, the z of an exact copy at most), z the smaller of its
    `exchangeable_z` with the rows as the exchangeable units and with the columns. A slot whose units (rows, or
    columns) were permuted is one draw of that permutation null on its unit axis, N(0, 1) even though its other axis
    (the residual stream, in place) is shared; its plain Fisher z is not (3 to 4 happens: units of one model share
    their residual directions). An exact copy reaches at most sqrt(m (m - 1)) for m units on the shorter axis."""
    out: dict[Slot, tuple[float, float]] = {}
    for (nr, nc), items in _paired_samples(s, c, layer_map).items():
        if min(nr, nc) < 3:
            continue
        a = _double_centred(np.stack([x for _, x, _ in items]))
        b = _double_centred(np.stack([y for _, _, y in items]))
        z = np.minimum(_exchangeable(a, b)[0], _exchangeable(a.swapaxes(1, 2), b.swapaxes(1, 2))[0])
        top = math.sqrt(min(nr, nc) * (min(nr, nc) - 1))
        out.update({slot: (float(v), top) for (slot, _, _), v in zip(items, z, strict=True)})
    return out


def disguised_slots(zs: dict[Slot, float], layer_z: dict[int, float] | None = None,
                    placed: dict[Slot, tuple[float, float]] | None = None) -> set[Slot]:
    """Slots that do not relate while their layer (or, outside layers, the model) clearly does: the marks of
    permuted units, heads, experts or vocabulary rows. A layer relates when one of its matrices does, or its norm
    gains do (`layer_z`, from `gain_z`: every matrix of a layer may be permuted); a slot does not when its z is
    below Z_WEAK, or its `placed` z is below Z_WEAK or MIN_PLACED_SHARE of an exact copy's (nearer the null than
    any in-place relative: those reach 0.85 or more in the test corpus, cross-family merges included)."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    for k, z in zs.items():
        by_layer[k.layer].append(z)
    for layer, z in (layer_z or {}).items():
        by_layer[layer].append(z)
    strong_layers = {layer for layer, v in by_layer.items() if max(v) >= Z_STRONG}
    inner = [max(v) for layer, v in by_layer.items() if layer >= 0]
    model_strong = bool(inner) and float(np.median(inner)) >= Z_STRONG
    out = set()
    for k, z in zs.items():
        pz, top = (placed or {}).get(k, (z, math.inf))
        if z >= Z_WEAK and pz >= max(Z_WEAK, MIN_PLACED_SHARE * top):
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
            s = Fingerprint(s.model, s.content_hash, s.bytes_read, s.requests,
                            {k: v for k, v in s.slots.items() if k.role not in NORM_ROLES}, robust=s.robust)
    lm = ev[top].layer_map
    bad = disguised_slots(slot_z(s, out[top], lm), gain_z(s, out[top], lm), placed_z(s, out[top], lm))
    bad |= mixed_slots(s, out[top], lm)
    if bad:
        notes += _slot_notes(bad, suspect.model.get("layers") or 0)
        vocab = {k.role for k in bad if k.role in ROLE_GROUPS["vocabulary"]}
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
    return exchangeable_z([(_token_matrix(a, ia, [role]), _token_matrix(b, ib, [role]))])[0] if len(ia) >= 8 else 0.0


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
        if exchangeable_z([(xs, xc)])[0] >= Z_IDENTITY:
            maps[n] = ("identity", None, None)
            continue
        res = residual_map(xs, xc)
        rot, r2 = _procrustes(xs, xc) if xs.shape[0] >= ROTATION_ROWS_PER_DIM * h else (None, -math.inf)
        # the two matchings also agree on many dimensions of a rotated stream (each rotated dimension leans on a few
        # of the candidate's, 30 of 64 in the test corpus): a permutation must fit about as well as a rotation
        if res.kind in ("permuted", "identity") and (
                rot is None or _r2(xs[1::2], xc[1::2][:, res.perm]) >= r2 - PERMUTATION_R2_SLACK):
            maps[n] = (res.kind, res.perm, None)
            continue
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
    r2 = _r2(xs[od], xc[od] @ m)
    u, _, vt = np.linalg.svd(xc.T @ xs)
    return (u @ vt), r2


def _r2(tgt: np.ndarray, pred: np.ndarray) -> float:
    """Share of `tgt`'s variance that `pred` explains, up to one scale."""
    scale = float((pred * tgt).sum()) / max(float((pred * pred).sum()), 1e-300)
    den = float(((tgt - tgt.mean(axis=0)) ** 2).sum())
    return 1 - float(((tgt - scale * pred) ** 2).sum()) / den if den > 0 else -math.inf
