"""The remote read planner (issue 12) at small sizes: coalescing, requests in flight bounded by --connections,
retries under injected faults, shard headers in parallel, the layer map's samples in one batch, local fast path."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from modeltrace.sources import open_source, remote
from modeltrace.sources.hub import open_hub
from modeltrace.sources.planner import Prefetcher, coalesce
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures (isolated env, local Hub server)


# ---- coalescing ----------------------------------------------------------------------------------------------
def test_coalesce_merges_near_spans_only():
    spans = [("a", 0, 100), ("a", 100, 100), ("a", 250, 50), ("a", 10_000, 10), ("b", 0, 8), ("a", 50, 10)]
    got = coalesce(spans, gap=1000, max_request=1 << 20)
    # a: 0-300 (4 spans: adjacent, overlapping and a 50-byte hole); 10_000 stays apart (hole 9_700 > gap)
    assert got == [("a", 0, 300, 4), ("a", 10_000, 10, 1), ("b", 0, 8, 1)]


def test_coalesce_bounds_waste_and_request_size():
    # a hole larger than the bytes wanted is not read, even under the gap
    assert coalesce([("a", 0, 10), ("a", 500, 10)], gap=1000) == [("a", 0, 10, 1), ("a", 500, 10, 1)]
    assert coalesce([("a", 0, 400), ("a", 500, 400)], gap=1000) == [("a", 0, 900, 2)]
    # merged requests stop at max_request; a longer single span stays whole
    spans = [("a", i * 100, 100) for i in range(10)] + [("a", 5000, 3000)]
    assert coalesce(spans, gap=1000, max_request=450) == [
        ("a", 0, 400, 4), ("a", 400, 400, 4), ("a", 800, 200, 2), ("a", 5000, 3000, 1)]


def test_prefetcher_serves_planned_spans_and_keeps_under_its_cap():
    calls: list[tuple[str, int, int]] = []
    data = bytes(range(256)) * 64

    def fetch(f: str, off: int, n: int) -> bytes:
        calls.append((f, off, n))
        return data[off:off + n]

    pf = Prefetcher(fetch, workers=4, cap=1000, gap=0, max_request=600)
    spans = [("f", i * 600, 600) for i in range(5)]
    pf.add(spans)
    assert pf.planned_requests == 5 and pf.held <= 1000  # one 600-byte block fetched, the others queued
    for f, off, n in spans:
        assert pf.take(f, off, n) == data[off:off + n]
        assert pf.held <= 1000
    assert sorted(calls) == spans  # each block fetched once
    assert pf.take("f", 0, 10) is None  # consumed blocks are dropped; unplanned reads go to the network


# ---- against the server --------------------------------------------------------------------------------------
def _model(folder, tensors: int = 6, rows: int = 512, cols: int = 256, shards: int = 1):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(tensors)]
    wmap = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: rng.standard_normal((rows, cols), dtype=np.float32).astype(ml_dtypes.bfloat16)
                for n in names[s::shards]}
        save_file(part, str(folder / fname))
        wmap.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": tensors}))
    return folder


def test_nearby_rows_are_one_request_and_reads_are_served_from_it(tmp_path, hub_server):  # noqa: F811
    folder = _model(tmp_path / "m")
    srv = hub_server({"org/m": folder})
    src = open_hub("hf://org/m")
    name = "model.layers.0.mlp.down_proj.weight"
    src.tensors()
    srv.clear()
    r0, b0 = src.stats.requests, src.stats.bytes_read
    rows = [(name, a, a + 2) for a in range(0, 64, 4)]  # 16 ranges, holes of 2 rows (1 KiB)
    got = src.read_many(rows)
    assert len(srv.ranges()) == 1  # one coalesced request
    info = src.tensors()[name]
    row_bytes = info.nbytes // info.rows
    (_, start, end), = srv.ranges()
    assert (start, end + 1) == (info.offset, info.offset + 62 * row_bytes)
    local = open_source(folder)
    for (n, a, b), x in zip(rows, got, strict=True):
        np.testing.assert_array_equal(x, local.read_rows(n, a, b))
    assert (src.stats.requests - r0, src.stats.bytes_read - b0) == (1, 62 * row_bytes)


def test_requests_in_flight_are_bounded_by_connections(tmp_path, hub_server, monkeypatch):  # noqa: F811
    folder = _model(tmp_path / "m", tensors=12)
    srv = hub_server({"org/m": folder})
    monkeypatch.setenv("MODELTRACE_CONNECTIONS", "3")
    src = open_hub("hf://org/m")
    src.tensors()
    srv.clear()
    srv.delay_next(12, 0.3)  # each answer held: requests pile up to the limit
    reads = [(f"model.layers.{i}.mlp.down_proj.weight", 100, 104) for i in range(12)]  # far apart: 12 requests
    src.read_many(reads)
    assert len(srv.ranges()) == 12
    assert srv.max_in_flight == 3


def test_shard_headers_are_fetched_in_parallel(tmp_path, hub_server, monkeypatch):  # noqa: F811
    folder = _model(tmp_path / "m", tensors=8, rows=8, cols=8, shards=8)
    srv = hub_server({"org/m": folder})
    monkeypatch.setenv("MODELTRACE_CONNECTIONS", "4")
    src = open_hub("hf://org/m")
    srv.clear()
    srv.delay_next(100, 0.2)
    assert len(src.tensors()) == 8
    assert len(srv.ranges()) == 8  # one header read per shard (its length prefix with it)
    assert srv.max_in_flight == 4


def test_prefetched_reads_retry_through_faults(tmp_path, hub_server):  # noqa: F811
    folder = _model(tmp_path / "m")
    srv = hub_server({"org/m": folder})
    src = open_hub("hf://org/m")
    src.tensors()
    srv.clear()
    srv.fail_next(2, 503)
    reads = [(f"model.layers.{i}.mlp.down_proj.weight", 0, 3) for i in range(6)]
    got = src.read_many(reads)
    local = open_source(folder)
    for (n, a, b), x in zip(reads, got, strict=True):
        np.testing.assert_array_equal(x, local.read_rows(n, a, b))
    statuses = sorted(r.status for r in srv.requests("GET"))
    assert statuses.count(503) == 2 and statuses.count(206) == 6


def test_prefetch_respects_the_byte_budget(tmp_path, hub_server):  # noqa: F811
    from modeltrace.errors import RemoteError

    folder = _model(tmp_path / "m")
    hub_server({"org/m": folder})
    src = open_hub("hf://org/m")
    src.tensors()
    remote.configure(budget=3 * 512 * 256 * 2)  # three whole tensors
    reads = [(f"model.layers.{i}.mlp.down_proj.weight", 0, 512) for i in range(6)]
    with pytest.raises(RemoteError, match="byte budget"):
        src.read_many(reads)
    assert remote.spent_bytes() <= 3 * 512 * 256 * 2


def test_layer_map_reads_one_block_per_sampled_tensor_all_at_once(corpus, hub_server):  # noqa: F811
    from modeltrace.align.layers import _layer_roles, map_layers
    from modeltrace.align.view import open_view

    srv = hub_server({"org/rio": corpus.path("m_linear_rio"), "org/a1": corpus.path("ft_a1")})
    views = [open_view("hf://org/rio"), open_view("hf://org/a1")]
    srv.clear()
    matches = map_layers(views[0], views[1:])
    local = map_layers(open_view(str(corpus.path("m_linear_rio"))), [open_view(str(corpus.path("ft_a1")))])
    assert [(m.candidate, m.source_layer) for m in matches] == [(m.candidate, m.source_layer) for m in local]
    sampled = sum(len(r) for v in views for r in _layer_roles(v).values())
    assert 0 < len(srv.ranges()) <= sampled  # at most one request per sampled tensor (nearby ones coalesced)
    assert srv.max_in_flight > 1


def test_local_sources_keep_their_fast_path(tmp_path):
    folder = _model(tmp_path / "m")
    src = open_source(folder)
    src.tensors()
    before = src.stats.requests
    src.prefetch([("model.layers.0.mlp.down_proj.weight", 0, 100)])
    assert src.stats.requests == before  # the hint is ignored: nothing read ahead, no threads
    assert src.can_map
