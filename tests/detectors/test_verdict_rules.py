"""The verdict's rules on constructed runs: slot statistics of synthetic tensors (made by each relation's definition,
accumulated and fitted as the audit does) in an `AuditRun` whose views are stand-ins that only name the models and
their storage dtypes. Each rule gets a case it must name and cases it must not: copy, recast, linear merge with
intervals that hold the truth, independent, a noisy recipe read as "related" (never "merge"), and a fine-tune whose
parent is named only because the base is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from modeltrace.architectures import Slot
from modeltrace.audit import AuditRun, SlotResult
from modeltrace.detectors.accumulate import SlotAccumulator
from modeltrace.detectors.fits import fit_slot
from modeltrace.methods import fitting_order
from modeltrace.stats import fisher_z
from modeltrace.verdict import ALPHA, decide

ROWS, COLS, LAYERS = 64, 256, 4
ROLES = ("attn.q", "attn.o", "mlp.up")


@dataclass
class _Part:
    rows: int = ROWS
    cols: int = COLS


@dataclass
class _View:
    """What the verdict reads of a model: its label, spec, parts (slot -> shape) and storage dtype per slot."""

    label: str
    stored: str = "F32"
    parts: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"/models/{self.label}"

    def dtype(self, slot: Slot) -> str:
        return self.stored


def _slots() -> list[Slot]:
    return [Slot(role, layer) for layer in range(LAYERS) for role in ROLES]


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _run(make, labels: list[str], stored: list[str], base: int | None = None, seed: int = 0) -> AuditRun:
    """`make(rng)` -> [suspect, candidate 1, ...] float32 arrays of one slot; every slot gets fresh draws."""
    rng = np.random.default_rng(seed)
    views = [_View(lab, dt) for lab, dt in zip(labels, stored, strict=True)]
    results = []
    for slot in _slots():
        models = make(rng)
        for v in views:
            v.parts[slot] = _Part()
        acc = SlotAccumulator(len(models), COLS, base, stored[0], total_rows=ROWS, cand_dtypes=stored[1:])
        acc.update([m.copy() for m in models])
        st = acc.finish()
        cands = list(range(1, len(models)))
        res = SlotResult(slot, cands, st, fit_slot(st, cands, base, fitting_order()), False,
                         rows_compared=ROWS, rows_total=ROWS)
        for c in cands:
            res.corr[c] = st.corr(c)
            res.z[c] = fisher_z(st.corr(c), st.dof)
        results.append(res)
    return AuditRun(views, base, results, [], [], 0, 0.0, None)  # type: ignore[arg-type]


def _w(rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    return (rng.standard_normal((ROWS, COLS)) * scale).astype(np.float32)


def test_byte_copy_and_recast():
    v = decide(_run(lambda r: [(a := _w(r)).copy(), a, _w(r)], ["s", "a", "b"], ["F32"] * 3))
    assert v["relation"] == "copy" and v["parents"][0]["model"] == "a"
    v = decide(_run(lambda r: [_bf16(a := _w(r)), a, _w(r)], ["s", "a", "b"], ["BF16", "F32", "F32"]))
    assert v["relation"] == "recast" and v["encoding"] == {"suspect": "BF16", "parent": "F32"}
    assert "re-encoding of a" in v["summary"]


def test_linear_merge_intervals_hold_the_truth():
    def make(r):
        a, b = _w(r), _w(r)
        return [_bf16(np.float32(0.6) * a + np.float32(0.4) * b), a, b]

    v = decide(_run(make, ["s", "a", "b"], ["BF16", "F32", "F32"]))
    assert v["relation"] == "merge" and v["method"] == "linear"
    got = {p["model"]: p for p in v["parents"]}
    for name, truth in (("a", 0.6), ("b", 0.4)):
        lo, hi = got[name]["interval"]
        assert lo <= truth <= hi and hi - lo < 0.01, got[name]


def test_independent_models_are_not_related():
    v = decide(_run(lambda r: [_w(r), _w(r), _w(r)], ["s", "a", "b"], ["F32"] * 3))
    assert v["relation"] == "independent" and v["parents"] == []
    assert all(p["p"] > ALPHA for p in v["p_values"].values())


def test_a_noisy_recipe_is_related_not_a_merge():
    """A merge involves no training: a 0.6/0.4 mix plus a training delta is reported as related, recipe as a hint."""
    def make(r):
        a, b = _w(r), _w(r)
        return [np.float32(0.6) * a + np.float32(0.4) * b + _w(r, 0.004), a, b]

    v = decide(_run(make, ["s", "a", "b"], ["F32"] * 3))
    assert v["relation"] == "related" and v["direction"] == "unknown"
    hint = {p["model"]: p["weight"] for p in v["recipe_hint"]}
    assert abs(hint["a"] - 0.6) < 0.05 and abs(hint["b"] - 0.4) < 0.05


def test_a_parent_is_named_only_with_the_base():
    """s = a + delta, a = m + tau, sibling c = m + tau': without m the direction is open; with m, a is the parent."""
    def make(r):
        m = _w(r)
        a, c = m + _w(r, 0.01), m + _w(r, 0.01)
        return [a + _w(r, 0.005), a, c, m]

    v = decide(_run(make, ["s", "a", "c", "m"], ["F32"] * 4))
    assert v["relation"] == "related"  # no base given or inferred in this run: parent, sibling or child of a
    v = decide(_run(make, ["s", "a", "c", "m"], ["F32"] * 4, base=3))
    assert v["relation"] == "finetune" and v["parents"][0]["model"] == "a" and v.get("siblings") == ["c"]


def test_an_interval_without_standard_errors_keeps_the_resolution_floor():
    """Task arithmetic's weights carry no standard errors: their interval is the spread over tensors, and it never
    narrows below the storage's resolution (a 400B task-arithmetic verdict once read [0.600003, 0.600008] for 0.6)."""
    from modeltrace.detectors.rounding import RESOLUTION
    from modeltrace.lineage_verdict import parent_entry

    lo, hi = parent_entry("nex", [0.6000055], None, floor=RESOLUTION)["interval"]
    assert lo <= 0.6 <= hi and hi - lo >= 2 * RESOLUTION
    lo, hi = parent_entry("nex", [0.6000050, 0.6000060, 0.6000055], None, floor=RESOLUTION)["interval"]
    assert lo <= 0.6 <= hi
