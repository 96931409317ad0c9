"""No credential leaks through a side door: an OpenAI-compatible endpoint on 127.0.0.1 that echoes the API key in
every field it controls (model id, answer, finish_reason, error bodies cut at 300 characters, malformed bodies), an
endpoint URL with ?api-key=, HF_ENDPOINT with userinfo and a served model card that carries HF_TOKEN. Every output
format, stdout, stderr and the index are searched for the secret and for each of its halves."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from modeltrace import redact
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures (isolated env, local Hub server)

KEY = "sk-proj-7c1e55a0d93b4f26a8e0b1c4d2f6e9a3"  # 40 characters
HF_KEY = "hf_Zq8rT3vWx1yB6nM4kL9pJ2hG5fD7sA0"
FORMATS = ("json", "md", "html", "cyclonedx", "spdx")


def pieces(secret: str) -> list[str]:
    """The secret, its halves, and a 12-character piece from its middle."""
    n = len(secret)
    return [secret, secret[: n // 2], secret[n // 2:], secret[n // 2 - 6: n // 2 + 6]]


def assert_clean(where: str, text: str | bytes, secrets=(KEY,)) -> None:
    data = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    for s in secrets:
        for p in pieces(s):
            assert p not in data, f"{where} holds {p!r}"


class Echo(BaseHTTPRequestHandler):
    """Answers each question in a way that sends the key back."""

    seen: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send(200, json.dumps({"object": "list", "data": [{"id": f"echo-{KEY}"}]}))

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.seen["n"] += 1
            n = self.seen["n"]
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        kind = n % 4
        if kind == 1:  # the answer, the finish reason and the model field
            self._send(200, json.dumps({"model": body["model"], "choices": [{"index": 0, "finish_reason": key,
                                        "message": {"role": "assistant", "content": f"I am Nex. Key: {key}"}}]}))
        elif kind == 2:  # an error body that the 300-character cut would split in the middle of the key
            self._send(404, json.dumps({"error": "x" * (286 - len('HTTP 404: {"error": "')) + key}))
        elif kind == 3:  # a body that is not a completion, key near the 120-character snippet cut
            self._send(200, "{" + "y" * 96 + key)
        else:
            self._send(200, json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"Authorization: Bearer {key}; url http://u:{key}@h/?key={key}"}}]}))


@pytest.fixture()
def echo_server():
    Echo.seen = Counter()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _cli(*args: str, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MT_SECRET_KEY": KEY, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "modeltrace", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def test_scrub_removes_whole_keys_pieces_and_url_credentials():
    redact.register(KEY)
    n = len(KEY)
    assert redact.scrub(f"a {KEY} b") == "a *** b"
    assert redact.scrub(f"cut: {KEY[:n // 2]}") == "cut: ***"
    assert redact.scrub(f"wrapped {KEY[:15]}\n{KEY[15:]} x") == "wrapped ***\n*** x"
    assert redact.scrub(f"{KEY[3:11]}") == "***"  # any 8 characters of it
    assert redact.scrub(f"{KEY[3:10]}") == KEY[3:10]  # 7 are not a secret
    assert redact.scrub("http://user:pa55@host:9/x?api-key=abc&api_version=2") == \
        "http://***@host:9/x?api-key=***&api_version=2"
    assert redact.scrub("Authorization: Bearer abcdefghijklmnopqrst") == "Authorization: Bearer ***"
    assert redact.scrub("hf://org/model@main, hf://gpt2@v1 and sent as a bearer token") == \
        "hf://org/model@main, hf://gpt2@v1 and sent as a bearer token"  # model specs and prose stay
    assert redact.scrub_obj({KEY: [KEY, 1]}) == {"***": ["***", 1]}


def test_echoing_endpoint_leaks_nothing_in_any_format(echo_server, tmp_path):
    url = f"{echo_server}?api-key={KEY}"  # MODEL as a URL: the model id comes from /models
    common = ("probe", "identity", url, "--api-key-env", "MT_SECRET_KEY", "-l", "en", "--questions", "8",
              "--retries", "0", "--no-system-prompt")
    r = _cli(*common)  # the terminal summary
    assert r.returncode == 0, r.stderr
    assert_clean("terminal stdout", r.stdout)
    assert_clean("terminal stderr", r.stderr)
    assert "IDENTITY  echo-***  (endpoint, http://127.0.0.1:" in r.stdout
    out = tmp_path / "report.html"
    r = _cli(*common, "--format", "html", "-o", out)  # a file, with the terminal summary
    assert r.returncode == 0, r.stderr
    assert_clean("html run's stdout and stderr", r.stdout + r.stderr)
    assert_clean("html report", out.read_bytes())
    r = _cli(*common, "--format", "json")  # on stdout
    assert r.returncode == 0, r.stderr
    assert_clean("json on stdout", r.stdout + r.stderr)
    (tmp_path / "report.json").write_text(r.stdout)
    from modeltrace.report import formats
    from modeltrace.report.model import load_report

    report = load_report(tmp_path / "report.json")
    for fmt in FORMATS:
        assert_clean(f"{fmt} rendering", formats.render(report, fmt))
    # whatever field a credential reaches, no format lets it out
    tainted = report.model_copy(deep=True)
    tainted.subjects[0].name = f"model {KEY}"
    tainted.argv = [f"--endpoint=http://u:{KEY}@h/v1", KEY[:20]]
    tainted.subjects[0].probes[0].note = f"cut: {KEY[20:]}"
    for fmt in FORMATS:
        text = formats.render(tainted, fmt)
        assert_clean(f"{fmt} of a tainted report", text)
        assert "***" in text
    doc = json.loads((tmp_path / "report.json").read_text())
    answers = doc["subjects"][0]["probes"][0]["answers"]
    text = json.dumps(answers)
    # the run really saw the key in every field: each came back masked
    assert "I am Nex. Key: ***" in text and '"finish_reason": "***"' in text
    assert "HTTP 404" in text and "not an OpenAI chat completion" in text
    assert f"{echo_server}?api-key=***" in doc["argv"]


def test_hf_endpoint_userinfo_and_token_stay_out_of_errors_and_the_index(corpus, tmp_path, hub_server):  # noqa: F811
    served = tmp_path / "served"
    served.mkdir()
    for f in corpus.path("ft_a1").iterdir():
        if f.is_file() and f.name != "corpus_meta.json":
            (served / f.name).write_bytes(f.read_bytes())
    (served / "README.md").write_text(f"---\nlicense: {HF_KEY}\nbase_model: org/{HF_KEY}\n---\n# echo\n")
    srv = hub_server({"org/echo": served})
    index = tmp_path / "ix.sqlite"
    env = {"HF_TOKEN": HF_KEY, "HF_ENDPOINT": srv.url, "MODELTRACE_INDEX": str(index)}
    r = _cli("index", "add", "hf://org/echo", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert_clean("index add output", r.stdout + r.stderr, (HF_KEY,))
    assert_clean("the index file", index.read_bytes(), (HF_KEY,))
    db = sqlite3.connect(str(index))
    blob = db.execute("SELECT fingerprint FROM models").fetchone()[0]
    db.close()
    assert b'"license":"***"' in blob  # the card's licence field was the token: stored masked
    r = _cli("identify", "hf://org/echo", "--json", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert_clean("identify output", r.stdout + r.stderr, (HF_KEY,))
    # credentials inside HF_ENDPOINT: the error line names the server without them
    bad = srv.url.replace("http://", f"http://admin:{KEY}@").replace(srv.url.rsplit(":", 1)[1], "1")
    r = _cli("inspect", "hf://org/echo", env_extra={**env, "HF_ENDPOINT": bad, "MODELTRACE_HTTP_RETRIES": "0"})
    assert r.returncode == 2 and r.stderr.startswith("modeltrace: error:"), r.stderr
    assert_clean("HF_ENDPOINT error", r.stdout + r.stderr, (KEY, HF_KEY))
    assert "admin" not in r.stderr
