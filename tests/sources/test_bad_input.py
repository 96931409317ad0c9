"""Hostile or broken safetensors inputs fail with a one-line InputError (never a traceback, a hang or a huge
allocation), and reading never modifies the user's files."""

from __future__ import annotations

import hashlib
import json
import re
import resource
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from modeltrace.errors import InputError, RefusedError
from modeltrace.sources import open_source

INDEX = "model.safetensors.index.json"


# ---- helpers -------------------------------------------------------------------------------------------------------
def raw_file(path: Path, header: object, data: bytes = b"", hlen: int | None = None) -> Path:
    """A safetensors file from raw parts: `header` is JSON-encoded unless given as bytes."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if hlen is None else hlen) + hb + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def good_file(path: Path) -> Path:
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.float16)}, str(path))
    return path


def open_and_read(spec, **kw) -> None:
    with open_source(spec, **kw) as src:
        for name in src.tensors():
            src.read_rows(name)


def assert_input_error(spec, match: str | None = None, **kw) -> str:
    with pytest.raises(InputError) as ei:
        open_and_read(spec, **kw)
    msg = str(ei.value)
    assert msg and "\n" not in msg, repr(msg)
    if match is not None:
        assert re.search(match, msg), msg
    return msg


def test_good_file_reads(tmp_path):
    p = good_file(tmp_path / "m.safetensors")
    with open_source(p) as src:
        assert set(src.tensors()) == {"a", "b"}
        np.testing.assert_array_equal(src.read("a"), np.arange(12, dtype=np.float32).reshape(3, 4))


# ---- truncation and header length ----------------------------------------------------------------------------------
def test_truncated_in_data_section(tmp_path):
    p = good_file(tmp_path / "m.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[:-7])
    assert_input_error(p, "outside the file|truncated")


def test_truncated_inside_header(tmp_path):
    p = good_file(tmp_path / "m.safetensors")
    data = p.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    p.write_bytes(data[: 8 + hlen // 2])
    assert_input_error(p, "larger than the file")


@pytest.mark.parametrize("size", [0, 3, 7])
def test_tiny_file(tmp_path, size):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"\x01" * size)
    assert_input_error(p, "truncated")


def test_header_length_larger_than_file(tmp_path):
    p = raw_file(tmp_path / "m.safetensors", {}, hlen=5000)
    assert_input_error(p, "larger than the file")


@pytest.mark.parametrize("hlen", [100 * 1024 * 1024 + 1, 2**40, 2**64 - 1])
def test_header_length_over_limit(tmp_path, hlen):
    p = raw_file(tmp_path / "m.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 4, hlen=hlen)
    assert_input_error(p, "100 MB")


# ---- header content ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b"{not json",
    b"",
    b"\xff\xfe{}",
    b'{"a": ',
    b"[" * 200_000 + b"]" * 200_000,  # deeper than the JSON parser's recursion limit
    b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',  # int too long
])
def test_invalid_json_header(tmp_path, raw):
    p = raw_file(tmp_path / "m.safetensors", raw, b"\0" * 4)
    assert_input_error(p)


@pytest.mark.parametrize("header", [[], [1, 2], "text", 3, None])
def test_header_not_an_object(tmp_path, header):
    p = raw_file(tmp_path / "m.safetensors", header)
    assert_input_error(p, "not a JSON object")


def test_metadata_not_an_object(tmp_path):
    p = raw_file(tmp_path / "m.safetensors", {"__metadata__": [1], "a": entry("F32", [1], 0, 4)}, b"\0" * 4)
    assert_input_error(p, "__metadata__")


@pytest.mark.parametrize("value", [[1], "x", 3, None])
def test_entry_not_an_object(tmp_path, value):
    p = raw_file(tmp_path / "m.safetensors", {"a": value}, b"\0" * 4)
    assert_input_error(p, "not an object")


@pytest.mark.parametrize("offsets", [[0, 8], [4, 8], [2**63, 2**63 + 4], [-4, 0]])
def test_offsets_outside_data_section(tmp_path, offsets):
    p = raw_file(tmp_path / "m.safetensors", {"a": entry("F32", [1], *offsets)}, b"\0" * 4)
    assert_input_error(p, "outside the file")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [0.0, 4.0], ["0", "4"], [True, 4], None, "0-4", {"a": 1}])
def test_malformed_offsets(tmp_path, offsets):
    p = raw_file(tmp_path / "m.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}},
                 b"\0" * 4)
    assert_input_error(p, "data_offsets")


def test_reversed_offsets(tmp_path):
    p = raw_file(tmp_path / "m.safetensors", {"a": entry("F32", [1], 4, 0)}, b"\0" * 8)
    assert_input_error(p, "outside the file")


@pytest.mark.parametrize("shape,offsets", [([2], [0, 4]), ([1], [0, 8]), ([3, 4], [0, 40]), ([], [0, 0])])
def test_offsets_disagree_with_shape(tmp_path, shape, offsets):
    p = raw_file(tmp_path / "m.safetensors", {"a": entry("F32", shape, *offsets)}, b"\0" * 64)
    assert_input_error(p, "claims shape")


def test_overlapping_tensors(tmp_path):
    header = {"a": entry("F32", [4], 0, 16), "b": entry("F32", [2], 8, 16)}
    p = raw_file(tmp_path / "m.safetensors", header, b"\0" * 16)
    assert_input_error(p, "overlap")


def test_identical_spans_overlap(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}
    p = raw_file(tmp_path / "m.safetensors", header, b"\0" * 8)
    assert_input_error(p, "overlap")


@pytest.mark.parametrize("dtype", ["F31", "f32", "", None, 4, ["F32"], {"F32": 1}, "__metadata__"])
def test_unknown_dtype(tmp_path, dtype):
    p = raw_file(tmp_path / "m.safetensors", {"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}},
                 b"\0" * 4)
    assert_input_error(p, "dtype")


@pytest.mark.parametrize("shape", [[-1], [1, -4], [1.0], [True], [False, 4], ["4"], [None], [[1]], "4", 4, None,
                                   {"0": 1}])
def test_bad_shape_entries(tmp_path, shape):
    p = raw_file(tmp_path / "m.safetensors", {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}},
                 b"\0" * 4)
    assert_input_error(p, "shape")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


@pytest.mark.parametrize("shape", [
    [2**40, 2**40],
    [2**62, 2**62, 2**62],
    [2**64 + 1],
    [10**300] * 8,
    [10**4000] * 2000,  # a product of millions of digits, if anyone multiplied it out
    [1] * 1_000_000,  # absurd rank
])
def test_hostile_huge_shape_does_not_allocate(tmp_path, shape):
    p = raw_file(tmp_path / "m.safetensors", {"a": entry("F32", shape, 0, 8)}, b"\0" * 8)
    before = _maxrss_mb()
    t0 = time.monotonic()
    assert_input_error(p, "shape")
    assert time.monotonic() - t0 < 10
    assert _maxrss_mb() - before < 512


def test_zero_size_tensor_with_huge_dim_is_harmless(tmp_path):
    # a zero-element tensor is legal; its other dimensions must still be bounded and cheap
    p = raw_file(tmp_path / "m.safetensors", {"a": entry("F32", [0] + [10**4000] * 2000, 0, 0)})
    t0 = time.monotonic()
    assert_input_error(p, "shape")
    assert time.monotonic() - t0 < 10


def test_bad_row_range(tmp_path):
    p = good_file(tmp_path / "m.safetensors")
    with open_source(p) as src:
        with pytest.raises(InputError):
            src.read_rows("a", -1, 2)
        with pytest.raises(InputError):
            src.read_rows("a", 3, 1)
        with pytest.raises(InputError, match="no tensor named"):
            src.read_rows("nope")
        with pytest.raises(InputError):
            src.read_rows("a", 10, 20)
        assert src.read_rows("a", 1, 99).shape == (2, 4)  # stop is clamped to the end
        assert src.read_rows("a", 3).shape == (0, 4)


def test_file_shrinks_after_open(tmp_path):
    p = good_file(tmp_path / "m.safetensors")
    with open_source(p) as src:
        src.tensors()
        p.write_bytes(p.read_bytes()[:-40])
        with pytest.raises(InputError, match="truncated"):
            src.read_rows("a")


# ---- folders and index files ---------------------------------------------------------------------------------------
def shard_dir(tmp_path: Path, weight_map: dict, name: str = "model") -> Path:
    d = tmp_path / name
    d.mkdir()
    good_file(d / "model-00001-of-00001.safetensors")
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_good_index(tmp_path):
    d = shard_dir(tmp_path, {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"})
    with open_source(d) as src:
        assert set(src.tensors()) == {"a", "b"}


@pytest.mark.parametrize("target", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS"])
def test_index_points_outside(tmp_path, target):
    outside = good_file(tmp_path / "outside.safetensors")
    if target == "ABS":
        target = str(outside)
    d = shard_dir(tmp_path, {"a": target})
    assert_input_error(d, "outside the model folder")


def test_shard_symlink_outside(tmp_path):
    outside = good_file(tmp_path / "outside.safetensors")
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").symlink_to(outside)
    assert_input_error(d, "outside the model folder")


def test_index_names_missing_shard(tmp_path):
    d = shard_dir(tmp_path, {"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"})
    assert_input_error(d, "missing shard model-00002-of-00002.safetensors")


def test_index_lists_tensor_not_in_shard(tmp_path):
    d = shard_dir(tmp_path, {"a": "model-00001-of-00001.safetensors", "zzz": "model-00001-of-00001.safetensors"})
    assert_input_error(d, "zzz")


@pytest.mark.parametrize("index", ['{"weight_map": []}', '{"weight_map": {}}', "{}", "[1]", "{bad json",
                                   '{"weight_map": "model.safetensors"}'])
def test_bad_index(tmp_path, index):
    d = tmp_path / "model"
    d.mkdir()
    good_file(d / "model.safetensors")
    (d / INDEX).write_text(index)
    assert_input_error(d)


def test_directory_without_weights(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert_input_error(d, "no model weights")


def test_empty_directory(tmp_path):
    assert_input_error(tmp_path, "no model weights")


def test_nonexistent_path(tmp_path):
    assert_input_error(tmp_path / "nope", "no such file")
    assert_input_error(tmp_path / "nope.safetensors", "no such file")


def test_unknown_file_type(tmp_path):
    p = tmp_path / "weights.npz"
    p.write_bytes(b"PK\x03\x04")
    assert_input_error(p, "unknown checkpoint format")


def test_directory_with_only_pickle_is_refused(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a (legacy-style) pickle of {}
    with pytest.raises(RefusedError) as ei:
        open_source(d)
    assert "\n" not in str(ei.value) and "allow-pickle" in str(ei.value)
    with pytest.raises(RefusedError):
        open_source(d / "pytorch_model.bin")
    # allowed: read by the restricted loader, which rejects the legacy (non-zip) format in one line
    assert_input_error(d, "legacy PyTorch format", allow_pickle=True)


def test_safetensors_preferred_over_pickle(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    good_file(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with open_source(d) as src:
        assert src.format == "safetensors"


# ---- never writes --------------------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, digest)
    return out


def test_reading_never_modifies_files(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones((2, 2), dtype=np.float16)}, str(d / "model-00002-of-00002.safetensors"))
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    before = _snapshot(tmp_path)
    time.sleep(0.01)
    with open_source(d) as src:
        for name in src.tensors():
            src.read(name)
            list(src.iter_rows(name, chunk_bytes=16))
            src.read_raw(name)
        assert src.config() == {"model_type": "llama"}
        assert src.card_text().startswith("---")
        for f in src.files():
            src.file_sha256(f.name)
            src.read_file(f.name)
    with open_source(d / "model-00001-of-00002.safetensors") as src:
        src.read("a")
    # failing opens must not write either
    with pytest.raises(InputError):
        open_and_read(d / "config.json")
    assert _snapshot(tmp_path) == before
