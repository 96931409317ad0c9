"""One small interface over the two ways a model can be asked: a local checkpoint run with transformers (CPU or GPU,
the optional `modeltrace[probe]` extra) and any OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, Ollama,
`transformers serve`, hosted APIs).

A backend answers a batch of chat requests with one result per request and never raises for one bad answer: a
time-out, an HTTP error, a rate limit that outlasts the retries, malformed JSON or an exhausted request budget
become a result with `error` set, so a run completes and counts its failures. Only "nothing can be reached at all"
is an exception (RemoteError), because then there is no run to report.

The endpoint client is the standard library (urllib in threads): no client library to pin, and every failure mode
is ours to classify. An API key is read from the environment variable the user names, sent as a bearer token, and
scrubbed (modeltrace.redact: the whole key and any long piece of it) from every string that comes back, before it is
cut, printed or stored: answers, finish reasons, log-probability tokens, model ids and error bodies (a server may
echo it anywhere).
"""

from __future__ import annotations

import hashlib
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeltrace.errors import InputError, RemoteError
from modeltrace.redact import register, scrub

Progress = Callable[[int], None]


@dataclass
class ChatRequest:
    """One chat turn to answer; None sampling fields mean "the model's own", so a probe measures the model as
    deployed rather than under settings we chose."""

    messages: list[dict[str, str]]
    max_tokens: int = 256
    greedy: bool = False
    temperature: float | None = None  # None: the model's own setting (generation_config / server default)
    top_p: float | None = None
    seed: int | None = None  # give each request its own: equal seeds make equal draws, and answers correlated
    top_logprobs: int = 0  # ask for the first answer token's top-k log-probabilities, where the backend can


@dataclass
class ChatResult:
    """An answer, or why there is none: failures are data (counted in reports), not exceptions."""

    text: str | None
    error: str | None = None  # timeout | connection | rate_limited | http_NNN | malformed | budget | aborted
    detail: str | None = None  # one line, secrets removed
    finish_reason: str | None = None
    first_logprobs: dict[str, float] | None = None  # token text -> log-probability (top-k only)
    token_ids: list[int] | None = None  # local backend: the generated ids (for teacher forcing in compare)
    attempts: int = 0


