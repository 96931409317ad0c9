"""The audit on hf:// sources served over HTTP Range by a local Hub stand-in: same verdict, only bytes asked for."""

from __future__ import annotations

from modeltrace.audit import run_audit
from modeltrace.verdict import decide
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures


def test_remote_audit_matches_local_and_sampling_reads_less(corpus, hub_server):  # noqa: F811
    srv = hub_server({"org/rio": corpus.path("m_linear_rio"), "org/a1": corpus.path("ft_a1"),
                      "org/a2": corpus.path("ft_a2")})
    full = decide(run_audit("hf://org/rio", ["hf://org/a1", "hf://org/a2"]))
    assert full["relation"] == "merge" and full["method"] == "linear"
    w = {p["model"]: p["weight"] for p in full["parents"]}
    assert abs(w["org/a1"] - 0.6) < 0.01 and abs(w["org/a2"] - 0.4) < 0.01
    ranged = [r for r in srv.requests() if r.method == "GET" and "/resolve/" in r.path]
    assert ranged and all(r.range is not None for r in ranged), "every weight read must be a Range request"
    part = decide(run_audit("hf://org/rio", ["hf://org/a1", "hf://org/a2"], sample=0.05))
    assert part["method"] == "linear" and part["bytes_read"] < 0.3 * full["bytes_read"]
