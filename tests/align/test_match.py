"""The unit matcher: exact on small layers, mutual-best plus exact-on-ambiguous on large ones, and invariances."""

from __future__ import annotations

import numpy as np

from modeltrace.align.match import agreements, identity_score, match, match_many, standardize


def _pair(rng, n, k, noise):
    a = rng.standard_normal((n, k))
    perm = rng.permutation(n)
    b = np.empty_like(a)
    b[perm] = a + noise * rng.standard_normal((n, k))  # candidate unit perm[i] is suspect unit i
    return a, b, perm


def test_small_layer_exact_assignment_recovers_permutation():
    rng = np.random.default_rng(0)
    a, b, perm = _pair(rng, 300, 64, 1.0)  # cosine ~0.7 per true pair
    m = match([standardize(a)], [standardize(b)])
    assert np.array_equal(m.perm, perm) and m.exact == 300


def test_large_layer_takes_the_mutual_best_path():
    rng = np.random.default_rng(1)
    a, b, perm = _pair(rng, 3000, 64, 0.7)
    m = match([standardize(a)], [standardize(b)])
    assert np.array_equal(m.perm, perm)
    assert m.decided > 2900 and m.exact < 100  # the exact step only sees the few ambiguous units


def test_ambiguous_units_get_the_exact_step():
    rng = np.random.default_rng(2)
    a, b, perm = _pair(rng, 2000, 64, 0.3)
    a[1] = a[0]  # two identical suspect units: neither is a clear mutual best
    b[perm[1]] = b[perm[0]]
    m = match([standardize(a)], [standardize(b)], exact_all=100)
    assert m.exact >= 2
    assert set(m.perm[:2]) == {perm[0], perm[1]}
    assert np.array_equal(m.perm[2:], perm[2:])


def test_pruned_suspect_matches_into_larger_candidate():
    rng = np.random.default_rng(3)
    a, b, perm = _pair(rng, 400, 64, 0.5)
    keep = np.sort(rng.choice(400, 300, replace=False))
    m = match([standardize(a[keep])], [standardize(b)])
    assert np.array_equal(m.perm, perm[keep])


def test_standardize_ignores_per_coordinate_scales_and_shared_means():
    """A folded norm gain multiplies a coordinate; a shared mean direction adds to every unit: neither changes
    the features."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 32))
    scaled = x * rng.uniform(0.2, 5, 32) + rng.standard_normal(32) * 10
    assert np.allclose(standardize(x), standardize(scaled), atol=1e-5)


def test_independent_matchings_agree_by_chance_only():
    rng = np.random.default_rng(5)
    hits = []
    for _ in range(20):
        f = [standardize(rng.standard_normal((200, 32))) for _ in range(4)]
        ms = match_many({"in": ([f[0]], [f[1]]), "out": ([f[2]], [f[3]])})
        hits.append(agreements(ms["in"].perm, ms["out"].perm)[0])
    assert np.mean(hits) < 2.5  # Poisson(1)


def test_identity_score_z():
    rng = np.random.default_rng(6)
    a = standardize(rng.standard_normal((500, 64)))
    b = standardize(rng.standard_normal((500, 64)))
    assert abs(identity_score([a], [b])[1]) < 5
    assert identity_score([a], [a])[1] > 100
