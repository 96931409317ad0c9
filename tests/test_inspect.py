"""`modeltrace inspect` on tiny models of each family: counts agree with the model's own num_parameters()."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from modeltrace.describe import describe
from modeltrace.sources import open_source
from tests.tinymodels import configs, make

FAMILIES = sorted(configs())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    return {f: make(f, root / f, dtype=torch.bfloat16 if f == "qwen3_moe" else torch.float32) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_model(saved, family):
    folder, n_params = saved[family]
    with open_source(folder) as src:
        d = describe(src)
        assert src.stats.bytes_read < 200_000, "inspect must read headers and metadata only"
    assert d["parameters"] == n_params
    assert d["layers"] == 2
    cfg = configs()[family]
    assert d["vocab_size"] == 96
    assert d["hidden_size"] == 32
    assert d["architecture"]["model_type"] == cfg.model_type


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_moe_active_parameters(saved, family):
    folder, n_params = saved[family]
    with open_source(folder) as src:
        d = describe(src)
    assert d["experts"]["routed"] == 4 and d["experts"]["active"] == 2
    expert_params = sum(v.numel() for k, v in _state(folder).items() if ".experts." in k)
    assert d["active_parameters"] == n_params - expert_params + expert_params * 2 // 4


def _state(folder):
    from safetensors.torch import load_file

    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_cli_json_schema_and_card(saved, tmp_path):
    folder, n = saved["llama"]
    card = "---\nlicense: mit\nbase_model: [org/a, org/b]\nbase_model_relation: merge\n---\n"
    (folder / "README.md").write_text(card)
    r = subprocess.run([sys.executable, "-m", "modeltrace", "inspect", str(folder), "--json", "--hashes"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["subjects"][0]["description"]  # --json is the report (docs/report.schema.json)
    for key in ("architecture", "parameters", "active_parameters", "layers", "hidden_size", "experts", "vocab_size",
                "dtypes", "card"):
        assert key in d
    assert d["card"]["base_model"] == ["org/a", "org/b"]
    assert d["card"]["base_model_relation"] == "merge" and d["card"]["license"] == "mit"
    assert d["dtypes"]["F32"]["parameters"] == n
    import hashlib

    assert d["files"][0]["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_cli_human_output(saved):
    folder, _ = saved["qwen3_moe"]
    r = subprocess.run([sys.executable, "-m", "modeltrace", "inspect", str(folder)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "routed" in r.stdout and "BF16" in r.stdout


def test_sharded_checkpoint(tmp_path):
    import transformers as tf

    model = tf.LlamaForCausalLM(configs()["llama"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with open_source(tmp_path) as src:
        d = describe(src)
    assert len(d["files"]) > 1
    assert d["parameters"] == model.num_parameters()


def test_real_minilm_tokenizer_and_card():
    from modeltrace.demo import minilm_dir

    with open_source(minilm_dir()) as src:
        d = describe(src)
    assert d["parameters"] == 22_713_216
    assert d["tokenizer"]["type"] == "WordPiece" and d["tokenizer"]["vocab_size"] == 30522
    assert "[CLS]" in d["tokenizer"]["special_tokens"]
    assert d["card"]["license"] == "apache-2.0"
