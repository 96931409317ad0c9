"""The sampling design of remote audits (modeltrace/audit_design.py): a seeded subset of routed experts within a
request target, one row block per tensor within a byte budget, the same verdict as a full local audit."""

from __future__ import annotations

import importlib

import pytest

from modeltrace.audit import run_audit
from modeltrace.audit_design import chosen_experts
from modeltrace.errors import InputError
from modeltrace.progress import RemoteReadsColumn
from modeltrace.sources import remote
from modeltrace.verdict import decide
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures

audit = importlib.import_module("modeltrace.audit")  # the module: the package's `audit` attribute is the API function

#: qwen3_moe and mixtral corpus MoEs: 2 layers x 4 experts x 3 expert roles = 24 expert tensors, 9 requests per
#: expert of a layer (3 roles x 3 models); 21 other tensors (63 requests) in qwen3_moe, 17 (51) in mixtral.
FIXED = {"moe": 63, "mix": 51}


def _stream_requests(monkeypatch, srv) -> list[int]:
    """Requests the server answered during each streaming pass (everything after the layer map)."""
    seen: list[int] = []
    inner = audit._stream

    def wrapped(*a, **kw):
        before = len(srv.requests("GET", "/resolve/"))
        try:
            return inner(*a, **kw)
        finally:
            srv.wait_idle()
            seen.append(len(srv.requests("GET", "/resolve/")) - before)

    monkeypatch.setattr(audit, "_stream", wrapped)
    return seen


def _same_verdict(local: dict, sampled: dict) -> None:
    assert (sampled["relation"], sampled["method"]) == (local["relation"], local["method"]) == ("merge", "linear")
    lw = {p["model"].split("_")[-1]: p for p in local["parents"]}
    sw = {p["model"].split("_")[-1]: p for p in sampled["parents"]}
    assert set(sw) == set(lw) == {"ft1", "ft2"}
    for k, p in sw.items():
        assert abs(p["weight"] - lw[k]["weight"]) <= 0.005
        lo, hi = p["interval"]
        assert lo <= {"ft1": 0.6, "ft2": 0.4}[k] <= hi  # the corpus merge is 0.6 / 0.4


@pytest.mark.parametrize("fam", ["moe", "mix"])
def test_sampled_remote_moe_audit_reads_an_expert_subset_and_keeps_the_verdict(
        corpus, hub_server, monkeypatch, fam):  # noqa: F811
    names = [f"{fam}_linear", f"{fam}_ft1", f"{fam}_ft2"]
    local = decide(run_audit(str(corpus.path(names[0])), [str(corpus.path(n)) for n in names[1:]]))
    srv = hub_server({f"org/{n}": corpus.path(n) for n in names})
    seen = _stream_requests(monkeypatch, srv)
    target = FIXED[fam] + 2 * 2 * 9 + 1  # room for 2 of the 4 experts in each of the 2 layers
    run = run_audit(f"hf://org/{names[0]}", [f"hf://org/{n}" for n in names[1:]], sample=0.5, max_requests=target)
    sampled = decide(run)
    _same_verdict(local, sampled)
    cov = sampled["coverage"]
    assert (cov["experts_read"], cov["experts_total"], cov["moe_layers"]) == (2, 4, 2)
    assert all(len(v) == 2 for v in cov["experts"].values())
    assert cov["requests_planned"] <= target and seen[-1] <= cov["requests_planned"]
    # the experts not read are not compared, and the report says so
    read = {(r.slot.layer, r.slot.expert) for r in run.slots if r.slot.expert >= 0}
    assert read == {(int(layer), e) for layer, es in cov["experts"].items() for e in es}
    assert any("2 of 4 in each of 2 MoE layers" in w and "not read" in w for w in sampled["warnings"])
    # the same experts in every run and every model; a larger target reads them all
    again = decide(run_audit(f"hf://org/{names[0]}", [f"hf://org/{n}" for n in names[1:]], sample=0.5,
                             max_requests=target))
    assert again["coverage"]["experts"] == cov["experts"]
    full = decide(run_audit(f"hf://org/{names[0]}", [f"hf://org/{n}" for n in names[1:]], sample=0.5))
    assert full["coverage"]["experts_read"] == 4
    assert full["coverage"]["tensors_read"] == full["coverage"]["tensors_shared"] > cov["tensors_read"]


def test_budgeted_remote_moe_audit_stays_within_its_bytes(corpus, hub_server, monkeypatch):  # noqa: F811
    names = ["moe_linear", "moe_ft1", "moe_ft2"]
    local = decide(run_audit(str(corpus.path(names[0])), [str(corpus.path(n)) for n in names[1:]]))
    srv = hub_server({f"org/{n}": corpus.path(n) for n in names})
    with pytest.raises(InputError, match="--budget 30000 bytes cannot hold one row of each"):
        run_audit("hf://org/moe_linear", ["hf://org/moe_ft1", "hf://org/moe_ft2"], budget=30_000)
    srv.clear()
    budget = 200_000  # about a sixth of the three models' weights
    remote.configure(budget=budget)
    column = RemoteReadsColumn()
    ticks: list[tuple[int, int]] = []
    sampled = decide(run_audit("hf://org/moe_linear", ["hf://org/moe_ft1", "hf://org/moe_ft2"], budget=budget,
                               max_requests=FIXED["moe"] + 37, progress=lambda d, t: ticks.append((d, t))))
    srv.wait_idle()
    assert 0 < srv.bytes_sent() <= budget and remote.spent_bytes() <= budget
    # the progress bar: elements compared out of a total that is the sampled rows', requests and bytes fetched
    assert ticks[-1][0] == ticks[-1][1] == ticks[0][1] and [d for d, _ in ticks] == sorted(d for d, _ in ticks)
    got = srv.requests("GET", "/resolve/")
    assert column.render(None).plain == f"{len(got):,} requests, {sum(r.sent for r in got) / 1e6:,.1f} MB fetched"
    _same_verdict(local, sampled)
    assert 0 < sampled["sample"] < 0.5 and sampled["coverage"]["budget"] == budget


def test_chosen_experts_depend_on_layer_and_count_only():
    ids = list(range(512))
    a = chosen_experts(ids, 12, 3)
    assert len(a) == 12 and a == chosen_experts(list(reversed(ids)), 12, 3) and a != chosen_experts(ids, 12, 4)
    assert set(a) <= set(ids) and chosen_experts(ids[:8], 12, 3) == tuple(range(8))
    # a layer whose experts are numbered differently keeps the same positions among them
    assert chosen_experts([i + 1000 for i in ids], 12, 3) == tuple(e + 1000 for e in a)


def test_huge_remote_models_are_planned_by_default_small_ones_read_in_full():
    from types import SimpleNamespace

    from modeltrace.audit_design import BUDGET_SHARE, DEFAULT_REMOTE_SHARE, default_budget
    from modeltrace.sources.base import TensorInfo

    def view(spec: str, nbytes: int):
        info = TensorInfo("w", "BF16", (nbytes // 2,), nbytes, "f")
        return SimpleNamespace(spec=spec, source=SimpleNamespace(tensors=lambda: {"w": info}))

    big = [view("hf://o/a", 10**10), view("hf://o/b", 10**10)]
    assert default_budget(big) == int(DEFAULT_REMOTE_SHARE * 2 * 10**10 / BUDGET_SHARE)
    assert default_budget([view("hf://o/a", 10**9), view("/local/b", 10**11)]) is None  # 1 GB remote: read it all
    assert default_budget([view("/local/a", 10**11)]) is None
