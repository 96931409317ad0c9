"""Evidence that survives disguises, from the robust sections of two fingerprints (fingerprint/robust.py), each a
one-sided p-value of "independent":

- reader products, matrix by matrix (matrices whose units are permuted together, gate and up, k and v, as one):
  unchanged by a permuted or rotated residual stream, folded gains and a re-ordered vocabulary (tokens are matched
  by the hash of their string);
- token rows at the same residual columns (vocabulary re-ordered by token string, residual stream in place).

  Both are (tokens x units) matrices whose tokens are shared by every model: models trained on alike data have
  alike token structure (frequencies, similar tokens), so a Fisher z over all entries, as for coordinate samples,
  overstates the evidence (independent corpus pairs: token-row z up to 5.3, product p < 0.05 for 11% of pairs).
  The units (reader rows, residual dimensions) of independent models are in arbitrary order, though, so both are
  tested against the permutation distribution of the candidate's units (`exchangeable_z`), a valid null whatever
  the tokens share;
- residual-stream permutation (`residual_map`): the residual dimensions of the two models' token rows matched as
  units twice, on disjoint halves of the tokens, and the agreements counted (the match test of align/match_test.py).
  Independent models trained on the same data agree on a few privileged dimensions beyond the Poisson(1) null (11 of
  64 in the test corpus, Poisson p ~ 1e-8), so the permutation is accepted only when at least MIN_AGREE_SHARE of the
  dimensions agree (align/core.py), and only then does the count's p-value count as evidence.

Data flow: identify -> `evidence(suspect, candidate)` per shortlisted model -> DisguiseEvidence; the suspect's side
of each test is memoised on its fingerprint (`_memo`). Memory: the shared token rows of both models (<= 256 x H) and
product stacks of at most PRODUCT_TOKENS rows per reader block; H x H float64 for the residual matchings.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from modeltrace.align.core import ACCEPT_LOG10P, MIN_AGREE_SHARE, Z_IDENTITY, ResidualMap
from modeltrace.align.roles import Roles, roles_named
from modeltrace.architectures import Slot
from modeltrace.fingerprint.compare import PairEvidence
from modeltrace.fingerprint.core import Fingerprint
from modeltrace.fingerprint.robust import RobustSection
from modeltrace.stats import best_of_z, fisher_z, fisher_z_many, log10_sf, poisson_log10_sf, stouffer

__all__ = ["DisguiseEvidence", "double_centred", "evidence", "exchangeable_stack", "exchangeable_z", "fp_roles",
           "product_evidence", "residual_map", "shared_tokens", "token_matrix", "vocab_roles"]

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



def fp_roles(fp: Fingerprint) -> Roles:
    """The role semantics of a fingerprint's family (llama's when it does not say)."""
    return roles_named(fp.model.get("family"))


# ---- token alignment ------------------------------------------------------------------------------------------
def shared_tokens(a: RobustSection, b: RobustSection, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices into a's and b's token arrays of the tokens both hold (same hash), in hash order."""
    if a.token_kind != b.token_kind:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ka, kb = (a.keys, b.keys) if limit is None else (a.keys[:limit], b.keys[:limit])
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    return ia.astype(np.int64), ib.astype(np.int64)


def token_matrix(r: RobustSection, idx: np.ndarray, roles: list[str], fold: bool = False) -> np.ndarray:
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


def vocab_roles(a: RobustSection, b: RobustSection) -> list[str]:
    h = a.hidden
    return [x for x in ("embed", "lm_head") if x in a.rows and x in b.rows and b.rows[x].shape[1] == h]



# ---- evidence -------------------------------------------------------------------------------------------------
def _unit_group(roles: Roles, role: str) -> str:
    """Reader roles whose rows (units) are permuted together with another's (same space written: up with gate, v with
    k) are tested as one, under the first such role's name."""
    sem = roles.of(role)
    together = roles.writing(sem.writes) if sem is not None and sem.reads == "residual" else ()
    return together[0] if together else role


def double_centred(x: np.ndarray) -> np.ndarray:
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


def _gram(x: np.ndarray) -> np.ndarray | None:
    """x x^T per stacked matrix when that is the smaller Gram (rows < columns), else None."""
    return x @ x.swapaxes(-1, -2) if x.shape[-2] < x.shape[-1] else None


