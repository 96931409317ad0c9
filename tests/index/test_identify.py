"""`identify` on an index of 20 corpus models (independent families, fine-tunes, merges): true parents in the top 3
for every derived suspect, linear and task-arithmetic weights within 0.02 from fingerprints alone, no ancestor for
independent models left out of the index, and the same answer over 10,000 indexed fingerprints (its time: benchmarks/
bench_index.py)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from modeltrace.fingerprint import Fingerprint, make_fingerprint
from modeltrace.identify import identify
from modeltrace.index import Index
from tests.audit_eval import Case, _score_params

INDEXED = ["base_a", "base_b", "ft_a1", "ft_a2", "ft_b1", *(f"indep_{i:02d}" for i in range(6)), "m_task_arith",
           "m_ties_d05", "m_slerp_t03", "moe_base", "moe_ft1", "moe_ft2", "mix_base", "mix_ft1", "mix_ft2"]
UNRELATED = [f"indep_{i:02d}" for i in range(6, 12)]  # indep_08 and indep_11 were trained on base_a's data
DERIVED = [
    "ft_a1", "ft_a2", "ft_b1", "m_linear_rio", "m_linear_indep", "m_linear_unnorm", "m_linear_grad",
    "m_linear_cross", "m_slerp_t03", "m_slerp_grad", "m_slerp_indep", "m_task_arith", "m_ties_d05", "m_ties_d03",
    "m_dare_linear", "m_dare_ties", "m_breadcrumbs", "m_della", "m_model_stock", "s_stack_2x2", "s_stack_deep",
    "moe_ft1", "moe_ft2", "moe_linear", "moe_ties", "mix_ft1", "mix_ft2", "mix_linear",
]
#: what identify must answer, where fingerprints decide the method as the audit does on full weights
METHOD = {"m_linear_rio": "linear", "m_linear_indep": "linear", "m_linear_unnorm": "linear", "m_linear_grad": "linear",
          "m_linear_cross": "linear", "m_slerp_t03": "slerp", "m_slerp_grad": "slerp", "m_task_arith":
          "task_arithmetic", "m_ties_d05": "ties", "m_ties_d03": "ties", "m_dare_linear": "dare_linear",
          "m_dare_ties": "dare_ties", "m_della": "della", "moe_linear": "linear", "moe_ties": "ties",
          "mix_linear": "linear"}


@pytest.fixture(scope="module")
def fps(corpus) -> dict[str, Fingerprint]:
    return {n: make_fingerprint(str(corpus.path(n))) for n in corpus.names()}


@pytest.fixture(scope="module")
def index(fps, tmp_path_factory) -> Index:
    ix = Index(tmp_path_factory.mktemp("identify") / "corpus.sqlite", create=True)
    for n in INDEXED:
        assert ix.add(fps[n], n).status == "added"
    assert ix.count() >= 20
    return ix


def test_corpus_covers_the_cases(corpus):
    assert set(DERIVED) == {n for n in corpus.names() if corpus[n]["kind"] in ("finetune", "merge", "stack")}
    assert {corpus[n]["family"] for n in INDEXED} == {"dense", "qwen3_moe", "mixtral"}


@pytest.mark.parametrize("name", DERIVED)
def test_true_parents_rank_in_the_top_3(corpus, fps, index, name):
    res = identify(fps[name], index, top=5)
    parents = corpus[name]["parents"]
    top3 = [h["model"] for h in res["hits"][:3]]
    assert set(parents) <= set(top3), f"{name}: {parents} not in {top3} ({res['summary']})"
    assert all(h["role"] in ("parent", "base", "related") for h in res["hits"][:len(parents)])
    assert res["identical"] == (name if name in INDEXED else None)
    kind = corpus[name]["kind"]
    # a fine-tune whose family base is not indexed with a sibling is "related": no direction from one delta
    expect = {"finetune": ("finetune", "related"), "stack": ("stack",)}.get(kind, ("merge",))
    if name in ("m_breadcrumbs",):  # the top-1% outlier test needs more coordinates than a fingerprint keeps
        assert res["relation"] in ("merge", "finetune", "related")
    else:
        assert res["relation"] in expect, res["summary"]
    if name in METHOD:
        assert res["method"] == METHOD[name], res["summary"]
    json.dumps(res)
    assert res["audit_command"].startswith("modeltrace audit ")


@pytest.mark.parametrize("name", ["m_linear_rio", "m_linear_indep", "m_linear_unnorm", "m_linear_grad",
                                  "m_linear_cross", "m_task_arith", "moe_linear", "mix_linear"])
def test_linear_and_task_arithmetic_weights_within_0_02(corpus, fps, index, name):
    res = identify(fps[name], index)
    case = Case(name, "merge", corpus[name]["method"], res["verdict"])
    _score_params(case, corpus[name], res["verdict"])  # per layer where the recipe has per-layer weights
    assert case.weight_error is not None and case.weight_error <= 0.02, (name, case.weight_error, res["summary"])


def test_rio_summary_line(fps, index):
    res = identify(fps["m_linear_rio"], index)
    assert res["summary"].startswith("0.60 × ft_a1 + 0.40 × ft_a2, linear; p < 1e-")
    assert [h["role"] for h in res["hits"][:2]] == ["parent", "parent"]
    assert res["undisclosed"]  # the corpus cards name no base model


@pytest.mark.parametrize("name", UNRELATED)
def test_no_ancestor_for_unrelated_models(fps, index, name):
    res = identify(fps[name], index)
    assert res["relation"] == "independent" and not res["related"]
    assert res["summary"].startswith("no ancestor in the index")
    assert all(h["role"] == "unrelated" and h["log10_p"] > -6 for h in res["hits"])
    assert res["audit_command"] is None


def test_descendants_are_not_ancestors(fps, index):
    """ft_a1 is indexed with three merges made from it: they are its descendants, base_a is its parent."""
    res = identify(fps["ft_a1"], index, top=10)
    roles = {h["model"]: h["role"] for h in res["hits"]}
    assert res["hits"][0]["model"] == "base_a" and roles["base_a"] == "parent"
    assert {roles[m] for m in ("m_task_arith", "m_slerp_t03", "m_ties_d05")} == {"descendant"}


def test_audit_confirms_what_identify_found(fps, index):
    import shlex

    from modeltrace.audit import run_audit
    from modeltrace.verdict import decide

    res = identify(fps["m_task_arith"], index)
    argv = shlex.split(res["audit_command"])
    cands = [argv[i + 1] for i, a in enumerate(argv) if a == "-c"]
    base = argv[argv.index("--base") + 1]
    v = decide(run_audit(argv[2], cands, base=base))
    assert (v["relation"], v["method"]) == (res["relation"], res["method"]) == ("merge", "task_arithmetic")


def _fillers(n: int, template: Fingerprint):
    """Index rows for `n` unrelated models: one real fingerprint's format, fresh random samples and summary."""
    rng = np.random.default_rng(7)
    keys = [k for k, s in template.slots.items() if not s.structured][:2]
    for i in range(n):
        fp = Fingerprint(dict(template.model, label=f"filler{i:05d}", spec=f"synthetic://filler{i:05d}"),
                         hashlib.sha256(f"filler{i}".encode()).hexdigest(), 0, 0,
                         {k: template.slots[k] for k in keys})
        for k in keys:
            s = fp.slots[k]
            fp.slots[k] = type(s)(s.slot, s.rows, s.cols, s.dtype, s.row0, s.structured,
                                  rng.standard_normal(s.values.shape).astype(np.float32) * 0.02, s.stats)
        yield fp


def test_identify_over_10000_fingerprints(fps, tmp_path):
    ix = Index(tmp_path / "big.sqlite", create=True)
    ix.add_many([fps[n] for n in INDEXED])
    batch: list[Fingerprint] = []
    for fp in _fillers(10_000 - len(INDEXED), fps["indep_00"]):
        batch.append(fp)
        if len(batch) == 2000:
            ix.add_many(batch)
            batch = []
    ix.add_many(batch)
    assert ix.count() == 10_000
    res = identify(fps["m_linear_rio"], ix)  # how long it takes is measured by benchmarks/bench_index.py
    assert res["summary"].startswith("0.60 × ft_a1 + 0.40 × ft_a2, linear")
    assert [h["model"] for h in res["hits"][:2]] == ["ft_a1", "ft_a2"]
