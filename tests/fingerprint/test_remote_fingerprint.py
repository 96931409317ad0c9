"""Fingerprints of hf:// models over HTTP Range (tests/hubserver.py on 127.0.0.1): identical to the local ones, a
fraction of a percent of the bytes, one ranged read per sampled tensor, and retries through a flaky server."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from modeltrace.errors import RemoteError
from modeltrace.fingerprint import make_fingerprint
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures (isolated env, local Hub server)


def write_dense(folder: Path, layers: int = 2, hidden: int = 2048, inter: int = 8192) -> Path:
    """A llama-shaped bf16 checkpoint (~270 MB, one shard per layer) from a random pool: cheap to write."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    wmap = {}
    for layer in range(layers):
        tensors = {}
        for name, shape in shapes.items():
            n = shape[0] * shape[1]
            start = int(rng.integers(0, pool.size))
            tensors[f"model.layers.{layer}.{name}.weight"] = np.resize(np.roll(pool, -start), n).reshape(shape)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(hidden, dtype=ml_dtypes.bfloat16)
        fname = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        save_file(tensors, str(folder / fname))
        wmap.update({k: fname for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                    "num_hidden_layers": layers, "intermediate_size": inter}))
    return folder


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return write_dense(tmp_path_factory.mktemp("remote") / "dense")


def test_remote_fingerprint_equals_local_and_reads_under_half_a_percent(big, hub_server):  # noqa: F811
    srv = hub_server({"org/dense": big})
    remote = make_fingerprint("hf://org/dense")
    srv.wait_idle()
    local = make_fingerprint(str(big))
    assert remote.content_hash == local.content_hash
    for k, s in local.slots.items():
        assert np.array_equal(remote.slots[k].values, s.values)
    total = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    assert srv.bytes_sent() <= 0.005 * total, f"{100 * srv.bytes_sent() / total:.3f}% of the bytes"
    weights = [r for r in srv.ranges() if r[0].endswith(".safetensors")]
    shards = len(list(big.glob("*.safetensors")))
    # one ranged read per sampled tensor plus one header read per shard; nothing read without a Range
    assert len(weights) == len(local.slots) + shards
    assert all(r.range is not None for r in srv.requests("GET", "/resolve/"))


def test_remote_fingerprint_survives_transient_failures(big, hub_server):  # noqa: F811
    srv = hub_server({"org/dense": big})
    make_fingerprint("hf://org/dense")  # warm the header cache so the failures hit tensor reads
    srv.fail_next(2, status=503)
    fp = make_fingerprint("hf://org/dense")
    assert fp.content_hash == make_fingerprint(str(big)).content_hash


def test_remote_timeouts_give_one_line(big, hub_server, monkeypatch):  # noqa: F811
    srv = hub_server({"org/dense": big})
    make_fingerprint("hf://org/dense")
    monkeypatch.setenv("MODELTRACE_HTTP_TIMEOUT", "0.3")
    monkeypatch.setenv("MODELTRACE_HTTP_RETRIES", "2")
    srv.delay_next(100, 1.0)
    with pytest.raises(RemoteError) as exc:
        make_fingerprint("hf://org/dense")
    assert "timeout" in str(exc.value) or "cannot reach" in str(exc.value)
    assert "\n" not in str(exc.value)
