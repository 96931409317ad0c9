"""A GGUF export (F32/F16 tensors, llama.cpp's Q/K row permutation, GGUF names) has the content identity of the
safetensors model it was made from; a quantized tensor makes it another identity."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from weights import write_safetensors  # noqa: E402

from modeltrace.provenance.content import compare, content_digest  # noqa: E402
from modeltrace.sources import open_source  # noqa: E402

HIDDEN, HEADS, KV, FFN, VOCAB = 64, 4, 2, 128, 32
Q = gguf.GGMLQuantizationType


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _build(root: Path, quantize_up: bool = False) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    gpath = root / ("q.gguf" if quantize_up else "model.gguf")
    w = gguf.GGUFWriter(gpath, "llama")
    w.add_block_count(1)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_context_length(256)
    hf: dict[str, np.ndarray] = {}

    def put(gname: str, hname: str, x: np.ndarray, permute: int | None = None, raw=None) -> None:
        hf[hname] = x
        stored = _permute(x, permute) if permute else x
        if raw is not None:
            w.add_tensor(gname, gguf.quants.quantize(stored.astype(np.float32), raw), raw_dtype=raw)
        else:
            w.add_tensor(gname, stored)

    def mat(r: int, c: int, dt=np.float32) -> np.ndarray:
        return (rng.standard_normal((r, c)) * 0.02).astype(dt)

    put("token_embd.weight", "model.embed_tokens.weight", mat(VOCAB, HIDDEN, np.float16))
    put("output_norm.weight", "model.norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    put("output.weight", "lm_head.weight", mat(VOCAB, HIDDEN))
    p = "model.layers.0"
    put("blk.0.attn_norm.weight", f"{p}.input_layernorm.weight", np.ones(HIDDEN, np.float32))
    put("blk.0.attn_q.weight", f"{p}.self_attn.q_proj.weight", mat(HIDDEN, HIDDEN), permute=HEADS)
    put("blk.0.attn_k.weight", f"{p}.self_attn.k_proj.weight", mat(KV * HIDDEN // HEADS, HIDDEN), permute=KV)
    put("blk.0.attn_v.weight", f"{p}.self_attn.v_proj.weight", mat(KV * HIDDEN // HEADS, HIDDEN, np.float16))
    put("blk.0.attn_output.weight", f"{p}.self_attn.o_proj.weight", mat(HIDDEN, HIDDEN))
    put("blk.0.ffn_norm.weight", f"{p}.post_attention_layernorm.weight", np.ones(HIDDEN, np.float32))
    put("blk.0.ffn_gate.weight", f"{p}.mlp.gate_proj.weight", mat(FFN, HIDDEN))
    put("blk.0.ffn_up.weight", f"{p}.mlp.up_proj.weight", mat(FFN, HIDDEN), raw=Q.Q8_0 if quantize_up else None)
    put("blk.0.ffn_down.weight", f"{p}.mlp.down_proj.weight", mat(HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    st = write_safetensors(root / ("q" if quantize_up else "st") / "model.safetensors", sorted(hf.items()))
    return gpath, st


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-digest")
    return _build(root), _build(root, quantize_up=True)


def _digest(path: Path):
    with open_source(path) as src:
        return content_digest(src)


def test_gguf_export_has_the_safetensors_identity(built):
    (gguf_path, st_path), _ = built
    g, s = _digest(gguf_path), _digest(st_path)
    assert [t.name for t in g.tensors] == [t.name for t in s.tensors]
    assert g.model == s.model, compare(g, s).text


def test_quantized_tensor_is_another_identity(built):
    _, (q_gguf, _) = built
    (gguf_path, _), _ = built
    c = compare(_digest(q_gguf), _digest(gguf_path))
    assert c.relation == "different" and c.differing == ("model.layers.0.mlp.up_proj.weight",)
