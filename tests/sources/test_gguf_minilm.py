"""Real BERT GGUF files (all-MiniLM-L6-v2 converted under llama.cpp's names, F32 / F16 / Q8_0): inspect, audit
against the safetensors original, index add and identify."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from modeltrace.align.view import label_for, open_view
from modeltrace.audit import run_audit
from modeltrace.describe import describe
from modeltrace.fingerprint.core import make_fingerprint
from modeltrace.sources import open_source
from modeltrace.verdict import decide
from tests.minilm_models import bert_gguf_name, find_minilm, load_minilm, write_bert_gguf

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm-gguf")
    src = find_minilm(root)
    tensors = load_minilm(src)
    cfg = json.loads((src / "config.json").read_text())
    files = {q.name: write_bert_gguf(tensors, cfg, root / f"minilm-{q.name}.gguf", q) for q in (Q.F32, Q.F16, Q.Q8_0)}
    return src, tensors, files


def test_names_and_values_under_bert_roles(minilm):
    src, tensors, files = minilm
    hf, gg = open_view(str(src)), open_view(str(files["F32"]))
    try:
        assert gg.family.name == "bert" and gg.unknown == []
        dropped = {s for s in hf.parts if s.role in ("buffer", "pooler", "pooler_bias")}
        assert set(gg.parts) == set(hf.parts) - dropped and len(gg.parts) == 101
        for slot in gg.parts:
            np.testing.assert_array_equal(gg.read(slot), hf.read(slot), err_msg=slot.key)
    finally:
        hf.close()
        gg.close()
    with open_source(files["Q8_0"]) as q8:
        name = "encoder.layer.3.attention.self.query.weight"
        assert bert_gguf_name(name) == "blk.3.attn_q.weight" and q8.gguf_name(name) == "blk.3.attn_q.weight"
        x = tensors[name]
        err = np.abs(q8.read(name) - x).max() / np.abs(x).max()
        assert 0 < err < 0.01


def test_inspect(minilm):
    _, tensors, files = minilm
    with open_source(files["Q8_0"]) as s:
        d = describe(s)
    assert d["architecture"]["family"] == "bert" and d["architecture"]["model_type"] == "bert"
    assert d["unrecognized_count"] == 0 and d["unrecognized_tensors"] == []
    assert d["layers"] == 6 and d["hidden_size"] == 384 and d["attention_heads"] == 12
    kept = [k for k in tensors if bert_gguf_name(k)]
    assert d["parameters"] == sum(tensors[k].size for k in kept)
    assert set(d["dtypes"]) == {"F32", "Q8_0"}
    size = files["Q8_0"].stat().st_size
    assert 0 < d["bytes_read"] < size // 10  # the header, no tensor data


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_audit_gguf_against_the_original(minilm, qtype):
    src, _, files = minilm
    run = run_audit(str(files[qtype]), [str(src)])
    v = decide(run)
    assert len(run.slots) >= 95  # every matrix and vector the GGUF has (all-zero ones may be set aside)
    assert not any("not compared" in w or "shape" in w for w in v["warnings"]), v["warnings"]
    name = label_for(str(src))
    assert v["relation"] != "independent" and [p["model"] for p in v["parents"]] == [name]
    assert abs(v["parents"][0]["weight"] - 1.0) < 1e-3
    assert v["p_values"][name]["log10_p"] < -300


def test_gguf_candidate_is_not_a_different_architecture(minilm):
    src, _, files = minilm
    v = decide(run_audit(str(src), [str(files["F16"])]))
    assert v["relation"] != "independent" and v["parents"][0]["model"] == "minilm-F16.gguf"
    told = [w for w in v["warnings"] if "not compared" in w]
    assert told == ["minilm-F16.gguf has no pooler, pooler_bias tensors: 2 suspect tensors not compared with it"]


def test_index_add_and_identify(minilm, tmp_path):
    src, _, files = minilm
    fp = make_fingerprint(str(files["Q8_0"]))
    assert fp.model["family"] == "bert" and fp.model["layers"] == 6
    index = tmp_path / "index.sqlite"
    cli = [sys.executable, "-m", "modeltrace"]
    r = subprocess.run([*cli, "index", "add", str(src), "--name", "minilm", "--index", str(index)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "index", "add", str(files["Q8_0"]), "--index", str(index)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "no tensors with a canonical role" not in r.stderr, r.stderr
    r = subprocess.run([*cli, "identify", str(files["F16"]), "--index", str(index), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["relation"] == "recast" and res["parents"][0]["model"] == "minilm", res["summary"]
    roles = {h["model"]: h["role"] for h in res["hits"]}
    assert roles == {"minilm": "copy", "minilm-Q8_0.gguf": "copy"}, res["hits"]
