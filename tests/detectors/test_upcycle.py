"""An upcycled mixture of experts (issue 11): a dense llama's MLP copied into every expert of a Mixtral of the same
shape, attention and embeddings copied, a new router, then real AdamW steps. The audit must name it upcycled from
the dense model (not "a copy of" it), say which experts are still exact copies, and find nothing against an
unrelated dense model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modeltrace.audit import run_audit
from modeltrace.verdict import decide

EXPERTS = 4


def _upcycle(dense: Path, out: Path, steps: int) -> Path:
    import json

    import torch
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = json.loads((dense / "config.json").read_text())
    mc = MixtralConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                       intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                       num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
                       num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=128,
                       tie_word_embeddings=False)
    torch.manual_seed(0)
    moe = MixtralForCausalLM(mc)
    src = load_file(str(dense / "model.safetensors"))
    sd = moe.state_dict()
    for k in sd:
        if k in src:
            sd[k] = src[k].to(sd[k].dtype)
    for layer in range(cfg["num_hidden_layers"]):
        mlp = {p: src[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}
        for k in sd:
            if k.startswith(f"model.layers.{layer}.mlp.experts."):
                if k.endswith("gate_up_proj"):
                    sd[k] = torch.cat([mlp["gate"], mlp["up"]], 0).unsqueeze(0).repeat(EXPERTS, 1, 1).to(sd[k].dtype)
                elif k.endswith("down_proj"):
                    sd[k] = mlp["down"].unsqueeze(0).repeat(EXPERTS, 1, 1).to(sd[k].dtype)
    moe.load_state_dict(sd)
    if steps:
        opt = torch.optim.AdamW(moe.parameters(), lr=3e-4)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            ids = torch.randint(0, cfg["vocab_size"], (4, 32), generator=g)
            loss = moe(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    moe.to(torch.bfloat16).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def upcycled(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upcycle")
    base = corpus.path("base_a")
    return {"copied": _upcycle(base, root / "moe_copied", steps=0),
            "trained": _upcycle(base, root / "moe_trained", steps=3)}


def test_upcycled_moe_is_named_with_its_experts(corpus, upcycled):
    v = decide(run_audit(str(upcycled["copied"]), [str(corpus.path("base_a"))]))
    assert v["relation"] == "upcycled" and v["parents"][0]["model"] == "base_a", v["summary"]
    up = v["upcycling"]
    assert up["experts"] == EXPERTS * 4 and len(up["experts_copied"]) == EXPERTS * 4
    v = decide(run_audit(str(upcycled["trained"]), [str(corpus.path("base_a"))]))
    assert v["relation"] == "upcycled" and "upcycled from base_a" in v["summary"], v["summary"]
    assert v["upcycling"]["experts_trained"] > 0


def test_upcycled_moe_against_an_unrelated_dense_model(corpus, upcycled):
    v = decide(run_audit(str(upcycled["trained"]), [str(corpus.path("base_b"))]))
    assert v["relation"] == "independent", v["summary"]
    assert np.isfinite(v["p_values"]["base_b"]["log10_p"])