def exchangeable_stack(x: np.ndarray, y: np.ndarray, xx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
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
    x = np.concatenate([double_centred(a) for a, _ in pairs])[None]
    y = np.concatenate([double_centred(b) for _, b in pairs])[None]
    z, r = exchangeable_stack(x, y)
    m = x.shape[-1]
    return float(z[0]), float(r[0]), sum(max(a.shape[0] - 1, 0) for a, _ in pairs) * max(m - 1, 0)


def product_evidence(a: RobustSection, b: RobustSection, ia: np.ndarray, ib: np.ndarray,
                     memo: Fingerprint | None = None, roles: Roles | None = None) -> tuple[PairEvidence, float] | None:
    """Reader products at product tokens `ia` / `ib` (the same tokens), slot by slot (unit groups as one):
    `exchangeable_z` per group, combined over groups both by Stouffer (evidence spread over the model) and as the
    best group (Šidák over groups: a disguise that permutes most units leaves a few matrices in place), Bonferroni
    over the two; and the Fisher-z Stouffer of their correlations (how close, for ranking). None when no product
    slot is shared. `roles`: the suspect family's (llama's if not given)."""
    roles = roles or roles_named("llama")
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
            return double_centred(np.stack([shared[i][1][ia] for i in idx]))

        key = ("products", ia.tobytes(), tuple(shared[i][0] for i in idx))
        x = suspect_side() if memo is None else _memo(memo, key, suspect_side)
        y = double_centred(np.stack([shared[i][2][ib] for i in idx]))
        for j, i in enumerate(idx):
            centred[shared[i][0]] = (x[j], y[j])
    groups: dict[tuple[str, int, int], list[Slot]] = defaultdict(list)
    for s, _, _ in shared:
        groups[(_unit_group(roles, s.role), s.layer, s.expert)].append(s)
    stacked: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    for members in groups.values():
        x = np.concatenate([centred[s][0] for s in members])
        y = np.concatenate([centred[s][1] for s in members])
        stacked[x.shape].append((x, y))
    zs: list[float] = []
    rs: list[float] = []
    fz: list[float] = []
    for (n, m), xy in stacked.items():
        z, r = exchangeable_stack(np.stack([x for x, _ in xy]), np.stack([y for _, y in xy]))
        zs += z.tolist()
        rs += r.tolist()
        fz += fisher_z_many(r, (n - n // len(ia)) * (m - 1)).tolist()  # n / len(ia) matrices of len(ia) rows
    z_all, z_best = float(stouffer(zs)), float(best_of_z(max(zs), len(zs)))
    top = max(z_all, z_best)
    return (PairEvidence(min(0.0, log10_sf(top) + math.log10(2)), top, z_all, z_best, len(zs), float(np.median(rs))),
            stouffer(fz))


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
        return ResidualMap(status="none")
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
            return ResidualMap(status="none", agree=agree, tested=SCREEN_DIMS)
    m1 = match([fs_ev], [fc_ev])
    m2 = match([fs_od], [fc_od])
    agree, both = agreements(m1.perm, m2.perm)
    out = ResidualMap(status="none", agree=agree, tested=len(dims))
    lp = poisson_log10_sf(agree, both / h)
    if agree < MIN_AGREE_SHARE * len(dims) or lp > ACCEPT_LOG10P:
        return out
    out.log10_p = lp
    out.status = "permuted"
    if full:
        out.perm = match([_dims_features(xs)], [_dims_features(xc)]).filled(h)
        if np.array_equal(out.perm, np.arange(h)):
            out.status = "identity"
    return out


def _token_side(a: RobustSection, ia: np.ndarray, roles: list[str]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The suspect's token rows at `ia`, double-centred (as a stack of one) and their Gram."""
    xs = token_matrix(a, ia, roles)
    xdc = double_centred(xs)[None]
    return xs, xdc, _gram(xdc)


def evidence(s: Fingerprint, c: Fingerprint, coord: PairEvidence | None = None) -> DisguiseEvidence | None:
    """Disguise-robust evidence between a suspect and a candidate (None when either lacks a robust section).
    The residual-permutation test runs only when nothing else already shows the relation decisively (`coord` and
    products above DECISIVE_LOG10P), since it is the costly one."""
    a, b = s.robust, c.robust
    if a is None or b is None:
        return None
    ia, ib = shared_tokens(a, b)
    roles = vocab_roles(a, b)
    tz, tcorr, tstrength = 0.0, 0.0, 0.0
    res = ResidualMap(status="none")
    if len(ia) >= 8 and roles:
        key = ("tokens", tuple(roles), ia.tobytes())
        xs, xdc, xx = _memo(s, key, lambda: _token_side(a, ia, roles))
        xc = token_matrix(b, ib, roles)
        if xc.shape == xs.shape:
            z, r = exchangeable_stack(xdc, double_centred(xc)[None], xx)
            tz, tcorr = float(z[0]), float(r[0])
            tstrength = fisher_z(tcorr, max(xs.shape[0] - 1, 0) * max(xs.shape[1] - 1, 0))
    prod, pstrength = None, 0.0
    if a.token_kind == b.token_kind:
        _, pa, pb = np.intersect1d(a.keys[:a.product_tokens], b.keys[:b.product_tokens], assume_unique=True,
                                   return_indices=True)
        if len(pa) >= 8:
            got = product_evidence(a, b, pa.astype(np.int64), pb.astype(np.int64), memo=s, roles=fp_roles(s))
            if got is not None:
                prod, pstrength = got
    known = min(coord.log10_p if coord else 0.0, prod.log10_p if prod else 0.0)
    if len(ia) >= 16 and roles and tz < Z_IDENTITY and known > DECISIVE_LOG10P:
        res = residual_map(xs, xc, full=False, memo=s)
    tests = [log10_sf(tz) if len(ia) >= 8 else 0.0, prod.log10_p if prod else 0.0, res.log10_p]
    lp = min(0.0, min(tests) + math.log10(len(tests)))
    return DisguiseEvidence(len(ia), tcorr, tz, res, prod, lp, strength=max(tstrength, pstrength,
                                                                             _z_of(res.log10_p)))


