"""GGUF of every family modeltrace names, read under the same canonical slots as the Hugging Face original.

Each tiny model (tests/tinymodels.py) is converted the way llama.cpp's convert_hf_to_gguf does it: names through
gguf's own HF->GGUF tensor map for the architecture, Q/K rows permuted for llama-arch models, GPT-2's Conv1D matrices
transposed, per-expert matrices stacked into `ffn_*_exps`, BERT's pooler dropped. The GGUF must then give the same
canonical slots with the same values as the safetensors original.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from modeltrace.align.view import open_view
from modeltrace.describe import describe
from modeltrace.sources import open_source
from tests.tinymodels import configs, make

#: tinymodels family -> GGUF architecture llama.cpp writes it as
ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "gpt2": "gpt2", "bert": "bert"}
HEADS, KV_HEADS = 4, 2
_EXPERT = re.compile(r"^(?P<pre>.*)\.(?P<kind>experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(family: str, folder: Path, out: Path) -> Path:
    arch = ARCH[family]
    member = {n: m for m, n in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(member, 2)
    tensors = load_file(str(folder / "model.safetensors"))
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS if family != "gpt2" and family != "bert" else HEADS)
    if family in ("mixtral", "qwen3_moe", "qwen2_moe"):
        w.add_expert_count(4)
        w.add_expert_used_count(2)
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, x in tensors.items():
        if name.startswith("pooler.") or name.endswith("position_ids") or name.endswith((".attn.bias",
                                                                                          ".attn.masked_bias")):
            continue  # what the converter drops
        m = _EXPERT.match(name)
        if m:
            proj = _MIXTRAL_PROJ.get(m["proj"], m["proj"])
            stacked = f"{m['pre'].replace('block_sparse_moe', 'mlp')}.experts.{proj}"
            experts.setdefault(stacked, {})[int(m["e"])] = x
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):
            x = _permute(x, HEADS)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            x = _permute(x, KV_HEADS)
        if family == "gpt2" and name.endswith(_CONV1D):
            x = np.ascontiguousarray(x.T)
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, (family, name)
        w.add_tensor(gname, np.ascontiguousarray(x, dtype=np.float32))
    for stacked, per in experts.items():
        gname = tmap.get_name(stacked)
        assert gname is not None, (family, stacked)
        w.add_tensor(gname + ".weight", np.stack([per[e] for e in sorted(per)]).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-families")
    out = {}
    for family in ARCH:
        folder, _ = make(family, root / family)
        out[family] = (folder, convert(family, folder, root / f"{family}.gguf"))
    return out


def test_every_tinymodel_family_is_covered():
    assert set(ARCH) == set(configs()) - {"qwen3_next"}  # qwen3-next: linear attention, not converted here


@pytest.mark.parametrize("family", sorted(ARCH))
def test_gguf_gives_the_originals_slots_and_values(pairs, family):
    folder, path = pairs[family]
    hf, gg = open_view(str(folder)), open_view(str(path))
    try:
        assert gg.unknown == [], gg.unknown
        assert gg.family.name == hf.family.name
        dropped = {s for s in hf.parts if s.role in ("buffer", "pooler", "pooler_bias")}
        assert set(gg.parts) == set(hf.parts) - dropped
        for slot in gg.parts:
            np.testing.assert_array_equal(gg.read(slot), hf.read(slot), err_msg=f"{family} {slot.key}")
    finally:
        hf.close()
        gg.close()


def test_gpt2_conv1d_rows_read_in_ranges(pairs):
    _, path = pairs["gpt2"]
    folder = pairs["gpt2"][0]
    hf = load_file(str(folder / "model.safetensors"))
    src = open_source(path)
    name = "transformer.h.1.attn.c_attn.weight"
    assert src.tensors()[name].shape == hf[name].shape == (32, 96)
    np.testing.assert_array_equal(src.read_rows(name, 5, 9), hf[name][5:9])
    raw = np.frombuffer(src.read_raw(name, 3, 4), dtype=np.float32)
    np.testing.assert_array_equal(raw, hf[name][3])


def test_mixtral_written_as_llama_reads_as_mixtral(pairs):
    src = open_source(pairs["mixtral"][1])
    cfg = src.config()
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert describe(src)["experts"]["routed"] == 4
