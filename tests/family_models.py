"""Small BERT and GPT-2 checkpoints built with numpy (random weights, norm gains and biases not at their init values)
and function-preserving disguises of them written against each family's own tensor names and layouts (BERT: post-LN,
nn.Linear [out, in]; GPT-2: pre-LN, Conv1D [in, out], fused c_attn), independent of modeltrace's role data, for the
disguise tests of the bert and gpt2 families (tests/align/test_family_disguise.py).
"""

from __future__ import annotations

import numpy as np

from tests.disguise import Model

__all__ = ["CONFIGS", "fine_tune", "linear_merge", "make", "permute_heads", "permute_mlp", "permute_residual"]

H, INNER, V, P, L, NH = 64, 256, 512, 64, 2, 4

CONFIGS = {
    "bert": {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": H, "intermediate_size": INNER,
             "num_hidden_layers": L, "num_attention_heads": NH, "vocab_size": V, "max_position_embeddings": P,
             "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": H, "n_layer": L, "n_head": NH,
             "vocab_size": V, "n_positions": P, "n_inner": INNER, "tie_word_embeddings": True},
}


def _shapes(family: str) -> dict[str, tuple[int, ...]]:
    if family == "bert":
        out = {"embeddings.word_embeddings.weight": (V, H), "embeddings.position_embeddings.weight": (P, H),
               "embeddings.token_type_embeddings.weight": (2, H), "embeddings.LayerNorm.weight": (H,),
               "embeddings.LayerNorm.bias": (H,), "pooler.dense.weight": (H, H), "pooler.dense.bias": (H,)}
        for i in range(L):
            p = f"encoder.layer.{i}."
            for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
                out |= {f"{p}{m}.weight": (H, H), f"{p}{m}.bias": (H,)}
            out |= {f"{p}intermediate.dense.weight": (INNER, H), f"{p}intermediate.dense.bias": (INNER,),
                    f"{p}output.dense.weight": (H, INNER), f"{p}output.dense.bias": (H,)}
            for n in ("attention.output.LayerNorm", "output.LayerNorm"):
                out |= {f"{p}{n}.weight": (H,), f"{p}{n}.bias": (H,)}
        return out
    out = {"transformer.wte.weight": (V, H), "transformer.wpe.weight": (P, H), "transformer.ln_f.weight": (H,),
           "transformer.ln_f.bias": (H,)}
    for i in range(L):
        p = f"transformer.h.{i}."
        out |= {f"{p}ln_1.weight": (H,), f"{p}ln_1.bias": (H,), f"{p}ln_2.weight": (H,), f"{p}ln_2.bias": (H,),
                f"{p}attn.c_attn.weight": (H, 3 * H), f"{p}attn.c_attn.bias": (3 * H,),
                f"{p}attn.c_proj.weight": (H, H), f"{p}attn.c_proj.bias": (H,),
                f"{p}mlp.c_fc.weight": (H, INNER), f"{p}mlp.c_fc.bias": (INNER,), f"{p}mlp.c_proj.weight": (INNER, H),
                f"{p}mlp.c_proj.bias": (H,)}
    return out


def make(family: str, seed: int) -> Model:
    """A random checkpoint: matrices N(0, 0.02^2), norm gains 1 + N(0, 0.1^2), biases N(0, 0.02^2)."""
    rng = np.random.default_rng(seed)
    t = {}
    for name, shape in _shapes(family).items():
        norm = "LayerNorm" in name or ".ln_" in name
        base = 1.0 if norm and name.endswith(".weight") else 0.0
        t[name] = (base + rng.normal(0, 0.1 if norm else 0.02, shape)).astype(np.float32)
    return Model(t, dict(CONFIGS[family]))


def fine_tune(m: Model, seed: int, scale: float = 0.5) -> Model:
    """Every tensor moved by `scale` times its own spread in a random direction."""
    rng = np.random.default_rng(seed)
    out = m.copy()
    for k, v in out.tensors.items():
        out.tensors[k] = (v + scale * float(v.std() or 0.02) * rng.standard_normal(v.shape)).astype(np.float32)
    return out


