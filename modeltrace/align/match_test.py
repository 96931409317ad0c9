"""Permutation-invariant independence test: do two separate matchings of hidden units agree?

In the spirit of Zhu, Ahmed, Kuditipudi & Liang (ICML 2025, "robust" test): per layer (or per expert), the hidden
units of suspect and candidate are matched twice by maximum cosine, once on what a unit reads (its gate and up rows)
and once on what it writes (its down_proj column). Each matching alone is invariant to any permutation of the
units; if the models are independent the two matchings are unrelated, so the number of units on which they agree
is that of the fixed points of a random permutation: Poisson with mean (units both matchings assigned) /
(candidate units), about 1. A derived model, permuted or not, makes them agree on nearly every unit.

The count's p-value is randomized within the observed count (exactly uniform under the null; the random number is
a hash of the two matchings, so audits are reproducible); layers combine by Fisher's method (`stats.fisher_log10`).
Zhu et al. match hidden activations; matching weights needs no forward pass and still sees through permutations,
folded gains and per-dimension scales (features are z-scored per coordinate, `align.match.standardize`).
The null is checked on independent corpus pairs, adversarial ones included, in tests/detectors/test_match_test.py.
(Registered as "match_test" in detectors/registry.py; it lives in align/ because the alignment search uses it.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from modeltrace.align.match import Match, agreements, combine, identity_score, match_many, refine
from modeltrace.stats import poisson_log10_randomized


@dataclass
class UnitTest:
    """One group of hidden units (a dense MLP layer, a shared expert or one routed expert)."""

    layer: int  # suspect layer
    expert: int  # suspect expert, -1 for a dense MLP
    role: str  # mlp | shared | expert
    n_s: int
    n_c: int
    agree: int  # units on which the input-side and output-side matchings agree
    both: int  # units both matchings assigned
    log10p: float
    identity_mean: float  # mean combined cosine of unit i with unit i
    identity_z: float
    m_in: Match = field(repr=False)
    m_out: Match = field(repr=False)
    both_s: np.ndarray = field(repr=False)  # combined (input + output) features, for the alignment
    both_c: np.ndarray = field(repr=False)

    def alignment(self) -> np.ndarray:
        """Candidate unit per suspect unit: where the two matchings agree, else an exact assignment on the
        combined features for the rest (computed only when asked, i.e. when the layer is accepted)."""
        agreed = np.where((self.m_in.perm == self.m_out.perm) & (self.m_in.perm >= 0), self.m_in.perm, -1)
        return refine(agreed, self.both_s, self.both_c)

    @property
    def lam(self) -> float:
        return self.both / max(self.n_c, 1)

    def summary(self) -> dict:
        return {"layer": self.layer, "expert": self.expert, "role": self.role, "units": self.n_s,
                "candidate_units": self.n_c, "agreements": self.agree, "expected": round(self.lam, 3),
                "log10_p": round(self.log10p, 2)}


def unit_test(in_s: list[np.ndarray], in_c: list[np.ndarray], out_s: list[np.ndarray], out_c: list[np.ndarray],
              layer: int, expert: int = -1, role: str = "mlp") -> UnitTest:
    """Match units on input features, on output features and on both (all `standardize`d); count agreements."""
    sets = {"in": (in_s, in_c), "out": (out_s, out_c)}
    m = match_many(sets)
    agree, both = agreements(m["in"].perm, m["out"].perm)
    n_s, n_c = in_s[0].shape[0], in_c[0].shape[0]
    u = _hash_uniform(m["in"].perm, m["out"].perm)
    lp = poisson_log10_randomized(agree, both / max(n_c, 1), u)
    idm, idz = identity_score(in_s + out_s, in_c + out_c) if n_s == n_c else (0.0, 0.0)
    return UnitTest(layer, expert, role, n_s, n_c, agree, both, lp, idm, idz, m["in"], m["out"],
                    combine(in_s + out_s), combine(in_c + out_c))


def _hash_uniform(*arrays: np.ndarray) -> float:
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return (int.from_bytes(h.digest(), "little") + 0.5) / 2.0**64
