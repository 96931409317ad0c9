"""Audit every derived model of the test corpus against its true parents and score the answer against the
manifest's ground truth. Shared by the tests and by benchmarks/bench_accuracy.py."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from modeltrace.audit import run_audit
from modeltrace.verdict import decide

#: mergekit method -> what modeltrace must answer (the family name where methods cannot be told apart)
EXPECTED_METHOD = {"breadcrumbs": ("breadcrumbs", "sparse")}


#: Sparse merges (TIES, DARE, DELLA, breadcrumbs): reported weights against the normalised recipe. Looser than the
#: linear family's 0.01: TIES at density 0.3 (0.012) and breadcrumbs (0.014) are fitted on the entries every parent
#: kept, which sparse trimming leaves few of.
SPARSE_WEIGHT_TOL = 0.02


@dataclass
class Case:
    name: str
    kind: str
    truth_method: str | None
    verdict: dict[str, Any]
    errors: list[str] = field(default_factory=list)
    weight_error: float | None = None
    param_error: float | None = None
    #: sparse merges: reported weights against the normalised recipe weights (measured, not held to a target)
    sparse_weight_error: float | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def audit_case(corpus: Any, name: str, **kw: Any) -> tuple[dict, list[str], str | None]:
    meta = corpus[name]
    base = meta.get("base")
    if meta["kind"] == "finetune":
        cands, base = [meta["parent"]], meta["parent"]  # the user names the base: direction comes from it
    else:
        cands = [p for p in meta["parents"] if p != base]
    v = decide(run_audit(str(corpus.path(name)), [str(corpus.path(c)) for c in cands],
                         base=str(corpus.path(base)) if base else None, **kw))
    return v, cands, base


def score(corpus: Any, name: str, **kw: Any) -> Case:
    meta = corpus[name]
    v, cands, base = audit_case(corpus, name, **kw)
    case = Case(name, meta["kind"], meta.get("method"), v)
    got = {p["model"]: p for p in v["parents"]}
    if meta["kind"] == "finetune":
        if v["relation"] != "finetune" or list(got) != [meta["parent"]]:
            case.errors.append(f"expected finetune of {meta['parent']}, got {v['relation']} {list(got)}")
        return case
    if meta["kind"] == "stack":
        if v["relation"] != "stack":
            case.errors.append(f"expected stack, got {v['relation']}")
            return case
        truth = [(e["layer"], e["model"], e["source_layer"]) for e in _truth_layer_map(meta)]
        mine = [(e["layer"], e["model"], e["source_layer"]) for e in v["layer_map"]]
        if truth and truth != mine:
            case.errors.append(f"layer map {mine} != {truth}")
        return case
    method = meta["method"]
    allowed = EXPECTED_METHOD.get(method, (method,))
    if v["relation"] != "merge" or v["method"] not in allowed:
        case.errors.append(f"expected merge/{method}, got {v['relation']}/{v['method']}")
        return case
    _score_params(case, meta, v)
    return case


def _truth_layer_map(meta: dict) -> list[dict]:
    return [{"layer": e["layer"], "model": e["parent"], "source_layer": e["parent_layer"]}
            for e in meta.get("layer_map") or []]


def _score_params(case: Case, meta: dict, v: dict) -> None:
    method = meta["method"]
    got = {p["model"]: p.get("weight") for p in v["parents"]}
    gp = meta.get("global_parameters") or {}
    lv = meta.get("layer_values") or {}
    if method in ("linear", "task_arithmetic") and meta.get("coefficients"):
        truth = {k: w for k, w in meta["coefficients"].items() if k != meta.get("base")}
        if lv:
            # per-layer gradients: compare layer by layer
            errs = []
            for e in v["layers"]:
                if e["layer"] < 0:
                    continue
                for parent, spec in lv.get("weight", {}).items():
                    want = spec["layers"][e["layer"]]
                    errs.append(abs(e["weights"].get(parent, 0.0) - want))
            case.weight_error = max(errs) if errs else None
        else:
            case.weight_error = max(abs(got.get(k, 0.0) - w) for k, w in truth.items())
        if case.weight_error is not None and case.weight_error > 0.01:
            case.errors.append(f"weight error {case.weight_error:.4f} > 0.01")
    if method == "slerp":
        t_truth = gp.get("t")
        if lv and "t" in lv:
            errs = [abs(e["t"] - lv["t"]["layers"][e["layer"]]) for e in v["layers"] if e["layer"] >= 0 and "t" in e]
            case.param_error = max(errs) if errs else 1.0
        else:
            case.param_error = abs(v["parameters"]["t"]["value"] - float(t_truth))
        if case.param_error > 0.05:
            case.errors.append(f"SLERP t error {case.param_error:.3f} > 0.05")
    if method in ("ties", "dare_linear", "dare_ties", "della", "breadcrumbs"):
        ws = {k: p["weight"] for k, p in (meta.get("parameters") or {}).items() if p.get("weight") is not None}
        if ws and set(ws) <= set(got):
            total = sum(ws.values())
            case.sparse_weight_error = max(abs(got[k] - w / total) for k, w in ws.items())
            if case.sparse_weight_error > SPARSE_WEIGHT_TOL:
                case.errors.append(f"sparse-merge weight error {case.sparse_weight_error:.3f} > {SPARSE_WEIGHT_TOL}")
    if method in ("ties", "dare_linear", "dare_ties", "della"):
        dens = [p.get("density") for p in (meta.get("parameters") or {}).values() if p.get("density") is not None]
        if dens:
            case.param_error = abs(v["parameters"]["density"]["value"] - float(dens[0]))
            if case.param_error > 0.05:
                case.errors.append(f"density error {case.param_error:.3f} > 0.05")


def derived_names(corpus: Any) -> list[str]:
    return [n for n in corpus.names() if corpus[n]["kind"] in ("merge", "stack", "finetune")]


def independent_pairs(corpus: Any, limit: int | None = None) -> list[tuple[str, str]]:
    """Pairs of models with no shared ancestry (independent initialisations, trained or not)."""
    roots = [n for n in corpus.names() if corpus[n]["kind"] in ("base", "independent")
             and corpus[n].get("family", "dense") == "dense"]
    pairs = list(itertools.combinations(roots, 2))
    return pairs[:limit] if limit else pairs


def independence_p(corpus: Any, a: str, b: str) -> tuple[float, str]:
    v = decide(run_audit(str(corpus.path(a)), [str(corpus.path(b))]))
    return v["p_values"][b]["p"], v["relation"]
