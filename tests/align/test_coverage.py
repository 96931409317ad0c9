"""What a comparison covers, said right: unrecognised tensors counted in full, missing layers named as such, stack
summaries as ranges."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import transformers as tf

from modeltrace.align.coverage import runs, stack_summary
from modeltrace.audit import run_audit
from modeltrace.describe import describe
from modeltrace.sources import open_source
from modeltrace.verdict import decide


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mpnet") / "mpnet"
    cfg = tf.MPNetConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                         vocab_size=96, max_position_embeddings=64)
    tf.MPNetModel(cfg).save_pretrained(folder)
    return folder


def test_mpnet_tensors_all_have_roles(mpnet):
    with open_source(mpnet) as s:
        d = describe(s)
    assert d["architecture"]["family"] == "mpnet"
    assert d["unrecognized_count"] == 0


def test_unrecognised_tensors_are_counted_in_full(mpnet, tmp_path):
    # the same weights declared as BERT: attention (q, k, v, o and their norm) and the relative bias have no role
    folder = tmp_path / "as-bert"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((mpnet / "model.safetensors").read_bytes())
    cfg = json.loads((mpnet / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with open_source(folder) as s:
        d = describe(s)
    expected = 6 * 10 + 1
    assert d["unrecognized_count"] == expected > 50 and len(d["unrecognized_tensors"]) == expected
    assert "encoder.layer.0.attention.attn.q.weight" in d["unrecognized_tensors"]
    r = subprocess.run([sys.executable, "-m", "modeltrace", "inspect", str(folder)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert f"{expected} of {d['tensors']} tensors have no canonical role" in r.stdout
    assert f"(and {expected - 3} more)" in r.stdout


def test_runs_and_stack_summary():
    assert runs([9, 0, 1, 2, 3, 6, 8]) == "0-3, 6, 8-9"
    assert runs([]) == ""
    smap = [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 1, 2), (5, 1, 3), (6, 1, 4), (7, 1, 5), (8, 0, 0)]
    assert stack_summary(smap, {1: "A", 2: "B"}) == "layers 0-3 from A (0-3), 4-7 from B (2-5), 8 from A (0)"
    assert stack_summary([(0, 1, 4)], {1: "A", 2: "B"}) == "layer 0 from B (4)"


def test_stack_verdict_and_missing_layers(corpus):
    a1, b = str(corpus.path("ft_a1")), str(corpus.path("base_b"))
    v = decide(run_audit(str(corpus.path("s_stack_deep")), [a1, b]))
    assert v["relation"] == "stack"
    assert "layers 0-2 from ft_a1 (0-2), 3-5 from base_b (1-3)" in v["summary"], v["summary"]
    # against ft_a1 alone (4 layers) the suspect's layers 4 and 5 have no counterpart at all: said as such
    v = decide(run_audit(str(corpus.path("s_stack_deep")), [a1]))
    assert "layers 4-5 missing in candidate ft_a1 (it has 4 layers): 18 suspect tensors not compared with it" \
        in v["warnings"], v["warnings"]
    assert not any("shape" in w for w in v["warnings"]), v["warnings"]