def linear_merge(a: Model, b: Model, wa: float) -> Model:
    out = a.copy()
    out.tensors = {k: (wa * v + (1 - wa) * b.tensors[k]).astype(np.float32) for k, v in a.tensors.items()}
    return out


def _take(v: np.ndarray, perm: np.ndarray, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(v, perm, axis=axis))


def permute_residual(m: Model, rng: np.random.Generator) -> Model:
    """One permutation of the hidden dimensions applied to every tensor that reads or writes the residual stream
    (LayerNorm statistics do not depend on the order of dimensions)."""
    out = m.copy()
    p = rng.permutation(H)
    gpt2 = m.config["model_type"] == "gpt2"
    for k, v in out.tensors.items():
        if v.ndim == 1:
            writes = not any(s in k for s in ("query", "key", "value", "intermediate", "c_attn", "c_fc", "pooler"))
            if writes and v.shape[0] == H:
                out.tensors[k] = _take(v, p, 0)
            continue
        reads = any(s in k for s in ("query", "key", "value", "intermediate", "c_attn", "c_fc", "pooler"))
        if "embeddings" in k or k.endswith(("wte.weight", "wpe.weight")):
            out.tensors[k] = _take(v, p, 1)
        elif reads:
            out.tensors[k] = _take(v, p, 0 if gpt2 else 1)  # Conv1D [in, out]; Linear [out, in]
        else:  # attention output and MLP down projections write the residual stream
            out.tensors[k] = _take(v, p, 1 if gpt2 else 0)
    return out


def permute_mlp(m: Model, rng: np.random.Generator) -> Model:
    """The MLP's hidden units permuted in every layer."""
    out = m.copy()
    t = out.tensors
    for i in range(L):
        u = rng.permutation(INNER)
        if m.config["model_type"] == "bert":
            p = f"encoder.layer.{i}."
            t[f"{p}intermediate.dense.weight"] = _take(t[f"{p}intermediate.dense.weight"], u, 0)
            t[f"{p}intermediate.dense.bias"] = _take(t[f"{p}intermediate.dense.bias"], u, 0)
            t[f"{p}output.dense.weight"] = _take(t[f"{p}output.dense.weight"], u, 1)
        else:
            p = f"transformer.h.{i}.mlp."
            t[f"{p}c_fc.weight"] = _take(t[f"{p}c_fc.weight"], u, 1)
            t[f"{p}c_fc.bias"] = _take(t[f"{p}c_fc.bias"], u, 0)
            t[f"{p}c_proj.weight"] = _take(t[f"{p}c_proj.weight"], u, 0)
    return out


def permute_heads(m: Model, rng: np.random.Generator) -> Model:
    """Attention heads permuted in every layer (BERT: q, k, v rows and the output's columns, head by head; GPT-2: the
    q, k and v column blocks of the fused c_attn and the rows of c_proj)."""
    out = m.copy()
    t = out.tensors
    hd = H // NH
    for i in range(L):
        rows = (rng.permutation(NH)[:, None] * hd + np.arange(hd)[None, :]).ravel()
        if m.config["model_type"] == "gpt2":
            p = f"transformer.h.{i}.attn."
            fused = np.concatenate([rows, H + rows, 2 * H + rows])
            t[f"{p}c_attn.weight"] = _take(t[f"{p}c_attn.weight"], fused, 1)
            t[f"{p}c_attn.bias"] = _take(t[f"{p}c_attn.bias"], fused, 0)
            t[f"{p}c_proj.weight"] = _take(t[f"{p}c_proj.weight"], rows, 0)
            continue
        p = f"encoder.layer.{i}.attention."
        for n in ("self.query", "self.key", "self.value"):
            t[f"{p}{n}.weight"] = _take(t[f"{p}{n}.weight"], rows, 0)
            t[f"{p}{n}.bias"] = _take(t[f"{p}{n}.bias"], rows, 0)
        t[f"{p}output.dense.weight"] = _take(t[f"{p}output.dense.weight"], rows, 1)
    return out
