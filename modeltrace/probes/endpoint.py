"""The endpoint backend: any OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, Ollama, `transformers
serve`, hosted APIs), with the standard library's urllib in threads.

Data flow: `EndpointBackend(url)` derives the chat-completions and models URLs (`endpoint_urls`), reads the API key
from the environment variable the user names (registered with modeltrace.redact, so it is scrubbed from every string
that comes back) and, for each request of `chat`, POSTs it with bounded concurrency, retries with back-off
(honouring Retry-After), a per-request time-out and a request budget shared by all (`_Budget`). Every failure
becomes a `ChatResult` with `error` set; only an endpoint that cannot be reached at all raises RemoteError. Only
`safe_url` forms of the URL (no credentials, query or fragment) appear in messages and reports.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from modeltrace.errors import InputError, RemoteError
from modeltrace.probes.chat import Backend, ChatRequest, ChatResult, Progress
from modeltrace.redact import register, scrub

__all__ = ["EndpointBackend", "endpoint_urls", "safe_url"]


def endpoint_urls(url: str) -> tuple[str, str]:
    """(chat completions URL, models URL) from what a user types: http://host:8000, .../v1 or the full path."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"--endpoint must be an http(s) URL, got {safe_url(url)!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        base = path[: -len("/chat/completions")]
    elif re.search(r"/v\d+$", path):
        base = path
    else:
        base = path + "/v1"
    def url_for(suffix: str) -> str:  # a query (e.g. an api-version) is kept for the request, never displayed
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, base + suffix, parts.query, ""))

    return url_for("/chat/completions"), url_for("/models")


