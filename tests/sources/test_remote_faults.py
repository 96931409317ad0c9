"""Remote reads against a misbehaving Hub stand-in on 127.0.0.1 (issue 13): files that change while read, servers
that trickle, ranges that always fail, budgets. Every case asserts the exact outcome: a one-line error, exit 2,
bounded time, and never a result."""

from __future__ import annotations

import hashlib
import json
import time

import httpx2
import pytest

from modeltrace.errors import InputError, RemoteError
from modeltrace.sources import open_source, remote
from modeltrace.sources.base import ReadStats
from modeltrace.sources.hub import open_hub
from modeltrace.sources.safetensors_format import HEADER_AHEAD
from tests.report.report_helpers import cli
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures (isolated env, local Hub server)

WEIGHTS = "model.safetensors"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modeltrace: error: ")
    return lines[0]


# ---- a file that changes while it is read --------------------------------------------------------------------
def test_changed_file_is_an_error_naming_it(corpus, hub_server):  # noqa: F811
    a1, a2 = corpus.path("ft_a1"), corpus.path("ft_a2")
    srv = hub_server({"org/m": a1})
    src = open_hub("hf://org/m")
    name = "model.layers.0.mlp.down_proj.weight"
    before = src.read_rows(name, 0, 2)
    assert before.shape[0] == 2
    srv.swap_after(0, "org/m", a2)  # same commit, other bytes from the next read on
    with pytest.raises(RemoteError) as exc:
        src.read_rows(name, 2, 4)
    assert _one_line(exc) == (f"hf://org/m: {WEIGHTS} changed while being read (ETag {_sha(a2 / WEIGHTS)[:16]}, "
                              f"expected {_sha(a1 / WEIGHTS)[:16]}); re-run")


def test_audit_of_a_model_that_changes_midway_gives_no_verdict(corpus, hub_server):  # noqa: F811
    """The issue's case: an independent model whose server starts serving the merge after 20 reads."""
    srv = hub_server({"org/x": corpus.path("indep_00"), "org/a1": corpus.path("ft_a1"),
                      "org/a2": corpus.path("ft_a2")})
    srv.swap_after(20, "org/x", corpus.path("m_linear_rio"))
    res = cli("audit", "hf://org/x", "-c", "hf://org/a1", "-c", "hf://org/a2", "--json")
    assert res.exit_code == 2
    assert res.stdout.strip() == ""
    line = _error_line(res)
    assert line == (f"modeltrace: error: hf://org/x: {WEIGHTS} changed while being read (ETag "
                    f"{_sha(corpus.path('m_linear_rio') / WEIGHTS)[:16]}, expected "
                    f"{_sha(corpus.path('indep_00') / WEIGHTS)[:16]}); re-run")


def test_index_add_of_a_model_that_changes_midway_stores_nothing(corpus, hub_server, tmp_path):  # noqa: F811
    srv = hub_server({"org/x": corpus.path("ft_a1")})
    srv.swap_after(6, "org/x", corpus.path("ft_a2"))
    index = tmp_path / "ix.sqlite"
    res = cli("index", "add", "hf://org/x", "--index", index, "--workers", "1")
    assert res.exit_code == 2
    assert "changed while being read" in res.stderr and "re-run" in res.stderr
    listed = cli("index", "list", "--index", index, "--json")
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []


def _response(status: int, headers: dict[str, str]) -> httpx2.Response:
    return httpx2.Response(status, headers=headers, request=httpx2.Request("GET", "http://127.0.0.1/x"))


