"""Each recipe fit on synthetic slot statistics: tensors made by the recipes' own definitions (mergekit's arithmetic in
float32, rounded once to the storage dtype), accumulated as the audit does, then fitted by `fit_slot` with the
registered methods. Known answers: the method and its weights or parameters; independent and fine-tuned tensors
must not come out as merges. The audit's end-to-end tests cover the same fits on mergekit's own output.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from modeltrace.detectors.accumulate import SlotAccumulator
from modeltrace.detectors.fits import FitContext, SlotFit, fit_slot
from modeltrace.methods import MergeMethod, fitting_order, merge_methods, register_method, unregister_method

ROWS, COLS = 256, 512


def _rand(seed: int, scale: float = 0.02) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((ROWS, COLS)) * scale).astype(np.float32)


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _fit(suspect: np.ndarray, cands: list[np.ndarray], base: int | None = None, dtype: str = "F32",
         methods=None) -> SlotFit:
    """Accumulate suspect + candidates in row chunks (as the streaming pass does) and fit; `base` indexes cands."""
    models = [suspect, *cands]
    b = None if base is None else base + 1
    acc = SlotAccumulator(len(models), COLS, b, dtype, total_rows=ROWS, cand_dtypes=["F32"] * len(cands))
    for a in range(0, ROWS, 64):
        acc.update([np.ascontiguousarray(m[a:a + 64]) for m in models])
    return fit_slot(acc.finish(), list(range(1, len(models))), b, fitting_order() if methods is None else methods)


def test_fitting_order_is_simplest_first_and_covers_the_merge_families():
    order = [m.name for m in fitting_order()]
    assert order == ["slerp", "model_stock", "task_arithmetic", "linear", "sparse"]
    assert all(merge_methods()[n].fit_order is None for n in ("ties", "dare_linear", "passthrough"))


def test_copy_and_reencoding():
    a, b = _rand(1), _rand(2)
    fit = _fit(a.copy(), [a, b])
    assert fit.method == "copy" and fit.weights == {1: 1.0} and fit.explained
    fit = _fit(_bf16(b), [a, b], dtype="BF16")  # a bf16 copy of the float32 candidate 2
    assert fit.method == "copy" and fit.weights == {2: 1.0} and fit.params.get("rounded") == 1.0


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_linear_merge_weights(dtype):
    a, b = _rand(3), _rand(4)
    s = np.float32(0.6) * a + np.float32(0.4) * b
    s = _bf16(s) if dtype == "BF16" else s
    fit = _fit(s, [a, b], dtype=dtype)
    assert fit.method == "linear" and fit.explained and fit.params["normalized"] == 1.0
    tol = 1e-6 if dtype == "F32" else 2e-3
    assert abs(fit.weights[1] - 0.6) < tol and abs(fit.weights[2] - 0.4) < tol
    # the standard errors say how well the weight is known; the truth lies within a few of them
    assert all(abs(fit.weights[c] - w) <= 6 * fit.se[c] + 1e-6 for c, w in ((1, 0.6), (2, 0.4)))


def test_unnormalised_linear_merge():
    a, b = _rand(5), _rand(6)
    fit = _fit(np.float32(0.7) * a + np.float32(0.7) * b, [a, b])
    assert fit.method == "linear" and fit.params["normalized"] == 0.0
    assert abs(fit.weights[1] - 0.7) < 1e-5 and abs(fit.params["sum_weights"] - 1.4) < 1e-5


def test_slerp_t():
    """Stored in bf16, as mergekit's SLERPs are (t is searched on a grid fine enough for bf16's rounding)."""
    a, b = _bf16(_rand(7)), _bf16(_rand(8))
    t = 0.3
    g = [[float(np.vdot(x, y)) for y in (a, b)] for x in (a, b)]
    theta = math.acos(g[0][1] / math.sqrt(g[0][0] * g[1][1]))
    s = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    fit = _fit(_bf16(s.astype(np.float32)), [a, b], dtype="BF16")
    assert fit.method == "slerp" and fit.explained and abs(fit.params["t"] - t) < 0.01


def test_task_arithmetic_lambdas():
    base = _rand(9)
    ta, tb = _rand(10, 0.002), _rand(11, 0.002)
    s = base + np.float32(0.7) * ta + np.float32(0.5) * tb
    fit = _fit(s, [base + ta, base + tb, base], base=2)
    assert fit.method == "task_arithmetic" and fit.explained
    assert abs(fit.weights[1] - 0.7) < 1e-3 and abs(fit.weights[2] - 0.5) < 1e-3


def _ties(base: np.ndarray, taus: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """TIES as mergekit computes it: keep each task vector's top `density` magnitudes, elect the sign of the weighted
    sum, average the agreeing kept entries weighted (normalised by the weights that took part)."""
    kept = []
    for t in taus:
        cut = np.quantile(np.abs(t), 1 - density)
        kept.append(np.where(np.abs(t) >= cut, t, 0).astype(np.float32))
    w = np.array(weights, dtype=np.float32)[:, None, None]
    stack = np.stack(kept) * w
    sign = np.sign(stack.sum(0))
    agree = (np.sign(stack) == sign) & (stack != 0)
    num = (stack * agree).sum(0)
    den = (w * agree).sum(0)
    return (base + np.where(den > 0, num / np.where(den > 0, den, 1), 0)).astype(np.float32)


def _dare_linear(base: np.ndarray, taus: list[np.ndarray], weights: list[float], density: float,
                 seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = base.copy()
    for t, w in zip(taus, weights, strict=True):
        keep = rng.random(t.shape) < density
        out += np.float32(w) * np.where(keep, t / np.float32(density), 0).astype(np.float32)
    return out


def test_ties_is_named_with_its_density():
    base = _rand(12)
    ta, tb = _rand(13, 0.002), _rand(14, 0.002)
    s = _ties(base, [ta, tb], [0.5, 0.5], density=0.3)
    fit = _fit(s, [base + ta, base + tb, base], base=2)
    assert fit.method == "ties", fit
    assert abs(fit.params["density"] - 0.3) < 0.08


def test_dare_linear_is_named():
    base = _rand(15)
    ta, tb = _rand(16, 0.002), _rand(17, 0.002)
    s = _dare_linear(base, [ta, tb], [0.6, 0.4], density=0.5)
    fit = _fit(s, [base + ta, base + tb, base], base=2)
    assert fit.method == "dare_linear", fit
    assert abs(fit.params["density"] - 0.5) < 0.1


def test_finetune_and_independent_are_not_merges():
    a, b = _rand(18), _rand(19)
    tuned = a + _rand(20, 0.002)  # training moved every weight a little
    fit = _fit(tuned, [a, b])
    assert fit.method == "finetune" and set(fit.weights) == {1} and not fit.explained
    fit = _fit(_rand(21), [a, b])
    assert fit.method == "unexplained" and not fit.explained


def test_a_registered_method_is_fitted_before_the_ones_after_it():
    class Mean(MergeMethod):
        name, description, paper = "toy_plain_mean", "plain average of the parents", "-"
        fit_order = 35.0

        def fit(self, ctx: FitContext) -> SlotFit | None:
            k = len(ctx.cands)
            if ctx.rss_free <= ctx.floor and all(abs(w - 1 / k) < 0.01 for w in ctx.free.values()):
                return ctx.result(self.name, {c: 1 / k for c in ctx.cands}, ctx.rss_free)
            return None

    a, b = _rand(22), _rand(23)
    register_method(Mean())
    try:
        assert [m.name for m in fitting_order()][:2] == ["slerp", "toy_plain_mean"]
        fit = _fit(np.float32(0.5) * a + np.float32(0.5) * b, [a, b])
        assert fit.method == "toy_plain_mean" and fit.weights == {1: 0.5, 2: 0.5} and fit.explained
        assert _fit(np.float32(0.6) * a + np.float32(0.4) * b, [a, b]).method == "linear"  # not its recipe
    finally:
        unregister_method("toy_plain_mean")
    assert _fit(np.float32(0.5) * a + np.float32(0.5) * b, [a, b]).method == "linear"


def test_without_refinement_least_squares_weights_stay_out_of_pooling():
    """A huge audit refines only a spread subset of slots (audit.ROUNDING_SLOTS); the others keep least squares
    with infinite standard errors, so the verdict's pooled weights come from refined slots only."""
    from modeltrace.architectures import Slot
    from modeltrace.audit import ROUNDING_SLOTS, _choose_refined, _PlanItem

    a, b = _rand(24), _rand(25)
    models = [_bf16(np.float32(0.6) * a + np.float32(0.4) * b), a, b]
    acc = SlotAccumulator(3, COLS, None, "BF16", total_rows=ROWS, cand_dtypes=["F32", "F32"])
    acc.update([m.copy() for m in models])
    st = acc.finish()
    refined = fit_slot(st, [1, 2], None, fitting_order())
    plain = fit_slot(st, [1, 2], None, fitting_order(), refine=False)
    assert refined.params.get("rounding_fit") == 1.0 and all(math.isfinite(v) for v in refined.se.values())
    assert plain.params.get("rounding_skipped") == 1.0 and all(v == math.inf for v in plain.se.values())
    assert plain.method == refined.method == "linear" and abs(plain.weights[1] - 0.6) < 0.01
    plan = [_PlanItem(Slot("mlp.up", k), [1, 2], {}, 4) for k in range(3 * ROUNDING_SLOTS)]
    _choose_refined(plan)
    kept = [k for k, item in enumerate(plan) if item.refine]
    assert len(kept) == ROUNDING_SLOTS and kept[0] == 0 and kept[-1] == len(plan) - 1
