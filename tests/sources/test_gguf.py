"""GGUF reader: HF names and shapes, lazy row-range dequantization, llama Q/K unpermutation, config, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import gguf.quants as gguf_quants
import numpy as np
import pytest

from modeltrace.errors import InputError
from modeltrace.sources import open_source
from modeltrace.sources.gguf_source import GGUFSource

Q = gguf.GGMLQuantizationType

HIDDEN, HEADS, KV_HEADS, LAYERS, VOCAB, FFN = 64, 4, 2, 2, 128, 256
HEAD_DIM = HIDDEN // HEADS


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q_proj (n_head) and k_proj (n_kv_head) rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """A plain Q4_K encoder (gguf-py only decodes Q4_K): rows of 256 -> 144-byte super-blocks."""
    rows, cols = x.shape
    blocks = x.astype(np.float32).reshape(-1, 8, 32)  # super-block, sub-block, value
    lo = np.minimum(blocks.min(axis=-1), 0.0)  # (n, 8) sub-block minimum (<= 0)
    scale = (blocks.max(axis=-1) - lo) / 15.0
    mins = -lo
    d = scale.max(axis=-1) / 63.0
    dmin = mins.max(axis=-1) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    d_f, dmin_f = d16.astype(np.float32)[:, None], dmin16.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.rint(scale / d_f)), 0, 63).astype(np.uint8)
        mn = np.clip(np.nan_to_num(np.rint(mins / dmin_f)), 0, 63).astype(np.uint8)
        step = (d_f * sc)[..., None]
        q = np.nan_to_num(np.rint((blocks + (dmin_f * mn)[..., None]) / step))
    q = np.clip(q, 0, 15).astype(np.uint8)  # (n, 8, 32)
    packed = np.empty((blocks.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    out = np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return out.reshape(rows, cols // 256 * 144)


def _add_tokenizer(w: gguf.GGUFWriter) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(VOCAB - 3)] + ["<s>", "</s>", "<pad>"])
    w.add_bos_token_id(VOCAB - 3)
    w.add_eos_token_id(VOCAB - 2)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny llama GGUF (F32, F16, Q8_0, Q4_K tensors, permuted Q/K) and the HF-order originals."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(2048)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    _add_tokenizer(w)
    hf: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, x: np.ndarray, qtype=Q.F32, permute: int | None = None) -> None:
        hf[hf_name] = x
        stored = llama_permute(x, permute) if permute else x
        if qtype == Q.F32:
            w.add_tensor(gguf_name, stored.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, stored.astype(np.float16))
        elif qtype == Q.Q4_K:
            w.add_tensor(gguf_name, quantize_q4_k(stored), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name, gguf_quants.quantize(stored, qtype), raw_dtype=qtype)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)).astype(np.float32)

    put("token_embd.weight", "model.embed_tokens.weight", mat(VOCAB, HIDDEN), Q.F16)
    put("output_norm.weight", "model.norm.weight", 1 + 0.1 * mat(1, HIDDEN)[0])
    put("output.weight", "lm_head.weight", mat(VOCAB, HIDDEN), Q.Q8_0)
    for b in range(LAYERS):
        p = f"model.layers.{b}"
        q_type = Q.Q8_0 if b == 0 else Q.F32
        put(f"blk.{b}.attn_norm.weight", f"{p}.input_layernorm.weight", 1 + 0.1 * mat(1, HIDDEN)[0])
        put(f"blk.{b}.attn_q.weight", f"{p}.self_attn.q_proj.weight", mat(HIDDEN, HIDDEN), q_type, permute=HEADS)
        put(f"blk.{b}.attn_k.weight", f"{p}.self_attn.k_proj.weight", mat(KV_HEADS * HEAD_DIM, HIDDEN), q_type,
            permute=KV_HEADS)
        put(f"blk.{b}.attn_v.weight", f"{p}.self_attn.v_proj.weight", mat(KV_HEADS * HEAD_DIM, HIDDEN), Q.F16)
        put(f"blk.{b}.attn_output.weight", f"{p}.self_attn.o_proj.weight", mat(HIDDEN, HIDDEN))
        put(f"blk.{b}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight", 1 + 0.1 * mat(1, HIDDEN)[0])
        put(f"blk.{b}.ffn_gate.weight", f"{p}.mlp.gate_proj.weight", mat(FFN, HIDDEN), Q.Q8_0)
        put(f"blk.{b}.ffn_up.weight", f"{p}.mlp.up_proj.weight", mat(FFN, HIDDEN), Q.F16)
        put(f"blk.{b}.ffn_down.weight", f"{p}.mlp.down_proj.weight", mat(HIDDEN, FFN), Q.Q4_K)
    put("custom_thing.weight", "custom_thing.weight", mat(4, 8))
    put("rope_freqs.weight", "rope_freqs.weight", 1 + 0.1 * mat(1, HEAD_DIM // 2)[0])
    _finish(w)
    return path, hf


@pytest.fixture(scope="module")
def qwen3moe(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen3moe.gguf"
    experts, used, moe_ffn = 4, 2, 32
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_block_count(1)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    w.add_expert_feed_forward_length(moe_ffn)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    hf: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, x: np.ndarray) -> None:
        hf[hf_name] = x
        w.add_tensor(gguf_name, x.astype(np.float32))

    p = "model.layers.0"
    put("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal((VOCAB, HIDDEN)))
    put("blk.0.attn_q.weight", f"{p}.self_attn.q_proj.weight", rng.standard_normal((HIDDEN, HIDDEN)))
    put("blk.0.attn_q_norm.weight", f"{p}.self_attn.q_norm.weight", rng.standard_normal(HEAD_DIM))
    put("blk.0.attn_k_norm.weight", f"{p}.self_attn.k_norm.weight", rng.standard_normal(HEAD_DIM))
    put("blk.0.ffn_gate_inp.weight", f"{p}.mlp.gate.weight", rng.standard_normal((experts, HIDDEN)))
    put("blk.0.ffn_gate_exps.weight", f"{p}.mlp.experts.gate_proj", rng.standard_normal((experts, moe_ffn, HIDDEN)))
    put("blk.0.ffn_up_exps.weight", f"{p}.mlp.experts.up_proj", rng.standard_normal((experts, moe_ffn, HIDDEN)))
    put("blk.0.ffn_down_exps.weight", f"{p}.mlp.experts.down_proj", rng.standard_normal((experts, HIDDEN, moe_ffn)))
    put("output_norm.weight", "model.norm.weight", rng.standard_normal(HIDDEN))
    _finish(w)
    return path, hf


def test_llama_names_shapes_dtypes(llama):
    path, hf = llama
    src = open_source(path)
    assert isinstance(src, GGUFSource) and src.format == "gguf" and src.location == str(path)
    ts = src.tensors()
    assert set(ts) == set(hf)
    for name, x in hf.items():
        assert ts[name].shape == x.shape, name
        assert ts[name].file == path.name
    assert ts["model.embed_tokens.weight"].dtype == "F16"
    assert ts["model.norm.weight"].dtype == "F32"
    assert ts["lm_head.weight"].dtype == "Q8_0"
    assert ts["model.layers.0.mlp.down_proj.weight"].dtype == "Q4_K"
    assert ts["model.layers.0.mlp.down_proj.weight"].nbytes == HIDDEN * FFN // 256 * 144
    assert ts["lm_head.weight"].nbytes == VOCAB * HIDDEN // 32 * 34
    assert ts["model.embed_tokens.weight"].nbytes == VOCAB * HIDDEN * 2
    assert src.gguf_name("model.layers.1.self_attn.k_proj.weight") == "blk.1.attn_k.weight"
    assert "custom_thing.weight" in ts and "rope_freqs.weight" in ts  # no HF name: GGUF name kept


@pytest.mark.parametrize(
    "name, tol",
    [
        ("model.embed_tokens.weight", 2e-3),  # F16
        ("model.norm.weight", 0.0),  # F32
        ("model.layers.1.self_attn.o_proj.weight", 0.0),  # F32
        ("lm_head.weight", 0.02),  # Q8_0
        ("model.layers.0.mlp.gate_proj.weight", 0.02),
        ("model.layers.0.mlp.down_proj.weight", 0.12),  # Q4_K
    ],
)
def test_dequantized_values_close(llama, name, tol):
    path, hf = llama
    src = GGUFSource(path)
    got = src.read(name)
    x = hf[name]
    assert got.dtype == np.float32 and got.shape == x.shape
    # per-row relative error bound (block scales follow each row's magnitude)
    err = np.abs(got - x).max() / np.abs(x).max()
    assert err <= tol + 1e-7, err


def test_row_ranges_match_full_read(llama):
    path, hf = llama
    src = GGUFSource(path)
    for name, info in src.tensors().items():
        full = src.read_rows(name)
        assert full.shape == (info.rows, info.cols)
        for start, stop in [(0, 1), (3, 11), (info.rows - 5, info.rows), (7, 8), (1, info.rows)]:
            start, stop = max(0, min(start, info.rows)), max(0, min(stop, info.rows))
            if start < stop:
                np.testing.assert_array_equal(src.read_rows(name, start, stop), full[start:stop], err_msg=name)
        chunks = [c for _, c in src.iter_rows(name, chunk_bytes=info.cols * 4 * 5)]
        np.testing.assert_array_equal(np.concatenate(chunks), full)


def test_llama_qk_unpermuted(llama):
    path, hf = llama
    src = GGUFSource(path)
    for proj in ("q_proj", "k_proj"):
        name = f"model.layers.1.self_attn.{proj}.weight"  # F32: exact round trip
        np.testing.assert_array_equal(src.read(name), hf[name])
        assert not np.array_equal(src.read(name), llama_permute(hf[name], HEADS if proj == "q_proj" else KV_HEADS))
        for start, stop in [(0, 3), (5, 13), (HEAD_DIM - 1, HEAD_DIM + 2), (9, 10)]:
            np.testing.assert_array_equal(src.read_rows(name, start, stop), hf[name][start:stop])
        q8 = f"model.layers.0.self_attn.{proj}.weight"  # Q8_0, permuted before quantizing
        got = src.read(q8)
        assert np.abs(got - hf[q8]).max() / np.abs(hf[q8]).max() < 0.02
    # stored bytes in HF row order: row r of q_proj is stored row 2*j + i of its head
    name = "model.layers.1.self_attn.q_proj.weight"
    raw = np.frombuffer(src.read_raw(name, 2, 4), dtype=np.float32).reshape(2, HIDDEN)
    np.testing.assert_array_equal(raw, hf[name][2:4])


def test_reads_are_lazy(llama, monkeypatch):
    path, _ = llama
    src = GGUFSource(path)
    seen: list[tuple[int, ...]] = []
    real = gguf_quants.dequantize

    def spy(data, qtype):
        seen.append(data.shape)
        return real(data, qtype)

    monkeypatch.setattr(gguf_quants, "dequantize", spy)
    before = src.stats.bytes_read
    out = src.read_rows("lm_head.weight", 40, 42)
    assert out.shape == (2, HIDDEN)
    assert seen == [(2, HIDDEN // 32 * 34)]
    assert src.stats.bytes_read - before == 2 * HIDDEN // 32 * 34
    seen.clear()
    src.read_rows("model.layers.0.self_attn.q_proj.weight", 17, 18)  # one row -> one head at most
    assert seen and seen[0][0] <= HEAD_DIM


def test_llama_config_and_tokenizer(llama):
    path, _ = llama
    src = GGUFSource(path)
    cfg = src.config()
    assert cfg["model_type"] == "llama" and cfg["_source"] == "gguf"
    assert cfg["hidden_size"] == HIDDEN and cfg["num_hidden_layers"] == LAYERS
    assert cfg["num_attention_heads"] == HEADS and cfg["num_key_value_heads"] == KV_HEADS
    assert cfg["intermediate_size"] == FFN and cfg["vocab_size"] == VOCAB
    assert cfg["rope_theta"] == 10000.0 and cfg["tie_word_embeddings"] is False
    assert "num_experts" not in cfg
    tok = src.native_tokenizer()
    assert tok == {"type": "gpt2", "vocab_size": VOCAB, "special_tokens": {"bos": "<s>", "eos": "</s>"},
                   "chat_template": True}


def test_files_and_hash(llama):
    path, _ = llama
    src = GGUFSource(path)
    assert [(f.name, f.size) for f in src.files()] == [(path.name, path.stat().st_size)]
    assert src.file_sha256(path.name) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert src.read_file("config.json") is None and src.card_text() is None
    assert src.read_file(path.name) == path.read_bytes()
    with pytest.raises(InputError):
        src.file_sha256("other.gguf")


def test_qwen3moe_experts(qwen3moe):
    path, hf = qwen3moe
    src = GGUFSource(path)
    ts = src.tensors()
    assert set(ts) == set(hf)
    for name, x in hf.items():
        assert ts[name].shape == x.shape, name
        np.testing.assert_array_equal(src.read(name), x.astype(np.float32), err_msg=name)
    gate = "model.layers.0.mlp.experts.gate_proj"
    assert ts[gate].shape == (4, 32, HIDDEN) and ts[gate].rows == 4 * 32
    flat = hf[gate].reshape(-1, HIDDEN).astype(np.float32)
    np.testing.assert_array_equal(src.read_rows(gate, 30, 70), flat[30:70])  # across experts
    assert ts["model.layers.0.mlp.experts.down_proj"].shape == (4, HIDDEN, 32)
    # no permutation outside the llama family
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(src.read_rows(q, 0, 8), hf[q][:8].astype(np.float32))
    cfg = src.config()
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (4, 2, 32)
    assert cfg["hidden_size"] == HIDDEN and cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == VOCAB
    assert cfg["head_dim"] == HEAD_DIM and cfg["tie_word_embeddings"] is True
    tok = src.native_tokenizer()
    assert tok["vocab_size"] == VOCAB and tok["special_tokens"] == {"bos": None, "eos": None}
    assert tok["chat_template"] is False


@pytest.mark.parametrize("arch, model_type", [("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_qwen_dense_names(tmp_path, arch, model_type):
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(HIDDEN)
    w.add_head_count(HEADS)
    rng = np.random.default_rng(2)
    q = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    bias = rng.standard_normal(HIDDEN).astype(np.float32)
    names = {
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", q),
        "blk.0.attn_q.bias": ("model.layers.0.self_attn.q_proj.bias", bias),
        "blk.0.ffn_up.weight": ("model.layers.0.mlp.up_proj.weight", q[:, :32].copy()),
        "blk.0.ffn_norm.weight": ("model.layers.0.post_attention_layernorm.weight", bias),
        "output.weight": ("lm_head.weight", q),
    }
    for gname, (_, x) in names.items():
        w.add_tensor(gname, x)
    _finish(w)
    src = GGUFSource(path)
    assert set(src.tensors()) == {hf for hf, _ in names.values()}
    for hf_name, x in names.values():
        np.testing.assert_array_equal(src.read(hf_name), x)
    assert src.config()["model_type"] == model_type and src.config()["num_key_value_heads"] == HEADS
    assert src.native_tokenizer() is None


def test_unsupported_type_listed_then_refused(tmp_path):
    path = tmp_path / "q8k.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    raw = np.random.default_rng(3).integers(0, 255, size=(4, 292), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_gate.weight", raw, raw_dtype=Q.Q8_K)
    _finish(w)
    src = GGUFSource(path)
    info = src.tensors()["model.layers.0.mlp.gate_proj.weight"]
    assert info.dtype == "Q8_K" and info.shape == (4, 256)
    with pytest.raises(InputError, match=r"blk\.0\.ffn_gate\.weight.*Q8_K") as exc:
        src.read_rows("model.layers.0.mlp.gate_proj.weight", 0, 1)
    assert "\n" not in str(exc.value)


def test_truncated_and_corrupt_files(llama, tmp_path):
    path, _ = llama
    data = path.read_bytes()
    cases = {
        "empty.gguf": b"",
        "magic.gguf": data[:4],
        "header.gguf": data[:40],
        "half.gguf": data[: len(data) // 2],
        "short.gguf": data[:-100],
        "garbage.gguf": b"not a gguf file at all" * 10,
        "badcount.gguf": data[:8] + (2**62).to_bytes(8, "little") + data[16:],
    }
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(InputError) as exc:
            open_source(p)
        assert "\n" not in str(exc.value), name