def test_every_answer_is_compared_with_the_listing():
    commit = "a" * 40
    pinned = remote.PinnedFiles("hf://org/m", "http://127.0.0.1", "main", commit, lambda n: n, {},
                                {"w.safetensors": 100, "config.json": 10}, {"w.safetensors": "b" * 64}, ReadStats())
    ok = {"X-Repo-Commit": commit, "ETag": f'"{"b" * 64}"', "Content-Range": "bytes 0-9/100"}
    pinned.check("w.safetensors", _response(206, ok))
    cases = [
        ({**ok, "X-Repo-Commit": "c" * 40}, f"served from commit {'c' * 12}, pinned {'a' * 12}"),
        ({**ok, "ETag": f'W/"{"d" * 64}"'}, f"ETag {'d' * 16}, expected {'b' * 16}"),
        ({**ok, "Content-Range": "bytes 0-9/101"}, "101 bytes, the listing said 100"),
    ]
    for headers, why in cases:
        with pytest.raises(RemoteError) as exc:
            pinned.check("w.safetensors", _response(206, headers))
        assert str(exc.value) == f"hf://org/m: w.safetensors changed while being read ({why}); re-run"
    # a file the listing gave no ETag for is pinned to the first one seen
    pinned.check("config.json", _response(206, {"ETag": '"e1"', "Content-Range": "bytes 0-1/10"}))
    with pytest.raises(RemoteError, match=r"config.json changed while being read \(ETag e2, expected e1\)"):
        pinned.check("config.json", _response(206, {"ETag": '"e2"', "Content-Range": "bytes 0-1/10"}))
    # after a redirect, the Hub's first answer carries the content id; the CDN's own ETag is not compared
    hub = _response(302, {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{"b" * 64}"'})
    cdn = _response(206, {"ETag": '"s3-etag-123"', "Content-Range": "bytes 0-9/100"})
    cdn.history = [hub]
    pinned.check("w.safetensors", cdn)


def test_listing_without_a_commit_is_refused(corpus, hub_server, monkeypatch):  # noqa: F811
    from huggingface_hub import HfApi

    hub_server({"org/m": corpus.path("ft_a1")})
    real = HfApi.model_info

    def no_sha(self, *a, **kw):
        info = real(self, *a, **kw)
        info.sha = None
        return info

    monkeypatch.setattr(HfApi, "model_info", no_sha)
    with pytest.raises(RemoteError) as exc:
        open_hub("hf://org/m")
    assert _one_line(exc).endswith("did not resolve revision 'main' to a commit; refusing to read files that could "
                                   "change under us")


# ---- deadlines -----------------------------------------------------------------------------------------------
def test_trickling_server_cannot_stretch_a_request(corpus, hub_server, monkeypatch):  # noqa: F811
    srv = hub_server({"org/m": corpus.path("ft_a1")})
    monkeypatch.setenv("MODELTRACE_HTTP_TIMEOUT", "1.5")
    monkeypatch.setenv("MODELTRACE_HTTP_RETRIES", "1")
    src = open_hub("hf://org/m")  # the listing is not trickled
    srv.trickle(1.0)  # one byte a second: every read returns within the read timeout
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as exc:
        src.tensors()  # the 8-byte header length alone would take 8 s
    assert time.monotonic() - t0 < 5
    end = 8 + HEADER_AHEAD - 1  # the header is asked for with its length prefix
    assert _one_line(exc) == (f"hf://org/m: reading {WEIGHTS} bytes 0-{end}: {srv.url} sent too slowly (no "
                              f"complete answer within {1.5 + (end + 1) / remote.MIN_RATE:.3g} s, 1 attempts)")


def test_trickled_listing_is_cut(corpus, hub_server, monkeypatch):  # noqa: F811
    srv = hub_server({"org/m": corpus.path("ft_a1")})
    monkeypatch.setenv("MODELTRACE_HTTP_TIMEOUT", "1")
    monkeypatch.setenv("MODELTRACE_HTTP_RETRIES", "1")
    srv.trickle(1.0, api=True)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as exc:
        open_hub("hf://org/m")
    assert time.monotonic() - t0 < 5
    assert _one_line(exc) == f"hf://org/m: cannot reach {srv.url} (no answer before the timeout)"


def test_run_budget_stops_back_off(corpus, hub_server, monkeypatch):  # noqa: F811
    srv = hub_server({"org/m": corpus.path("ft_a1")})
    src = open_hub("hf://org/m")
    src.tensors()
    monkeypatch.setattr(remote, "BACKOFF_BASE", 0.4)
    monkeypatch.setenv("MODELTRACE_HTTP_RETRIES", "20")  # ~3 minutes of back-off without a deadline
    remote.configure(timeout=1.5)
    srv.fail_next(10**6, 503)  # every range fails
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as exc:
        src.read_rows("model.norm.weight")
    assert time.monotonic() - t0 < 3
    assert _one_line(exc).startswith("hf://org/m: the run's time budget (1.5 s, --timeout) ran out while reading "
                                     f"{WEIGHTS} bytes ")


def test_cli_timeout_and_failing_ranges_exit_2_in_time(corpus, hub_server, monkeypatch):  # noqa: F811
    srv = hub_server({"org/m": corpus.path("ft_a1"), "org/a1": corpus.path("ft_a1")})
    monkeypatch.setattr(remote, "BACKOFF_BASE", 0.4)
    monkeypatch.setenv("MODELTRACE_HTTP_RETRIES", "20")
    srv.fail_next(10**6, 503)
    t0 = time.monotonic()
    res = cli("inspect", "hf://org/m", "--timeout", "1.5")
    assert time.monotonic() - t0 < 4
    assert res.exit_code == 2
    assert _error_line(res) == ("modeltrace: error: hf://org/m: the run's time budget (1.5 s, --timeout) ran out "
                                "while listing files")
    res = cli("audit", "hf://org/m", "-c", "hf://org/a1", "--timeout", "0")
    assert res.exit_code == 2 and "--timeout must be a positive number of seconds" in res.stderr


def test_bad_limits_are_one_line_input_errors(monkeypatch, hub_env):  # noqa: F811
    for var, value in [("MODELTRACE_TIMEOUT", "soon"), ("MODELTRACE_CONNECTIONS", "1.5"),
                       ("MODELTRACE_BUDGET", "-3")]:
        monkeypatch.setenv(var, value)
        with pytest.raises(InputError) as exc:
            remote.settings()
        assert _one_line(exc).startswith(f"{var}={value!r}: expected")
        monkeypatch.delenv(var)
    with pytest.raises(InputError, match="expected a number of bytes"):
        remote.parse_bytes("lots")
    assert remote.parse_bytes("4G") == 4 * 10**9 and remote.parse_bytes("1.5GiB") == 3 * 2**29
    res = cli("inspect", "hf://org/m", "--connections", "0")
    assert res.exit_code == 2


# ---- the byte budget -----------------------------------------------------------------------------------------
def test_byte_budget_is_never_exceeded(corpus, hub_server):  # noqa: F811
    srv = hub_server({"org/m": corpus.path("ft_a1")})
    src = open_hub("hf://org/m")
    src.tensors()
    srv.clear()
    remote.configure(budget=20_000)
    info = src.tensors()["model.embed_tokens.weight"]
    row = info.nbytes // info.rows
    src.read_rows(info.name, 0, 10_000 // row)
    with pytest.raises(RemoteError) as exc:
        src.read_rows(info.name, 0, 12_000 // row)
    assert "would pass the byte budget of 20000 (--budget;" in _one_line(exc)
    srv.wait_idle()
    assert srv.bytes_sent() <= 20_000


def test_audit_budget_chooses_the_sample_and_keeps_the_verdict(corpus, hub_server):  # noqa: F811
    hub_server({"org/rio": corpus.path("m_linear_rio"), "org/a1": corpus.path("ft_a1"),
                "org/a2": corpus.path("ft_a2")})
    full = sum((corpus.path(m) / WEIGHTS).stat().st_size for m in ("m_linear_rio", "ft_a1", "ft_a2"))
    budget = full // 4
    res = cli("audit", "hf://org/rio", "-c", "hf://org/a1", "-c", "hf://org/a2", "--budget", str(budget), "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    text = json.dumps(doc)
    assert '"relation": "merge"' in text and '"method": "linear"' in text
    assert 0 < remote.spent_bytes() <= budget
    assert open_source(str(corpus.path("ft_a1"))).stats.bytes_read == 0  # local sources are not budgeted


def test_limits_set_by_a_command_do_not_outlive_its_test(hub_env):  # noqa: F811
    import os

    for var in ("MODELTRACE_TIMEOUT", "MODELTRACE_DEADLINE", "MODELTRACE_BUDGET"):
        assert var not in os.environ  # the commands of the tests above set them through configure()