class Backend:
    """What the probes need from a model. `logits` says whether next-token distributions can be scored."""

    kind = "?"
    label = "?"
    logits = False

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind, "model": self.label}

    def chat(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResult]:
        """One result per request, in order; `progress(k)` after every k answered."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ================================================================================================ local


class LocalBackend(Backend):
    """A checkpoint folder run with transformers. Sampling follows the model's generation_config.json (its own
    settings) unless a request overrides temperature / top_p; greedy requests decode greedily."""

    kind = "transformers"
    logits = True

    def __init__(self, path: str, device: str = "auto", batch_size: int | None = None,
                 dtype: str = "auto") -> None:
        folder = Path(path)
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise InputError(f"{path}: not a model folder (config.json missing); for an endpoint give "
                             "--endpoint URL or http(s)://HOST/v1#MODEL")
        try:
            import torch
            import transformers
        except ImportError:
            raise InputError("a local model needs torch and transformers: pip install 'modeltrace[probe]' (install "
                             "torch first, e.g. pip install torch==2.13.0 for the CPU build)") from None
        self.torch = torch
        self.label = path
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        transformers.logging.set_verbosity_error()
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any loader failure is the user's input
            raise InputError(f"{path}: cannot load its tokenizer ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)  # the checkpoint's own by default
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: cannot load it as a causal language model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.gen = self.model.generation_config
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.batch_size = batch_size or (32 if device.startswith("cuda") else 16)
        self.has_template = bool(getattr(self.tok, "chat_template", None))
        vocab = self.tok.get_vocab()
        self.vocab_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        g = self.gen
        return {"backend": self.kind, "model": self.label, "device": self.device,
                "chat_template": self.has_template,
                "own_sampling": {"do_sample": bool(g.do_sample), "temperature": g.temperature, "top_p": g.top_p,
                                 "top_k": g.top_k}}

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------- prompts

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.has_template:
            try:
                out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception:  # noqa: BLE001 - templates raise anything (Gemma's: "System role not supported")
                if messages[0]["role"] != "system":
                    raise
                # No system role in this template: the system text goes first in the user's turn, as such models
                # are deployed; an empty system turn (--no-system-prompt) is simply left out.
                system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
                if system and rest:
                    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
                out = self.tok.apply_chat_template(rest, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return list(ids)
        # No chat template (a base model): a plain transcript that such models continue sensibly.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return list(self.tok(text)["input_ids"])

    def _pad(self, seqs: list[list[int]]):
        torch = self.torch
        width = max(len(s) for s in seqs)
        x = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: generation continues every row at the same column
            x[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            att[i, width - len(s):] = 1
        return x.to(self.device), att.to(self.device)

    @staticmethod
    def _positions(att):
        """Position ids that start at 0 on each row's first real token (left padding), as generate() uses."""
        return (att.cumsum(-1) - 1).clamp(min=0)

    # ----------------------------------------------------------------------------------------- generation

    def _gen_kwargs(self, r: ChatRequest) -> dict[str, Any]:
        from transformers import GenerationConfig

        g = GenerationConfig.from_dict(self.gen.to_dict())
        g.max_new_tokens = r.max_tokens
        g.max_length = None
        g.pad_token_id = self.tok.pad_token_id
        if g.eos_token_id is None:
            g.eos_token_id = self.tok.eos_token_id
        if r.greedy:
            g.do_sample, g.temperature, g.top_p, g.top_k = False, None, None, None
        else:
            if r.temperature is not None:
                g.do_sample = r.temperature > 0
                g.temperature = r.temperature if r.temperature > 0 else None
            if r.top_p is not None:
                g.top_p = r.top_p
        return {"generation_config": g}

    def chat(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResult]:
        torch = self.torch
        results: list[ChatResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_tokens, r.greedy, r.temperature, r.top_p), []).append(i)
        for idx in groups.values():
            kwargs = self._gen_kwargs(requests[idx[0]])
            seed = requests[idx[0]].seed  # one stream per batch: rows of a batch draw independently
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                x, att = self._pad([self.prompt_ids(requests[i].messages) for i in chunk])
                if seed is not None:
                    torch.manual_seed(seed + b)
                with torch.no_grad():
                    out = self.model.generate(input_ids=x, attention_mask=att, **kwargs)
                eos = kwargs["generation_config"].eos_token_id
                eos_set = set(eos if isinstance(eos, list) else [eos])
                for row, i in enumerate(chunk):
                    ids = out[row, x.shape[1]:].tolist()
                    finish = "length"
                    for j, t in enumerate(ids):
                        if t in eos_set:
                            ids, finish = ids[:j], "stop"
                            break
                    ids = [t for t in ids if t != self.tok.pad_token_id]
                    results[i] = ChatResult(self.tok.decode(ids, skip_special_tokens=True), finish_reason=finish,
                                            token_ids=ids, attempts=1)
                if progress:
                    progress(len(chunk))
        return [r for r in results if r is not None]

    # ----------------------------------------------------------------------------------------- distributions

    def next_token_probs(self, messages_list: list[list[dict[str, str]]], continuations: list[list[int]],
                         positions: int):
        """Next-token distributions after each prompt and after each of the first `positions - 1` tokens of the
        given continuation (teacher forcing): a float32 array [positions, vocab] per prompt (fewer rows when the
        continuation is shorter)."""
        torch = self.torch
        out = []
        for b in range(0, len(messages_list), self.batch_size):
            seqs, spans = [], []
            for msgs, cont in zip(messages_list[b:b + self.batch_size], continuations[b:b + self.batch_size],
                                  strict=True):
                p = self.prompt_ids(msgs)
                k = min(positions, len(cont) + 1)
                seqs.append(p + list(cont[:k - 1]))
                spans.append(k)
            x, att = self._pad(seqs)
            keep = max(spans)  # only the last positions' logits: a 150k vocabulary over a long prompt is large
            with torch.no_grad():
                logits = self.model(input_ids=x, attention_mask=att, position_ids=self._positions(att),
                                    logits_to_keep=keep).logits
            for row, k in enumerate(spans):
                rows = logits[row, logits.shape[1] - k:].float()
                out.append(torch.softmax(rows, -1).cpu().numpy())
        return out


# ================================================================================================ endpoint


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
        last_error, last_detail = "aborted", "the run stopped before this request was sent"
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


# ================================================================================================ opening


def open_backend(spec: str, endpoint: str | None = None, api_key_env: str | None = None, **options: Any) -> Backend:
    """MODEL as the user wrote it: with --endpoint, a model name served there; `http(s)://HOST[/v1]#MODEL`, an
    endpoint model; otherwise a local model folder."""
    local_opts = {k: options[k] for k in ("device", "batch_size", "dtype") if k in options and options[k] is not None}
    remote_opts = {k: options[k] for k in ("concurrency", "timeout", "retries", "budget", "backoff")
                   if k in options and options[k] is not None}
    if endpoint:
        return EndpointBackend(endpoint, model=spec or None, api_key_env=api_key_env, **remote_opts)
    if re.match(r"https?://", spec):
        url, _, model = spec.partition("#")
        return EndpointBackend(url, model=model or None, api_key_env=api_key_env, **remote_opts)
    if spec.startswith("hf://"):
        raise InputError(f"{spec}: probes run the model; download it first (a local folder) or serve it behind an "
                         "OpenAI-compatible endpoint")
    return LocalBackend(spec, **local_opts)
