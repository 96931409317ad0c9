"""GGUF over HTTP Range: `hf://` repositories holding GGUF files, against tests/hubserver.py on 127.0.0.1."""

from __future__ import annotations

import functools
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from modeltrace.audit import run_audit
from modeltrace.errors import InputError
from modeltrace.sources import open_source
from modeltrace.sources.gguf_remote import RemoteGGUFSource, header_end
from modeltrace.sources.hub import parse_spec, parse_spec_file
from modeltrace.verdict import decide
from tests import disguise as D
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures

CARD = "---\nlicense: apache-2.0\nbase_model: org/merge\nbase_model_relation: quantized\n---\n# merge, Q6_K\n"


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return D.wide_family(tmp_path_factory.mktemp("wide"))


@pytest.fixture(scope="module")
def repos(wide, tmp_path_factory) -> dict[str, Path]:
    """A GGUF repository of the wide merge (Q6_K, with a card), one holding two quantizations, one a split set."""
    root = tmp_path_factory.mktemp("gguf_repos")
    merge = D.load(wide["wide_merge"])
    one = root / "merge-gguf"
    D.write_gguf(merge, one / "merge-Q6_K.gguf", "Q6_K")
    (one / "README.md").write_text(CARD)
    two = root / "merge-ggufs"
    two.mkdir()
    shutil.copy(one / "merge-Q6_K.gguf", two / "merge-Q6_K.gguf")
    D.write_gguf(merge, two / "merge-Q8_0.gguf", "Q8_0")
    split = root / "merge-split"
    orig = gguf.GGUFWriter
    gguf.GGUFWriter = functools.partial(orig, split_max_tensors=8)  # type: ignore[misc]
    try:
        D.write_gguf(merge, split / "merge-Q6_K.gguf", "Q6_K")
    finally:
        gguf.GGUFWriter = orig  # type: ignore[misc]
    return {"one": one, "two": two, "split": split}


def _serve(hub_server, wide, repos):  # noqa: F811
    return hub_server({"org/merge-gguf": repos["one"], "org/merge-ggufs": repos["two"],
                       "org/merge-split": repos["split"], "org/ft1": wide["wide_ft1"], "org/ft2": wide["wide_ft2"]})


@pytest.mark.parametrize("spec, want", [
    ("hf://o/n", ("o/n", "main", None)),
    ("hf://o/n/m-Q6_K.gguf", ("o/n", "main", "m-Q6_K.gguf")),
    ("hf://o/n/q/m-Q6_K-00001-of-00002.gguf", ("o/n", "main", "q/m-Q6_K-00001-of-00002.gguf")),
    ("hf://o/n@v1/m.gguf", ("o/n", "v1", "m.gguf")),
    ("hf://o/n@refs/pr/3/m.gguf", ("o/n", "refs/pr/3", "m.gguf")),
    ("hf://o/n/m.gguf@v2", ("o/n", "v2", "m.gguf")),
])
def test_parse_spec_file(spec, want):
    assert parse_spec_file(spec) == want
    assert parse_spec(spec) == want[:2]


@pytest.mark.parametrize("spec", ["hf://o/n/../x.gguf", "hf://o/n/a b.gguf", "hf://o/n/x.bin"])
def test_bad_file_selector(spec):
    with pytest.raises(InputError):
        parse_spec_file(spec)


