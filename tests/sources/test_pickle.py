"""PyTorch zip checkpoints read by the restricted loader: same tensors as safetensors, and no code ever runs."""

from __future__ import annotations

import collections
import hashlib
import inspect
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from modeltrace.errors import InputError, RefusedError
from modeltrace.sources import open_source

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


# ---- helpers -------------------------------------------------------------------------------------------------------
def tiny_model(dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # make norms distinguishable from their ones-initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def save_pickle_dir(model, d: Path) -> Path:
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        model.save_pretrained(d, safe_serialization=False)
    if not (d / "pytorch_model.bin").exists():  # transformers >= 5 only writes safetensors
        d.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), d / "pytorch_model.bin")
        model.config.save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def saved(request, tmp_path_factory):
    dtype = getattr(torch, request.param)
    model = tiny_model(dtype)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "st")
    save_pickle_dir(model, root / "pt")
    return request.param, model, root


def write_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None, prefix: str = "archive",
              byteorder: bytes | None = b"little", compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


class _StorageRef:
    def __init__(self, key: str, stype, numel: int) -> None:
        self.key, self.stype, self.numel = key, stype, numel


class _FakeTensor:
    """Pickles exactly like torch's tensor reduction, with whatever metadata a test wants."""

    def __init__(self, storage: _StorageRef, offset, size, stride, state=None) -> None:
        self.storage, self.offset, self.size, self.stride, self.state = storage, offset, size, stride, state

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        if self.state is None:
            return (torch._utils._rebuild_tensor_v2, args)
        return (torch._utils._rebuild_tensor_v2, args, self.state)  # the pickle gets a BUILD opcode


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", obj.stype, obj.key, "cpu", obj.numel)
        return None


def torch_like_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def crafted(path: Path, offset=0, size=(2, 3), stride=(3, 1), numel=6, stored=6) -> Path:
    ref = _StorageRef("0", torch.FloatStorage, numel)
    pkl = torch_like_pickle({"w": _FakeTensor(ref, offset, size, stride)})
    return write_zip(path, pkl, {"0": np.arange(stored, dtype="<f4").tobytes()})


