"""Helpers for the service tests: a real `modeltrace serve` process and Hub webhook payloads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from hubserver import HubServer  # noqa: E402

TOKEN = "test-api-token-0123456789"
SECRET = "test-webhook-secret-abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Service:
    """One `modeltrace serve` process; `call` speaks to its HTTP API."""

    def __init__(self, tmp: Path, hub: HubServer, db: str, index: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tmp, self.hub, self.db, self.index = tmp, hub, db, index
        self.args, self.extra_env = list(args or []), dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = tmp / f"service-{time.monotonic_ns()}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "MODELTRACE_"))}
        env.update({"HF_ENDPOINT": self.hub.url, "HF_HOME": str(self.tmp / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                    "MODELTRACE_CACHE": str(self.tmp / "cache"), "MODELTRACE_HTTP_TIMEOUT": "10",
                    "MODELTRACE_HTTP_RETRIES": "2", "MODELTRACE_API_TOKEN": TOKEN,
                    "MODELTRACE_WEBHOOK_SECRET": SECRET, "PYTHONPATH": str(ROOT), **self.extra_env})
        cmd = [sys.executable, "-m", "modeltrace.cli", "serve", "--port", str(self.port), "--db", self.db,
               "--index", str(self.index), "--poll-interval", "0", "--lease", "3", "--backoff", "0.2", *self.args]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(self._up, 90, f"the service to start (log: {self.log})")
        return self

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the service exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
        try:
            return self.call("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, headers=hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                text = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as exc:
            text, status = exc.read().decode(), exc.code
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def submit(self, repo: str, revision: str = "main") -> dict[str, Any]:
        status, got = self.call("POST", "/api/models", {"repo": repo, "revision": revision},
                                {"Authorization": f"Bearer {TOKEN}"})
        assert status == 202, got
        return got

    def job(self, job_id: int) -> dict[str, Any]:
        return self.call("GET", f"/api/jobs/{job_id}")[1]

    def wait_job(self, job_id: int, timeout: float = 120.0, states: tuple[str, ...] = ("done", "failed")
                 ) -> dict[str, Any]:
        return wait_for(lambda: (j := self.job(job_id))["state"] in states and j, timeout, f"job {job_id}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def webhook(repo: str, sha: str, scope: str = "repo.content", action: str = "update", kind: str = "model"
            ) -> dict[str, Any]:
    """A payload as the Hub sends it (webhook version 3) for a push to main."""
    return {"event": {"action": action, "scope": scope},
            "repo": {"type": kind, "name": repo, "id": "6400000000000000000000" + "00", "private": False,
                     "url": {"web": f"https://huggingface.co/{repo}", "api": f"https://huggingface.co/api/models/{repo}"},
                     "headSha": sha, "owner": {"id": "6300000000000000000000aa"}},
            "webhook": {"id": "6500000000000000000000bb", "version": 3},
            "updatedRefs": [{"ref": "refs/heads/main", "oldSha": None, "newSha": sha}]}