def test_remote_gguf_reads_like_local(hub_server, wide, repos):  # noqa: F811
    srv = _serve(hub_server, wide, repos)
    local = open_source(repos["one"] / "merge-Q6_K.gguf")
    src = open_source("hf://org/merge-gguf")
    assert isinstance(src, RemoteGGUFSource)
    assert {n: (t.dtype, t.shape) for n, t in src.tensors().items()} == \
        {n: (t.dtype, t.shape) for n, t in local.tensors().items()}
    assert "Q6_K" in {t.dtype for t in src.tensors().values()}
    assert src.config() == local.config()
    assert src.native_tokenizer() == local.native_tokenizer()
    assert "base_model_relation: quantized" in (src.card_text() or "")
    head = list(srv.requests("GET", "/resolve/"))
    assert head and all(r.range is not None for r in head)  # the header came by Range, not the whole file
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        rows = src.info(name).rows
        np.testing.assert_array_equal(src.read_rows(name, 3, rows - 2), local.read_rows(name, 3, rows - 2))
        assert src.read_raw(name, 1, 5) == local.read_raw(name, 1, 5)
    # announced reads are coalesced: one request for the rows of every tensor of a layer
    before = len(srv.requests("GET", "/resolve/"))
    reads = [(n, 0, t.rows) for n, t in src.tensors().items() if ".layers.1." in n]
    got = src.read_many(reads)
    srv.wait_idle()
    assert len(srv.requests("GET", "/resolve/")) - before <= 2
    for (n, a, b), x in zip(reads, got, strict=True):
        np.testing.assert_array_equal(x, local.read_rows(n, a, b))
    src.close()


def test_remote_gguf_audit_equals_local(hub_server, wide, repos):  # noqa: F811
    srv = _serve(hub_server, wide, repos)
    local = decide(run_audit(str(repos["one"] / "merge-Q6_K.gguf"), [str(wide["wide_ft1"]), str(wide["wide_ft2"])]))
    remote = decide(run_audit("hf://org/merge-gguf", ["hf://org/ft1", "hf://org/ft2"]))
    assert (remote["relation"], remote["method"]) == (local["relation"], local["method"]) == ("merge", "linear")
    lw = {p["model"].rsplit("_", 1)[-1]: p["weight"] for p in local["parents"]}
    rw = {p["model"].rsplit("/", 1)[-1]: p["weight"] for p in remote["parents"]}
    assert lw.keys() == rw.keys() == {"ft1", "ft2"}
    for k in lw:
        assert abs(lw[k] - rw[k]) < 1e-9
    assert abs(rw["ft1"] - 0.6) < 0.02
    # named for what it is: a quantized copy of the merge, with its recipe
    assert remote["encoding"] == {"suspect": "Q6_K"} and "a quantized copy of that merge" in remote["summary"]
    gets = [r for r in srv.requests("GET", "/resolve/") if r.path.endswith(".gguf")]
    assert gets and all(r.range is not None for r in gets)


def test_several_ggufs_need_a_choice(hub_server, wide, repos):  # noqa: F811
    _serve(hub_server, wide, repos)
    with pytest.raises(InputError) as err:
        open_source("hf://org/merge-ggufs")
    msg = str(err.value)
    assert "\n" not in msg and "merge-Q6_K.gguf" in msg and "merge-Q8_0.gguf" in msg and "name one" in msg
    for spec in ("hf://org/merge-ggufs/merge-Q8_0.gguf", "hf://org/merge-ggufs@main/merge-Q8_0.gguf"):
        src = open_source(spec)
        assert {t.dtype for t in src.tensors().values()} >= {"Q8_0"} and src.selected_file == "merge-Q8_0.gguf"
    with pytest.raises(InputError, match="no GGUF file named 'nope.gguf'"):
        open_source("hf://org/merge-ggufs/nope.gguf")


def test_split_gguf_reads_as_one(hub_server, wide, repos):  # noqa: F811
    parts = sorted(p.name for p in repos["split"].iterdir())
    assert len(parts) >= 3 and parts[0].endswith("-00001-of-" + parts[0][-10:])
    _serve(hub_server, wide, repos)
    src = open_source("hf://org/merge-split")
    one = open_source(repos["one"] / "merge-Q6_K.gguf")
    assert src.tensors().keys() == one.tensors().keys()
    assert {t.file for t in src.tensors().values()} == set(parts)
    assert src.config() == one.config()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(src.read_rows(name, 0, 7), one.read_rows(name, 0, 7))
    # naming a later part opens the whole set; a missing part is named
    assert open_source(f"hf://org/merge-split/{parts[1]}").tensors().keys() == one.tensors().keys()