def assert_one_line_input_error(fn, match: str | None = None) -> str:
    with pytest.raises(InputError, match=match) as ei:
        fn()
    msg = str(ei.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def read_all(spec):
    with open_source(spec, allow_pickle=True) as src:
        return {n: src.read(n) for n in src.tensors()}


# ---- real checkpoints ----------------------------------------------------------------------------------------------
def test_matches_safetensors(saved):
    dtype, model, root = saved
    st_dtype = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    with open_source(root / "st") as ref, open_source(root / "pt", allow_pickle=True) as src:
        assert src.format == "pytorch"
        assert type(src).__name__ == "PickleSource"
        ref_t, got_t = ref.tensors(), src.tensors()
        assert set(ref_t) <= set(got_t)  # the pickle may also hold tied copies (lm_head.weight)
        for name, info in ref_t.items():
            g = got_t[name]
            assert (g.dtype, g.shape, g.nbytes) == (info.dtype, info.shape, info.nbytes) == (st_dtype,) + \
                (info.shape, info.nbytes)
            np.testing.assert_array_equal(src.read(name), ref.read(name))
            assert src.read_raw(name) == ref.read_raw(name)
            assert src.read_raw(name, 1, 2) == ref.read_raw(name, 1, 2)
            chunks = [c for _, c in src.iter_rows(name, chunk_bytes=64)]
            np.testing.assert_array_equal(np.concatenate(chunks), ref.read_rows(name))
        sd = model.state_dict()
        assert set(got_t) == set(sd)
        for name in got_t:
            np.testing.assert_array_equal(src.read(name), sd[name].float().numpy())
        assert src.config() == json.loads((root / "pt" / "config.json").read_text())
        names = {f.name for f in src.files()}
        assert {"pytorch_model.bin", "config.json"} <= names
        assert src.file_sha256("pytorch_model.bin") == hashlib.sha256(
            (root / "pt" / "pytorch_model.bin").read_bytes()).hexdigest()


def test_single_file(saved):
    _, model, root = saved
    path = root / "pt" / "pytorch_model.bin"
    with open_source(path, allow_pickle=True) as src:
        assert src.config() is None
        assert [f.name for f in src.files()] == ["pytorch_model.bin"]
        assert src.read_file("config.json") is None
        for name, t in model.state_dict().items():
            np.testing.assert_array_equal(src.read(name), t.float().numpy())
        info = src.info("model.embed_tokens.weight")
        assert info.file == "pytorch_model.bin"
        raw = path.read_bytes()[info.offset: info.offset + info.nbytes]  # offset is absolute in the file
        assert raw == src.read_raw("model.embed_tokens.weight")


def test_refused_without_flag(saved):
    _, _, root = saved
    with pytest.raises(RefusedError):
        open_source(root / "pt")
    with pytest.raises(RefusedError):
        open_source(root / "pt" / "pytorch_model.bin")


def test_read_file_refuses_escapes(saved):
    _, _, root = saved
    with open_source(root / "pt", allow_pickle=True) as src:
        for bad in ("../st/config.json", "/etc/passwd", str(root / "st" / "config.json")):
            assert_one_line_input_error(lambda b=bad: src.read_file(b), "outside the model folder")
            assert_one_line_input_error(lambda b=bad: src.file_sha256(b))
        assert src.read_file("nope.json") is None
        assert src.read_file("config.json") == (root / "pt" / "config.json").read_bytes()


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_nested_state_dict_unwrapped(tmp_path, wrapper):
    sd = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(4)}
    torch.save({wrapper: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    got = read_all(tmp_path / "ckpt.pt")
    assert set(got) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v.numpy())


def test_dtypes_views_and_parameters(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {
        "f64": torch.randn(3, 2, dtype=torch.float64), "f16": torch.randn(5).half(),
        "i64": torch.arange(7), "i32": torch.arange(3, dtype=torch.int32), "i8": torch.arange(-3, 3).to(torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "f8": torch.tensor([0.5, -2.0, 1.0]).to(torch.float8_e4m3fn),
        "base": base, "row": base[2], "rows": base[1:3], "param": torch.nn.Parameter(torch.randn(2, 2)),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 5), "cube": torch.randn(2, 3, 4),
    }
    torch.save(sd, tmp_path / "x.pt")
    with open_source(tmp_path / "x.pt", allow_pickle=True) as src:
        t = src.tensors()
        assert {k: t[k].dtype for k in ("f64", "f16", "i64", "i32", "i8", "u8", "bool", "f8")} == {
            "f64": "F64", "f16": "F16", "i64": "I64", "i32": "I32", "i8": "I8", "u8": "U8", "bool": "BOOL",
            "f8": "F8_E4M3"}
        for k, v in sd.items():
            np.testing.assert_array_equal(src.read(k), v.detach().float().numpy(), err_msg=k)
        assert src.read_rows("cube", 2, 5).shape == (3, 4)


def test_non_contiguous_tensor_is_refused_on_read(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"t": base.t(), "ok": base}, tmp_path / "x.pt")
    with open_source(tmp_path / "x.pt", allow_pickle=True) as src:
        assert src.tensors()["t"].shape == (4, 3)
        np.testing.assert_array_equal(src.read("ok"), base.numpy())
        assert_one_line_input_error(lambda: src.read("t"), "non-contiguous")


def test_sharded_pickles_with_index(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    a, b = {"x.weight": torch.randn(4, 4)}, {"y.weight": torch.randn(2, 3)}
    torch.save(a, d / "pytorch_model-00001-of-00002.bin")
    torch.save(b, d / "pytorch_model-00002-of-00002.bin")
    wmap = {"x.weight": "pytorch_model-00001-of-00002.bin", "y.weight": "pytorch_model-00002-of-00002.bin"}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    with open_source(d, allow_pickle=True) as src:
        t = src.tensors()
        assert {k: v.file for k, v in t.items()} == wmap
        np.testing.assert_array_equal(src.read("x.weight"), a["x.weight"].numpy())
        np.testing.assert_array_equal(src.read("y.weight"), b["y.weight"].numpy())
    wmap["x.weight"] = "../outside.bin"
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    assert_one_line_input_error(lambda: read_all(d), "outside the model folder")


def test_folder_prefers_model_weights_over_optimizer(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    sd = {"w": torch.randn(3, 3)}
    torch.save(sd, d / "pytorch_model.bin")
    torch.save({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}, d / "optimizer.pt")
    got = read_all(d)
    assert set(got) == {"w"}


def test_compressed_member_still_reads(tmp_path):
    ref = _StorageRef("0", torch.FloatStorage, 6)
    pkl = torch_like_pickle({"w": _FakeTensor(ref, 0, (2, 3), (3, 1))})
    p = write_zip(tmp_path / "c.pt", pkl, {"0": np.arange(6, dtype="<f4").tobytes()},
                  compression=zipfile.ZIP_DEFLATED)
    np.testing.assert_array_equal(read_all(p)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_crafted_zip_round_trip(tmp_path):
    np.testing.assert_array_equal(read_all(crafted(tmp_path / "ok.pt"))["w"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(read_all(crafted(tmp_path / "off.pt", offset=2, size=(4,), stride=(1,)))["w"],
                                  np.arange(2, 6, dtype=np.float32))


# ---- hostile and broken checkpoints --------------------------------------------------------------------------------
class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvilEval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def test_malicious_torch_save_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save({"w": torch.zeros(2), "evil": _Evil(f"touch {marker}")}, tmp_path / "evil.bin")
    msg = assert_one_line_input_error(lambda: read_all(tmp_path / "evil.bin"), "refuses to load global")
    assert "system" in msg
    d = tmp_path / "model"
    d.mkdir()
    torch.save({"evil": _Evil(f"touch {marker}")}, d / "pytorch_model.bin")
    assert_one_line_input_error(lambda: read_all(d), "refuses to load global")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("kind", ["system", "eval", "nested"])
def test_malicious_raw_data_pkl_is_refused(tmp_path, monkeypatch, protocol, kind):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    payload = {
        "system": _Evil(f"touch {marker}"),
        "eval": _EvilEval(f"open({str(marker)!r}, 'w').close()"),
        "nested": {"state_dict": {"w": [1, 2, {"x": _Evil(f"touch {marker}")}]}},
    }[kind]
    p = write_zip(tmp_path / "evil.pt", pickle.dumps(payload, protocol=protocol))
    assert_one_line_input_error(lambda: read_all(p), "refuses to load global")
    assert not marker.exists()


def test_other_globals_are_refused(tmp_path):
    import argparse

    for obj in (argparse.Namespace(lr=1), np.float32(1.0), torch.device("cpu"), {"f": print}, {1, 2}):
        p = write_zip(tmp_path / "g.pt", pickle.dumps(obj, protocol=2))
        assert_one_line_input_error(lambda p=p: read_all(p), "refuses to load global")


def test_build_cannot_rewrite_a_tensor(tmp_path):
    # a BUILD opcode after the tensor tries to change its shape after the loader checked it
    ref = _StorageRef("0", torch.FloatStorage, 6)
    for state in ({"shape": (2**40,)}, (None, {"shape": (2**40,)})):
        pkl = torch_like_pickle({"w": _FakeTensor(ref, 0, (2, 3), (3, 1), state=state)})
        assert b"b" in pkl.split(b"OrderedDict")[1]
        p = write_zip(tmp_path / "b.pt", pkl, {"0": np.zeros(6, dtype="<f4").tobytes()})
        assert_one_line_input_error(lambda p=p: read_all(p), "not a valid checkpoint pickle")
    # and a BUILD on the (allowed) OrderedDict changes nothing that matters
    od = collections.OrderedDict(w=_FakeTensor(ref, 0, (2, 3), (3, 1)))
    od._metadata = {"": {"version": 1}}  # as module.state_dict() sets it
    pkl = torch_like_pickle(od)
    p = write_zip(tmp_path / "od.pt", pkl, {"0": np.zeros(6, dtype="<f4").tobytes()})
    assert read_all(p)["w"].shape == (2, 3)


def test_legacy_pickle_format(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    assert_one_line_input_error(lambda: read_all(tmp_path / "old.bin"), "legacy PyTorch format not supported")
    (tmp_path / "junk.pt").write_bytes(b"hello world")
    assert_one_line_input_error(lambda: read_all(tmp_path / "junk.pt"), "legacy PyTorch format not supported")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_one_line_input_error(lambda: read_all(tmp_path / "empty.pt"))


@pytest.mark.parametrize("kw,match", [
    ({"size": (4, 3), "stride": (3, 1)}, "past the end of its storage"),
    ({"offset": 5, "size": (2,), "stride": (1,)}, "past the end of its storage"),
    ({"size": (2**40, 2**40), "stride": (2**40, 1)}, "larger than its storage"),
    ({"size": (2, -3), "stride": (3, 1)}, "invalid shape"),
    ({"size": (2, 3.0), "stride": (3, 1)}, "invalid shape"),
    ({"size": (2, 3), "stride": (3,)}, "invalid strides"),
    ({"size": (2, 3), "stride": (-3, 1)}, "invalid strides"),
    ({"offset": -1}, "storage offset"),
    ({"offset": "0"}, "storage offset"),
    ({"size": (1,) * 100, "stride": (1,) * 100}, "invalid shape"),
    ({"numel": 100}, "claims 400"),  # storage record shorter than data.pkl says
])
def test_bad_tensor_metadata(tmp_path, kw, match):
    p = crafted(tmp_path / "x.pt", **kw)
    assert_one_line_input_error(lambda: read_all(p), match)


def test_broken_archives(tmp_path):
    good = crafted(tmp_path / "good.pt")
    data = good.read_bytes()
    # truncated zip (central directory gone)
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    assert_one_line_input_error(lambda: read_all(tmp_path / "trunc.pt"))
    # storage member missing
    ref = _StorageRef("7", torch.FloatStorage, 6)
    p = write_zip(tmp_path / "miss.pt", torch_like_pickle({"w": _FakeTensor(ref, 0, (6,), (1,))}))
    assert_one_line_input_error(lambda: read_all(p), "missing")
    # storage key that tries to escape the archive prefix
    ref = _StorageRef("../../etc/passwd", torch.FloatStorage, 6)
    p = write_zip(tmp_path / "esc.pt", torch_like_pickle({"w": _FakeTensor(ref, 0, (6,), (1,))}))
    assert_one_line_input_error(lambda: read_all(p), "storage key")
    # no data.pkl, garbage data.pkl, a state dict without tensors, a non-dict
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as zf:
        zf.writestr("archive/version", b"3")
    assert_one_line_input_error(lambda: read_all(tmp_path / "nopkl.pt"), "data.pkl")
    p = write_zip(tmp_path / "garbage.pt", b"\x80\x02garbage")
    assert_one_line_input_error(lambda: read_all(p), "not a valid checkpoint pickle")
    p = write_zip(tmp_path / "notensors.pt", pickle.dumps({"epoch": 3}, protocol=2))
    assert_one_line_input_error(lambda: read_all(p), "no tensors")
    p = write_zip(tmp_path / "list.pt", pickle.dumps([1, 2], protocol=2))
    assert_one_line_input_error(lambda: read_all(p), "not a state dict")
    # big-endian and unknown byte order marks
    for mark in (b"big", b"middle"):
        ref = _StorageRef("0", torch.FloatStorage, 6)
        p = write_zip(tmp_path / "be.pt", torch_like_pickle({"w": _FakeTensor(ref, 0, (6,), (1,))}),
                      {"0": bytes(24)}, byteorder=mark)
        assert_one_line_input_error(lambda p=p: read_all(p), "byte order|big-endian")


def test_storage_data_truncated_after_open(tmp_path):
    p = crafted(tmp_path / "x.pt")
    with open_source(p, allow_pickle=True) as src:
        src.tensors()
        data = p.read_bytes()
        cut = data.index(np.arange(6, dtype="<f4").tobytes()) + 8
        p.write_bytes(data[:cut])
        assert_one_line_input_error(lambda: src.read("w"), "truncated")


def test_reading_never_modifies_files(saved):
    _, _, root = saved
    d = root / "pt"
    before = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in d.iterdir()}
    with open_source(d, allow_pickle=True) as src:
        for name in src.tensors():
            src.read(name)
        for f in src.files():
            src.file_sha256(f.name)
    after = {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in d.iterdir()}
    assert after == before


def test_torch_is_not_needed_to_load(tmp_path):
    """The loader's allow-list maps to stand-ins: torch is never imported by it."""
    import subprocess
    import sys

    p = crafted(tmp_path / "x.pt")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from modeltrace.sources import open_source\n"
            f"s = open_source({str(p)!r}, allow_pickle=True)\n"
            "print(s.read('w').sum())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "15.0"


def test_struct_of_stored_member(tmp_path):
    """TensorInfo.offset of a stored member is the absolute offset of the bytes in the zip file."""
    p = crafted(tmp_path / "x.pt")
    with open_source(p, allow_pickle=True) as src:
        info = src.info("w")
        raw = p.read_bytes()[info.offset: info.offset + info.nbytes]
        assert struct.unpack("<6f", raw) == tuple(float(i) for i in range(6))
