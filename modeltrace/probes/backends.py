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

The interface is chat.py, the local backend local.py and the endpoint backend endpoint.py; this module opens the
one a MODEL names (`open_backend`) and keeps the names importable from here.
"""

from __future__ import annotations

import re
from typing import Any

from modeltrace.errors import InputError
from modeltrace.probes.chat import Backend, ChatRequest, ChatResult, Progress
from modeltrace.probes.endpoint import EndpointBackend, endpoint_urls, safe_url
from modeltrace.probes.local import LocalBackend

__all__ = ["Backend", "ChatRequest", "ChatResult", "EndpointBackend", "LocalBackend", "Progress", "endpoint_urls",
           "open_backend", "safe_url"]


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
