"""Tensor names are classified once per template (numbers as "#"): the cached answer must equal the regex's."""

from __future__ import annotations

import re

from modeltrace.architectures import Family, Rule, canonical_parts, family_names, get_family
from modeltrace.sources.base import TensorInfo

NAMES = [
    "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
    *(f"model.layers.{i}.self_attn.{p}_proj.{s}" for i in (0, 7, 12) for p in "qkvo" for s in ("weight", "bias")),
    *(f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight" for i in (0, 59) for e in (0, 3, 511)
      for p in ("gate", "up", "down")),
    *(f"model.layers.{i}.linear_attn.{p}.weight" for i in (2, 30)
      for p in ("conv1d", "conv2d", "in_proj_qkvz", "7", "8")),
    *(f"model.layers.{i}.linear_attn.{p}" for i in (1, 4) for p in ("A_log", "dt_bias")),
    *(f"transformer.h.{i}.{p}.weight" for i in (0, 5, 11) for p in ("ln_1", "ln_2", "attn.c_attn", "mlp.c_fc")),
    *(f"encoder.layer.{i}.attention.self.{p}.weight" for i in (0, 3) for p in ("query", "key", "value")),
    *(f"model.layers.{i}.block_sparse_moe.experts.{e}.w{w}.weight" for i in (0, 31) for e in (0, 7) for w in (1, 2, 3)),
    "mtp.layers.0.mlp.experts.3.up_proj.weight", "mtp.layers.1.mlp.experts.3.up_proj.weight",
    "model.layers.3.mlp.experts.gate_up_proj", "model.layers.9.mlp.experts.down_proj", "0.weight", "7.weight",
    "model.layers.x.mlp.up_proj.weight", "something.else.12.entirely",
]


def test_cached_classification_equals_the_regexes_for_every_family():
    for fname in family_names():
        fam = get_family(fname)
        for _ in range(2):  # the first pass learns the templates, the second reads them
            for name in NAMES:
                assert fam.classify(name) == fam._match(name)[0], (fname, name)


def test_a_family_whose_rules_tell_numbers_apart_is_matched_name_by_name():
    rules = (Rule(re.compile(r"^layers\.0\.mlp"), "first_mlp"), Rule(re.compile(r"^layers\.(?P<layer>\d+)\.mlp"),
                                                                    "mlp"))
    fam = Family("numbers", (), rules, frozenset())
    assert fam.classify("layers.3.mlp.weight")[0].role == "mlp"
    assert fam.classify("layers.0.mlp.weight")[0].role == "first_mlp"
    assert fam.classify("layers.5.mlp.weight")[1] == {"layer": "5"}


def test_canonical_parts_read_layer_and_expert_numbers_off_each_name():
    fam = get_family("qwen_moe")
    tensors = {n: TensorInfo(n, "BF16", (8, 4), 64, "f") for n in NAMES}
    tensors["model.layers.3.mlp.experts.gate_up_proj"] = TensorInfo("x", "BF16", (4, 16, 4), 512, "f")
    parts, unknown = canonical_parts(tensors, fam)
    keys = {s.key for s in parts}
    assert {"L59.expert_down.E511", "L0.expert_gate.E3", "L12.attn_o_bias", "L7.attn_q", "L30.linattn_conv2d",
            "L30.linattn_7", "L3.expert_up.E3"} <= keys
    assert "model.layers.x.mlp.up_proj.weight" in unknown and "something.else.12.entirely" in unknown
