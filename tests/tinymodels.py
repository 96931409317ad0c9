"""Tiny transformers models of every family modeltrace names, saved with save_pretrained (shared by tests)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=96, max_position_embeddings=64)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)


def configs() -> dict[str, object]:
    return {
        "llama": tf.LlamaConfig(**COMMON, tie_word_embeddings=False),
        "mistral": tf.MistralConfig(**COMMON),
        "qwen2": tf.Qwen2Config(**COMMON),
        "qwen3": tf.Qwen3Config(**COMMON, head_dim=8),
        "qwen3_moe": tf.Qwen3MoeConfig(**COMMON, head_dim=8, **MOE),
        "qwen2_moe": tf.Qwen2MoeConfig(**COMMON, **MOE, shared_expert_intermediate_size=48),
        "mixtral": tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_next": tf.Qwen3NextConfig(**COMMON, head_dim=8, **MOE, shared_expert_intermediate_size=48,
                                         linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                                         linear_value_head_dim=8, full_attention_interval=2),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64),
        "bert": tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=96, max_position_embeddings=64),
    }


def make(family: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Path, int]:
    """Save a tiny model; returns (folder, the model's own parameter count)."""
    cfg = configs()[family]
    torch.manual_seed(seed)
    if family == "bert":
        model = tf.BertModel(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype)
    model.save_pretrained(folder)
    return folder, model.num_parameters()