def _hostile(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        del data[header_end(bytes(data), len(data)) - 40:]  # inside the tensor table
    elif kind == "magic":
        data[:4] = b"GGUX"
    elif kind == "huge-array":  # the first metadata value turned into an array of 2^60 strings
        klen = struct.unpack_from("<Q", data, 24)[0]
        at = 24 + 8 + klen
        data[at:at + 4] = struct.pack("<I", 9)
        data[at + 4:at + 16] = struct.pack("<IQ", 8, 1 << 60)
    elif kind == "past-end":  # every tensor moved far past the end of the file
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["truncated", "magic", "huge-array", "past-end"])
def test_hostile_header_is_one_line_error(hub_server, repos, tmp_path, kind):  # noqa: F811
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(repos["one"] / "merge-Q6_K.gguf", folder / "bad.gguf")
    _hostile(folder / "bad.gguf", kind)
    hub_server({"org/bad": folder})
    with pytest.raises(InputError) as err:
        open_source("hf://org/bad").tensors()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("hf://org/bad: bad.gguf") and "GGUF" in msg, msg
    assert kind not in ("truncated", "past-end") or "truncated" in msg


def test_cli_audit_of_remote_gguf(hub_server, wide, repos, monkeypatch, capsys):  # noqa: F811
    from modeltrace.cli import main

    _serve(hub_server, wide, repos)
    monkeypatch.setattr("sys.argv", ["modeltrace", "audit", "hf://org/merge-ggufs", "-c", "hf://org/ft1"])
    with pytest.raises(SystemExit) as ex:
        main()
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and "holds 2 GGUF files" in err and "\n" not in err, err
    monkeypatch.setattr("sys.argv", ["modeltrace", "audit", "hf://org/merge-ggufs/merge-Q6_K.gguf", "-c",
                                     "hf://org/ft1", "-c", "hf://org/ft2", "--json"])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, 1, None)
    out = capsys.readouterr().out
    assert '"relation": "merge"' in out and "org/merge-ggufs/merge-Q6_K.gguf" in out


def test_remote_gguf_fingerprint_equals_local(hub_server, wide, repos):  # noqa: F811
    """What `index add` and `identify` compute for a GGUF repository: the local GGUF's fingerprint, by Range."""
    from modeltrace.fingerprint import make_fingerprint

    srv = _serve(hub_server, wide, repos)
    remote = make_fingerprint("hf://org/merge-gguf")
    local = make_fingerprint(str(repos["one"] / "merge-Q6_K.gguf"))
    assert remote.slots.keys() == local.slots.keys() and len(local.slots) > 10
    for k, s in local.slots.items():
        np.testing.assert_array_equal(remote.slots[k].values, s.values)
    assert all(r.range is not None for r in srv.requests("GET", "/resolve/"))


def test_local_split_gguf_reads_as_one(repos):
    """A split set on disk opens as one model, from its folder or from any part; a missing part is one line."""
    parts = sorted(p.name for p in repos["split"].iterdir())
    one = open_source(repos["one"] / "merge-Q6_K.gguf")
    for spec in (repos["split"], repos["split"] / parts[0], repos["split"] / parts[-1]):
        src = open_source(spec)
        assert src.tensors().keys() == one.tensors().keys() and src.config() == one.config()
        np.testing.assert_array_equal(src.read_rows("model.layers.1.self_attn.k_proj.weight", 0, 7),
                                      one.read_rows("model.layers.1.self_attn.k_proj.weight", 0, 7))
        src.close()


def test_local_split_gguf_missing_part(repos, tmp_path):
    parts = sorted(p.name for p in repos["split"].iterdir())
    for p in parts[:-1]:
        shutil.copy(repos["split"] / p, tmp_path / p)
    with pytest.raises(InputError, match=f"missing {parts[-1]}") as e:
        open_source(tmp_path / parts[0])
    assert "\n" not in str(e.value)


def test_local_folder_of_several_ggufs_names_them(repos):
    with pytest.raises(InputError, match="holds 2 GGUF models") as e:
        open_source(repos["two"])
    assert "merge-Q8_0.gguf" in str(e.value) and "\n" not in str(e.value)
