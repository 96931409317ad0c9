"""hf:// sources against a real HTTP server on 127.0.0.1 (tests/hubserver.py), never the real Hub."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hubserver import HubServer, commit_sha, serve  # noqa: E402

from modeltrace.errors import InputError, RemoteError  # noqa: E402
from modeltrace.sources import open_source, remote  # noqa: E402
from modeltrace.sources import safetensors_format as fmt  # noqa: E402
from modeltrace.sources.hub import HubStore, open_hub, parse_spec  # noqa: E402

README = "---\nlicense: apache-2.0\nbase_model: org/base\n---\n# tiny\n"


def _save_llama(path: Path, seed: int, **kw) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(cfg).save_pretrained(path, **kw)
    (path / "README.md").write_text(README)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hubmodels")
    return {
        "tiny": _save_llama(root / "tiny", 0),
        "tiny_v1": _save_llama(root / "tiny_v1", 1),
        "sharded": _save_llama(root / "sharded", 0, max_shard_size="50KB"),
    }


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Isolated environment: cache in tmp, no token, online, short timeouts, fast back-off, no telemetry."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MODELTRACE_HTTP_TIMEOUT", "5")
    monkeypatch.setenv("MODELTRACE_HTTP_RETRIES", "3")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub reads these at import time; telemetry would fetch an agent registry from its import-time
    # endpoint (huggingface.co), and a saved token would be sent to our server.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    for var in ("MODELTRACE_TIMEOUT", "MODELTRACE_DEADLINE", "MODELTRACE_BUDGET", "MODELTRACE_CONNECTIONS"):
        monkeypatch.setenv(var, "")  # recorded, so limits a test's command sets are removed after it
        monkeypatch.delenv(var)
    monkeypatch.setattr(remote, "BACKOFF_BASE", 0.01)
    remote.reset_run()
    return tmp_path


@pytest.fixture
def hub_server(hub_env, monkeypatch):
    """Factory: start a HubServer for `repos` and point HF_ENDPOINT at it."""
    with ExitStack() as stack:

        def start(repos, **kw) -> HubServer:
            srv = stack.enter_context(serve(repos, **kw))
            monkeypatch.setenv("HF_ENDPOINT", srv.url)
            return srv

        yield start


def _header_len(path: Path) -> int:
    with path.open("rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _resolve_gets(srv: HubServer) -> list:
    return srv.requests("GET", "/resolve/")


# ---- spec parsing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, want", [
    ("hf://org/tiny", ("org/tiny", "main")),
    ("hf://org/tiny@v1.0", ("org/tiny", "v1.0")),
    ("hf://gpt2", ("gpt2", "main")),
    ("hf://org/tiny@refs/pr/1", ("org/tiny", "refs/pr/1")),
    ("hf://org/tiny/", ("org/tiny", "main")),
])
def test_parse_spec(spec, want):
    assert parse_spec(spec) == want


@pytest.mark.parametrize("spec", [
    "hf://", "hf://org/tiny/extra", "hf://org/tiny@", "hf://../x", "hf://org/ti ny", "hf://org/-bad",
    "hf://org/a..b", "hf://org/tiny@a b", "hf://" + "x" * 97,
])
def test_bad_spec_is_one_line_input_error(spec, hub_env):
    with pytest.raises(InputError) as exc:
        open_hub(spec)
    assert "\n" not in str(exc.value)


# ---- listing and reading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "sharded"])
def test_lists_and_reads_like_local(models, hub_server, model):
    folder = models[model]
    hub_server({"org/tiny": folder})
    local = open_source(folder)
    remote = open_source("hf://org/tiny")
    assert remote.location == "hf://org/tiny"
    assert remote.format == "safetensors"
    assert {f.name: f.size for f in remote.files()} == {f.name: f.size for f in local.files()}
    lt, rt = local.tensors(), remote.tensors()
    assert list(rt) == list(lt)
    for name, info in lt.items():
        r = rt[name]
        assert (r.dtype, r.shape, r.file, r.offset, r.nbytes) == (info.dtype, info.shape, info.file, info.offset,
                                                                  info.nbytes)
        np.testing.assert_array_equal(remote.read_rows(name), local.read_rows(name))
    some = next(iter(lt))
    assert remote.read_raw(some, 1, 3) == local.read_raw(some, 1, 3)
    assert remote.config() == local.config() == json.loads((folder / "config.json").read_text())
    assert remote.card_text() == README
    assert remote.read_file("nope.txt") is None


def test_listing_fetches_headers_only(models, hub_server):
    folder = models["sharded"]
    srv = hub_server({"org/tiny": folder})
    src = open_hub("hf://org/tiny")
    src.stats.keep_ranges = True
    src.tensors()
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2
    index = "model.safetensors.index.json"
    index_size = (folder / index).stat().st_size
    names: dict[str, list[str]] = {}
    for tname, shard in json.loads((folder / index).read_text())["weight_map"].items():
        names.setdefault(shard, []).append(tname)
    expect, fetched = [], 0
    for s in shards:  # one request per shard: the length prefix and the header, estimated from the index
        n = min((folder / s).stat().st_size, 8 + fmt.header_estimate(names[s]))
        assert n >= 8 + _header_len(folder / s)
        expect.append((s, 0, n - 1))
        fetched += n
    assert sorted(srv.ranges()) == sorted(expect + [(index, 0, index_size - 1)])
    assert all(r.range is not None for r in _resolve_gets(srv))  # nothing fetched without a Range
    assert src.stats.bytes_read == index_size + fetched
    api = srv.requests("GET", "/api/models/")
    assert len(api) == 1 and api[0].path == "/api/models/org/tiny/revision/main" and "blobs=true" in api[0].query
    # reads are pinned to the commit the listing returned
    sha = commit_sha("org/tiny", "main")
    assert src.store.sha == sha
    assert all(f"/resolve/{sha}/" in r.path for r in _resolve_gets(srv))


def test_row_range_is_one_exact_request(models, hub_server):
    folder = models["tiny"]
    srv = hub_server({"org/tiny": folder})
    src = open_hub("hf://org/tiny")
    name = "model.layers.0.mlp.down_proj.weight"
    info = src.tensors()[name]
    assert info.shape == (64, 128) and info.dtype == "F32"
    srv.clear()
    src.stats.keep_ranges = True
    before_bytes, before_reqs = src.stats.bytes_read, src.stats.requests
    rows = src.read_rows(name, 2, 4)
    row_bytes = 128 * 4
    start = info.offset + 2 * row_bytes
    assert srv.ranges() == [("model.safetensors", start, start + 2 * row_bytes - 1)]
    srv.wait_idle()
    assert len(srv.log) == 1 and srv.log[0].status == 206 and srv.log[0].sent == 2 * row_bytes
    assert src.stats.requests - before_reqs == 1
    assert src.stats.bytes_read - before_bytes == 2 * row_bytes
    assert src.stats.ranges[-1] == ("model.safetensors", start, 2 * row_bytes)
    np.testing.assert_array_equal(rows, open_source(folder).read_rows(name, 2, 4))


def test_header_longer_than_its_estimate_costs_one_more_request(models, hub_server):
    folder = models["tiny"]
    srv = hub_server({"org/tiny": folder})
    store = HubStore("org/tiny", "main")
    hlen = _header_len(folder / "model.safetensors")
    tensors, _ = fmt.parse_header(store, "model.safetensors", ahead=100)
    assert srv.ranges() == [("model.safetensors", 0, 107), ("model.safetensors", 108, 8 + hlen - 1)]
    assert tensors.keys() == open_source(folder).tensors().keys()


def test_second_open_uses_header_cache(models, hub_server, hub_env):
    folder = models["sharded"]
    srv = hub_server({"org/tiny": folder})
    first = open_hub("hf://org/tiny")
    first.tensors()
    n_first = len(srv.ranges())
    assert n_first > 0
    assert any((hub_env / "cache" / "headers").rglob("*"))
    assert not list((hub_env / "cache" / "headers").rglob(".tmp-*"))
    srv.clear()
    second = open_hub("hf://org/tiny")
    assert list(second.tensors()) == list(first.tensors())
    assert srv.ranges() == []  # index, 8-byte prefixes and JSON headers all from the cache
    assert [r.path for r in srv.requests()] == ["/api/models/org/tiny/revision/main"]
    shards = len(list(folder.glob("*.safetensors")))
    assert n_first == shards + 1  # the index, and each header with its length prefix in one request
    assert second.stats.bytes_read == 0 and second.store.cache_hits == 2 * shards + 1
    # data reads are never cached
    name = next(iter(second.tensors()))
    second.read_rows(name, 0, 1)
    assert len(srv.ranges()) == 1


def test_hash_streams_and_is_not_cached(models, hub_server, hub_env):
    folder = models["tiny"]
    srv = hub_server({"org/tiny": folder})
    src = open_hub("hf://org/tiny")
    assert src.config() is not None
    assert src.file_sha256("model.safetensors") == open_source(folder).file_sha256("model.safetensors")
    size = (folder / "model.safetensors").stat().st_size
    assert srv.ranges("model.safetensors")[-1] == ("model.safetensors", 0, size - 1)
    cached = sum(p.stat().st_size for p in (hub_env / "cache" / "headers").rglob("*") if p.is_file())
    assert cached < 64 * 1024  # headers and small text files only, never weight data
    srv.clear()
    open_hub("hf://org/tiny").config()
    assert srv.ranges() == []  # config.json came from the cache


def test_size_from_head_when_listing_has_none(models, hub_server):
    srv = hub_server({"org/tiny": models["tiny"]})
    store = HubStore("org/tiny")
    store._files["config.json"] = None  # as from a server that gives no sizes in the listing
    assert store.size("config.json") == (models["tiny"] / "config.json").stat().st_size
    assert srv.requests("HEAD")[-1].path.endswith("/config.json")


def test_cache_is_keyed_by_commit(models, hub_server):
    srv = hub_server({"org/tiny": {"main": models["tiny"], "v1": models["tiny_v1"]}})
    open_hub("hf://org/tiny").tensors()
    srv.clear()
    v1 = open_hub("hf://org/tiny@v1")
    v1.tensors()
    assert len(srv.ranges()) == 1  # a different commit: its own header read (with its length prefix)


def test_revision(models, hub_server):
    srv = hub_server({"org/tiny": {"main": models["tiny"], "v1": models["tiny_v1"]}})
    name = "model.embed_tokens.weight"
    main = open_source("hf://org/tiny").read_rows(name, 0, 3)
    v1_src = open_source("hf://org/tiny@v1")
    assert v1_src.location == "hf://org/tiny@v1"
    v1 = v1_src.read_rows(name, 0, 3)
    np.testing.assert_array_equal(main, open_source(models["tiny"]).read_rows(name, 0, 3))
    np.testing.assert_array_equal(v1, open_source(models["tiny_v1"]).read_rows(name, 0, 3))
    assert not np.array_equal(main, v1)
    assert srv.requests("GET", "/api/models/")[-1].path == "/api/models/org/tiny/revision/v1"
    sha = commit_sha("org/tiny", "v1")
    by_sha = open_hub(f"hf://org/tiny@{sha}")
    np.testing.assert_array_equal(by_sha.read_rows(name, 0, 3), v1)


# ---- errors --------------------------------------------------------------------------------------------------
def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def test_missing_repo_revision_and_file(models, hub_server):
    srv = hub_server({"org/tiny": models["tiny"]})
    with pytest.raises(RemoteError) as exc:
        open_source("hf://org/nope")
    assert _one_line(exc) == f"hf://org/nope: repository not found (404) at {srv.url}"
    with pytest.raises(RemoteError) as exc:
        open_hub("hf://org/tiny@nope")
    assert "revision 'nope' not found (404)" in _one_line(exc)
    store = HubStore("org/tiny")
    with pytest.raises(RemoteError) as exc:
        store.read("missing.safetensors", 0, 8)
    assert "missing.safetensors" in _one_line(exc) and "404" in str(exc.value)
    with pytest.raises(InputError):
        store.size("missing.safetensors")
    with pytest.raises(InputError):  # past the end of a listed file: no request made
        store.read("config.json", 0, store.size("config.json") + 1)


def test_unreachable_endpoint_fails_fast(hub_env, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MODELTRACE_HTTP_TIMEOUT", "2")
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as exc:
        open_source("hf://org/tiny")
    assert time.monotonic() - t0 < 5
    assert _one_line(exc) == f"hf://org/tiny: cannot reach http://127.0.0.1:{port} (connection refused)"


def test_silent_server_times_out(hub_env, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)  # accepts TCP connections (kernel backlog) but never answers
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        monkeypatch.setenv("MODELTRACE_HTTP_TIMEOUT", "0.3")
        monkeypatch.setenv("MODELTRACE_HTTP_RETRIES", "2")
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as exc:
            open_hub("hf://org/tiny")
        assert time.monotonic() - t0 < 5
        assert "cannot reach" in _one_line(exc)
    finally:
        s.close()


def test_retries_transient_errors(models, hub_server):
    srv = hub_server({"org/tiny": models["tiny"]})
    srv.fail_next(2, 503)
    src = open_hub("hf://org/tiny")  # listing: two 503s, then success
    srv.fail_next(2, 429)
    assert len(src.tensors()) > 0  # first header read: two 429s, then success
    assert [r.status for r in srv.requests()][:3] == [503, 503, 200]
    srv.fail_next(3, 500)
    with pytest.raises(RemoteError) as exc:
        src.read_rows("model.norm.weight")
    assert "(500)" in _one_line(exc)


def test_token_is_sent_and_never_shown(models, hub_server, monkeypatch):
    secret = "hf_testsecret123456"
    hub_server({"org/tiny": models["tiny"]}, token=secret)
    with pytest.raises(RemoteError) as exc:
        open_hub("hf://org/tiny")
    assert "HF_TOKEN" in _one_line(exc) and "401" in str(exc.value)
    monkeypatch.setenv("HF_TOKEN", secret)
    src = open_hub("hf://org/tiny")
    assert len(src.tensors()) > 0
    assert secret not in repr(src.store.__dict__.get("location")) and secret not in src.location
    monkeypatch.setenv("HF_TOKEN", "hf_wrongtoken000")
    with pytest.raises(RemoteError) as exc:
        open_hub("hf://org/tiny")
    assert "hf_wrongtoken000" not in str(exc.value)


def test_offline_mode(models, hub_server, monkeypatch):
    srv = hub_server({"org/tiny": models["tiny"]})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RemoteError) as exc:
        open_hub("hf://org/tiny")
    assert "HF_HUB_OFFLINE" in _one_line(exc)
    assert srv.requests() == []


@pytest.fixture(scope="session")
def big_model(tmp_path_factory) -> Path:
    """One 64 MiB tensor: large enough that a whole-file download would be obvious in the server log."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("bighub")
    save_file({"w": np.zeros((8192, 2048), dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def test_server_ignoring_range_is_never_read_whole(big_model, hub_server):
    srv = hub_server({"org/big": big_model}, ignore_range=True)
    size = (big_model / "model.safetensors").stat().st_size
    src = open_hub("hf://org/big")
    # the header read (prefix and header in one request) is a small prefix: read, then the connection is dropped
    assert src.tensors()["w"].shape == (8192, 2048)
    np.testing.assert_array_equal(src.read_rows("w", 0, 2), np.zeros((2, 2048), np.float32))
    with pytest.raises(RemoteError) as exc:
        src.read_rows("w", 6000, 6001)
    assert "ignored the Range request" in _one_line(exc)
    srv.wait_idle()
    gets = _resolve_gets(srv)
    assert [r.status for r in gets] == [200] * 3
    assert all(r.sent < size // 4 for r in gets), [r.sent for r in gets]
    assert srv.bytes_sent() < size


# ---- the test server itself ----------------------------------------------------------------------------------
def test_hubserver_range_semantics(models):
    folder = models["tiny"]
    data = (folder / "config.json").read_bytes()
    with serve({"org/tiny": folder}) as srv:
        url = f"{srv.url}/org/tiny/resolve/main/config.json"

        def get(rng: str | None, method: str = "GET"):
            req = urllib.request.Request(url, method=method, headers={"Range": rng} if rng else {})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read()

        status, headers, body = get("bytes=2-9")
        assert (status, body, headers["Content-Range"]) == (206, data[2:10], f"bytes 2-9/{len(data)}")
        assert headers["X-Repo-Commit"] == commit_sha("org/tiny", "main") and headers["ETag"].startswith('"')
        assert get("bytes=-5")[2] == data[-5:]
        assert get(f"bytes=10-{len(data) + 100}")[2] == data[10:]
        assert get(None)[0:3:2] == (200, data)
        status, headers, body = get(f"bytes={len(data)}-")
        assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
        status, headers, body = get(None, "HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(data)
        assert get("bytes=0-1", "GET")[0] == 206
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{srv.url}/org/tiny/resolve/main/nope.json", timeout=5)
        assert exc.value.code == 404 and exc.value.headers["X-Error-Code"] == "EntryNotFound"
        assert [r.range for r in srv.requests("GET")][:2] == [(2, 9), (len(data) - 5, len(data) - 1)]


def test_hubserver_serves_huggingface_hub_api(models, hub_env):
    """huggingface_hub's own client understands the server (model_info and list_repo_tree)."""
    from huggingface_hub import HfApi

    with serve({"org/tiny": models["sharded"]}) as srv:
        api = HfApi(endpoint=srv.url)
        info = api.model_info("org/tiny", files_metadata=True)
        assert info.sha == commit_sha("org/tiny", "main")
        sizes = {s.rfilename: s.size for s in info.siblings}
        assert sizes["config.json"] == (models["sharded"] / "config.json").stat().st_size
        tree = {f.path: f.size for f in api.list_repo_tree("org/tiny", recursive=True)}
        assert tree == sizes
