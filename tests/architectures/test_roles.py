"""Every tensor of every supported family gets a canonical role; fused experts split into per-expert parts."""

from __future__ import annotations

import pytest

from modeltrace.align.view import open_view
from modeltrace.architectures import Slot
from tests.tinymodels import configs, make

FAMILIES = sorted(configs())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    return {f: make(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_has_a_role(saved, family):
    view = open_view(str(saved[family][0]))
    assert view.unknown == [], f"{family}: unrecognised {view.unknown[:5]}"
    roles = {s.role for s in view.parts}
    assert "embed" in roles
    assert {s.layer for s in view.parts if s.layer >= 0} == {0, 1}
    assert roles & {"attn_q", "attn_qkv", "linattn_in_proj_qkvz", "linattn_in_proj_qkv"}
    assert roles & {"mlp_up", "expert_up"}


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "qwen3_next"])
def test_experts_are_split_per_expert(saved, family):
    view = open_view(str(saved[family][0]))
    for e in range(4):
        for role in ("expert_gate", "expert_up", "expert_down"):
            assert Slot(role, 0, e) in view.parts, (family, role, e)
    gate = view.parts[Slot("expert_gate", 0, 1)]
    up = view.parts[Slot("expert_up", 0, 1)]
    assert gate.rows == up.rows
    # Reading the canonical part returns exactly that expert's rows.
    assert view.read(Slot("expert_gate", 0, 1)).shape == (gate.rows, gate.cols)


def test_router_and_shared_expert(saved):
    view = open_view(str(saved["qwen2_moe"][0]))
    roles = {s.role for s in view.parts}
    assert {"router", "shared_gate", "shared_up", "shared_down", "shared_expert_gate"} <= roles


def test_fused_and_per_expert_layouts_compare_part_by_part(tmp_path):
    """The same experts written fused ([E, 2I, H]) and per expert map to identical canonical parts."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    E, inter, H = 3, 5, 4
    gate, up, down = rng.normal(size=(E, inter, H)), rng.normal(size=(E, inter, H)), rng.normal(size=(E, H, inter))
    fused = {"model.layers.0.mlp.experts.gate_up_proj": np.concatenate([gate, up], axis=1).astype(np.float32),
             "model.layers.0.mlp.experts.down_proj": down.astype(np.float32)}
    per = {}
    for e in range(E):
        per[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] = gate[e].astype(np.float32)
        per[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = up[e].astype(np.float32)
        per[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = down[e].astype(np.float32)
    for name, t in (("fused", fused), ("per", per)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    a, b = open_view(str(tmp_path / "fused")), open_view(str(tmp_path / "per"))
    assert set(a.parts) == set(b.parts)
    for slot in a.parts:
        np.testing.assert_array_equal(a.read(slot), b.read(slot))
