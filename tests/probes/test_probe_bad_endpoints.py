"""Endpoints and models that misbehave: time-outs, 5xx, 429, malformed JSON, refusals, empty answers, other scripts.

A small local HTTP server (127.0.0.1, bounded, stops with the test) answers each English identity question in one
bad way; the run must complete, count each failure mode apart, say so, and never print the API key.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modeltrace.probes.bank import select_questions

KEY = "sk-test-5f1c9a7e2b"
QUESTIONS = {q.text: q.id for q in select_questions(["en"], 16)}
NEX = "I am Nex, made by Nex-AGI."

# question id -> behaviour
PLAN = {
    "en-01": "ok", "en-02": "http_500", "en-03": "429_once", "en-04": "429_always", "en-05": "bad_json",
    "en-06": "slow", "en-07": "empty", "en-08": "refusal", "en-09": "cyrillic", "en-10": "echo_key",
    "en-11": "refusal_field", "en-12": "portuguese", "en-13": "no_choices", "en-14": "http_400", "en-15": "qwen",
    "en-16": "chinese",
}


class Handler(BaseHTTPRequestHandler):
    seen: Counter = Counter()
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes | str, headers: dict | None = None) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _completion(self, content, refusal=None) -> None:
        msg = {"role": "assistant", "content": content}
        if refusal:
            msg["refusal"] = refusal
        self._send(200, json.dumps({"id": "x", "object": "chat.completion", "model": "fake",
                                    "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}))

    def do_GET(self) -> None:  # noqa: N802
        if self.path.endswith("/models"):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-a"}, {"id": "fake-b"}]}))
        else:
            self._send(404, "{}")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        qid = QUESTIONS.get(body["messages"][-1]["content"], "en-01")
        with self.lock:
            self.seen[qid] += 1
            n = self.seen[qid]
        how = PLAN[qid]
        if how == "http_500":
            self._send(500, '{"error": "internal"}')
        elif how == "429_once" and n == 1 or how == "429_always":
            self._send(429, '{"error": "slow down"}', {"Retry-After": "0"})
        elif how == "bad_json":
            self._send(200, '{"choices": [{"message": {"content": "I am')
        elif how == "slow":
            time.sleep(2.0)
            self._completion(NEX)
        elif how == "empty":
            self._completion("")
        elif how == "refusal":
            self._completion("I'm sorry, but I can't share details about my identity.")
        elif how == "cyrillic":
            self._completion("Я языковая модель, и у меня нет имени.")
        elif how == "echo_key":
            self._completion(f"I am Nex. You sent {self.headers.get('Authorization')}")
        elif how == "refusal_field":
            self._completion(None, refusal="I can't help with that.")
        elif how == "portuguese":
            self._completion("Sou o Nex, criado pela Nex-AGI.")
        elif how == "no_choices":
            self._send(200, '{"choices": []}')
        elif how == "http_400":
            self._send(400, f'{{"error": "bad request from {self.headers.get("Authorization")}"}}')
        elif how == "qwen":
            self._completion("I am Qwen, made by Alibaba Cloud.")
        elif how == "chinese":
            self._completion("我是Nex，由Nex-AGI开发。")
        else:
            self._completion(NEX)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # the client gave up on a slow answer: expected
        pass


@pytest.fixture()
def server():
    Handler.seen = Counter()
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MT_PROBE_TEST_KEY": KEY, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "modeltrace", "probe", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_misbehaving_endpoint_run_completes_and_counts(server, tmp_path):
    report = tmp_path / "r.html"
    r = cli("identity", f"{server}#fake-a", "-l", "en", "--questions", "16", "--timeout", "0.5", "--retries", "2",
            "--api-key-env", "MT_PROBE_TEST_KEY", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["subjects"][0]["probes"][0]
    c = rep["counts"]
    assert c["asked"] == 16
    assert c["error_kinds"] == {"http_500": 1, "rate_limited": 1, "malformed": 2, "timeout": 1, "http_400": 1}
    assert c["errors"] == 6 and c["answers"] == 10
    assert c["empty"] == 1 and c["refusals"] == 2
    assert c["other_script"] == 2 and c["other_language"] == 3  # Cyrillic and Chinese; + Portuguese
    by_q = {a["question_id"]: a for a in rep["answers"]}
    assert by_q["en-03"]["status"] == "answered"  # one 429, then an answer: retried
    assert by_q["en-09"]["other_script"] and by_q["en-09"]["script"] == "Cyrillic"
    assert by_q["en-12"]["language"] == "pt" and by_q["en-16"]["language"] == "zh"
    assert Handler.seen["en-02"] == 3 and Handler.seen["en-14"] == 1  # 5xx retried, 4xx not
    names = {n["name"]: n for n in rep["names"]}
    assert names["Nex"]["mentions"] == 5 and names["Nex"]["n"] == 10  # ok, echo, portuguese, chinese, en-03
    assert names["Qwen"]["mentions"] == 1
    assert any("got no answer" in w for w in rep["warnings"])
    assert KEY not in r.stdout + r.stderr
    assert "***" in by_q["en-10"]["answer"]
    html = cli("identity", f"{server}#fake-a", "-l", "en", "--questions", "16", "--timeout", "0.5", "--retries",
               "0", "--api-key-env", "MT_PROBE_TEST_KEY", "-o", str(report))
    assert html.returncode == 0 and "<svg" in report.read_text() and KEY not in report.read_text() + html.stdout
    assert rep["model"]["authenticated"] is True


def test_human_output_says_what_failed(server):
    r = cli("identity", "fake-b", "--endpoint", server, "-l", "en", "--questions", "16", "--timeout", "0.5",
            "--retries", "1", "--api-key-env", "MT_PROBE_TEST_KEY")
    assert r.returncode == 0, r.stderr
    assert "no answer 6" in r.stdout and "refusals 2" in r.stdout and "empty 1" in r.stdout
    assert "warning: 6 of 16 requests got no answer" in r.stderr
    assert KEY not in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_request_budget_is_a_hard_limit(server):
    r = cli("identity", f"{server}#fake-a", "-l", "en", "--questions", "16", "--budget", "5", "--timeout", "0.5",
            "--retries", "0", "--concurrency", "1", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["subjects"][0]["probes"][0]
    assert rep["model"]["requests_sent"] == 5 and sum(Handler.seen.values()) == 5
    assert rep["counts"]["error_kinds"]["budget"] == 11


def test_several_models_and_none_named_is_one_line(server):
    r = cli("identity", server)
    assert r.returncode == 2 and "serves 2 models (fake-a, fake-b)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = cli("identity", f"http://127.0.0.1:{port}/v1#m", "--questions", "2", "--retries", "1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and lines[0].startswith("modeltrace: error:")


def test_missing_api_key_variable_is_one_line(server):
    r = cli("identity", f"{server}#fake-a", "--api-key-env", "MT_NO_SUCH_VARIABLE_SET")
    assert r.returncode == 2 and "MT_NO_SUCH_VARIABLE_SET" in r.stderr and "not set" in r.stderr