def safe_url(url: str) -> str:
    """The URL without credentials, query or fragment: what may appear in a report."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


@dataclass
class _Budget:
    limit: int | None
    used: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> bool:
        with self.lock:
            if self.limit is not None and self.used >= self.limit:
                return False
            self.used += 1
            return True


class EndpointBackend(Backend):
    """An OpenAI-compatible chat endpoint: POST {url}/chat/completions with concurrency, retries with exponential
    back-off (honouring Retry-After), a per-request time-out and a request budget shared by every request."""

    kind = "endpoint"

    def __init__(self, url: str, model: str | None = None, api_key_env: str | None = None, concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 4, budget: int | None = None, backoff: float = 0.5) -> None:
        self.chat_url, self.models_url = endpoint_urls(url)
        self._key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise InputError(f"environment variable {api_key_env} (--api-key-env) is not set or empty")
            self._key = key
            register(key)
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise InputError("--concurrency must be >= 1, --retries >= 0 and --timeout > 0")
        if budget is not None and budget < 1:
            raise InputError("--budget must be at least 1 request")
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.budget = _Budget(budget)
        self._logprobs_ok: bool | None = None  # unknown until a response says
        self._max_tokens_field = "max_tokens"
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._fail_streak = 0
        self._successes = 0
        self.stats = {"requests": 0, "retries": 0, "rate_limited": 0}
        self.model = model or self._only_model()
        # the id as served is what requests name; what is shown or stored is scrubbed (a server may echo the key)
        self.label = f"{self.scrub(self.model)} @ {safe_url(self.chat_url).rsplit('/chat/completions', 1)[0]}"

    @property
    def logits(self) -> bool:  # type: ignore[override]
        return bool(self._logprobs_ok)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.scrub(self.model), "endpoint": safe_url(self.chat_url),
                "authenticated": self._key is not None, "requests_sent": self.budget.used,
                "budget": self.budget.limit, "retries": self.stats["retries"],
                "rate_limited_responses": self.stats["rate_limited"], "logprobs": self._logprobs_ok}

    def scrub(self, text: str | None) -> str | None:
        """The text without the key (whole or any long piece), URL credentials or bearer tokens."""
        if text is None:
            return None
        return scrub(str(text))

    # ----------------------------------------------------------------------------------------- HTTP

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "modeltrace-probe"}
        if self._key:
            h["Authorization"] = f"Bearer {self._key}"
        return h

    def _only_model(self) -> str:
        """The served model when the user named none (GET /models); it must be exactly one."""
        req = urllib.request.Request(self.models_url, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                doc = json.loads(resp.read())
            ids = [str(m["id"]) for m in doc.get("data", []) if isinstance(m, dict) and "id" in m]
        except urllib.error.HTTPError as exc:
            raise RemoteError(f"{safe_url(self.models_url)}: HTTP {exc.code} listing models; name the model "
                              "(URL#MODEL or MODEL with --endpoint)") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"{safe_url(self.models_url)}: unreachable ({self.scrub(str(reason))})") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RemoteError(f"{safe_url(self.models_url)}: the model list is not OpenAI-style JSON; name the "
                              "model explicitly") from None
        if len(ids) != 1:
            listed = self.scrub(", ".join(ids[:8]) + (" ..." if len(ids) > 8 else ""))
            raise InputError(f"{safe_url(self.models_url)} serves {len(ids)} models ({listed or 'none'}); "
                             "name one (URL#MODEL or MODEL with --endpoint)")
        return ids[0]

    def _body(self, r: ChatRequest, logprobs: bool) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": r.messages, self._max_tokens_field: r.max_tokens}
        if r.greedy:
            body["temperature"] = 0.0
        else:
            if r.temperature is not None:
                body["temperature"] = r.temperature
            if r.top_p is not None:
                body["top_p"] = r.top_p
        if r.seed is not None:
            body["seed"] = r.seed
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = r.top_logprobs
        return json.dumps(body).encode()

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2 ** attempt) * (0.5 + random.random())
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, 30.0))

    def _one(self, r: ChatRequest) -> ChatResult:
        attempts = 0
        last_error: str | None = "aborted"
        last_detail: str | None = "the run stopped before this request was sent"
        for attempt in range(self.retries + 1):
            if self._abort.is_set():
                return ChatResult(None, "aborted", "endpoint unreachable: stopped after repeated connection "
                                  "failures", attempts=attempts)
            if not self.budget.take():
                return ChatResult(None, "budget", f"request budget of {self.budget.limit} exhausted",
                                  attempts=attempts)
            attempts += 1
            want_lp = r.top_logprobs > 0 and self._logprobs_ok is not False
            req = urllib.request.Request(self.chat_url, data=self._body(r, want_lp), headers=self._headers(),
                                         method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                code = exc.code
                try:
                    body = exc.read(2000).decode("utf-8", "replace")
                except (OSError, ValueError):
                    body = ""
                last_detail = self._short(f"HTTP {code}: {body}")
                if code == 400 and want_lp and "logprob" in body.lower():
                    self._logprobs_ok = False  # the server refuses log-probabilities: ask without them
                    continue
                if code == 400 and "max_tokens" in body and self._max_tokens_field == "max_tokens":
                    self._max_tokens_field = "max_completion_tokens"
                    continue
                if code == 429:
                    with self._lock:
                        self.stats["rate_limited"] += 1
                    last_error, retry_after = "rate_limited", exc.headers.get("Retry-After")
                elif code >= 500 or code == 408:
                    last_error = f"http_{code}"
                else:
                    self._note(ok=True)  # the server answered: reachable, just refused this request
                    return ChatResult(None, f"http_{code}", last_detail, attempts=attempts)
                self._note(ok=True)
            except TimeoutError:
                last_error, last_detail = "timeout", f"no response within {self.timeout:g} s"
                self._note(ok=True)
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last_error, last_detail = "timeout", f"no response within {self.timeout:g} s"
                    self._note(ok=True)
                else:
                    last_error, last_detail = "connection", self._short(f"connection failed: {reason}")
                    self._note(ok=False)
            else:
                self._note(ok=True)
                result = self._parse(raw, want_lp)
                if result.error != "malformed":
                    result.attempts = attempts
                    with self._lock:
                        self._successes += 1
                    return result
                last_error, last_detail = result.error, result.detail
            if attempt < self.retries:
                with self._lock:
                    self.stats["retries"] += 1
                self._sleep(attempt, retry_after)
        return ChatResult(None, last_error, last_detail, attempts=attempts)

    def _note(self, ok: bool) -> None:
        """Stop early when the endpoint is plainly down: many connection failures in a row and no success."""
        with self._lock:
            self._fail_streak = 0 if ok else self._fail_streak + 1
            if self._fail_streak >= max(8, 2 * self.concurrency) and self._successes == 0:
                self._abort.set()

    def _short(self, text: str) -> str:
        """One line of at most 300 characters, scrubbed before it is cut (a cut must not leave half a key)."""
        line = self.scrub(" ".join(str(text).split())) or ""
        return line[:300] + ("..." if len(line) > 300 else "")

    def _parse(self, raw: bytes, want_lp: bool) -> ChatResult:
        try:
            doc = json.loads(raw)
            choice = doc["choices"][0]
            msg = choice.get("message") or {}
            text = msg.get("content")
            if text is None and msg.get("refusal"):
                text = msg["refusal"]
            if text is not None and not isinstance(text, str):
                if isinstance(text, list):  # content parts
                    text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
                else:
                    raise TypeError("content is not text")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = (self.scrub(raw[:4000].decode("utf-8", "replace")) or "")[:120]
            return ChatResult(None, "malformed", self._short(f"not an OpenAI chat completion: {snippet}"))
        first = None
        if want_lp:
            first = _first_logprobs(choice)
            if self._logprobs_ok is None:
                self._logprobs_ok = first is not None
        finish = choice.get("finish_reason")
        if first:
            first = {self.scrub(k) or "": v for k, v in first.items()}
        return ChatResult(self.scrub(text or ""), finish_reason=None if finish is None else self.scrub(str(finish)),
                          first_logprobs=first)

    def chat(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResult]:
        if not requests:
            return []
        # One request first: it settles log-probability support and fails fast on a dead endpoint.
        results: list[ChatResult] = [self._one(requests[0])]
        if progress:
            progress(1)

        def run(r: ChatRequest) -> ChatResult:
            res = self._one(r)
            if progress:
                progress(1)
            return res

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results += list(pool.map(run, requests[1:]))
        if self._successes == 0 and all(r.error in ("connection", "aborted") for r in results):
            raise RemoteError(f"{safe_url(self.chat_url)}: unreachable ({results[0].detail})")
        return results


def _first_logprobs(choice: dict) -> dict[str, float] | None:
    try:
        first = choice["logprobs"]["content"][0]
        out = {d["token"]: float(d["logprob"]) for d in first.get("top_logprobs") or []}
        if not out and "token" in first:
            out = {first["token"]: float(first["logprob"])}
        return {k: v for k, v in out.items() if math.isfinite(v)} or None
    except (KeyError, IndexError, TypeError, ValueError):
        return None
