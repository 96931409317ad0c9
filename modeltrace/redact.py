"""Remove credentials from every string before it is cut, printed or stored.

Data flow: a credential enters through the environment (an endpoint's API key named by --api-key-env, HF_TOKEN) or
inside a URL (user:password@host, ?api-key=...). Code that holds a key calls `register(key)`; everything on its way
out calls `scrub` (text) or `scrub_obj` (JSON-like data): the probe backends on answers, model ids, finish reasons
and error bodies; the CLI on every error line, on stdout/stderr as a whole (`ScrubbingStream`) and on `argv`; the
report formats on the rendered document; the index on the metadata it stores.

`scrub` replaces (1) the userinfo of any URL (`scheme://user:pass@host` -> `scheme://***@host`; not the model spec
`hf://name@rev`), (2) the value of query parameters that carry credentials (`api-key`, `key`, `token`, `sig`,
`password`, ...), (3) a bearer token after `Bearer`, and (4) every registered secret and HF_TOKEN: the whole value and
every piece of it at least MIN_PIECE characters long (a key cut in half by a length limit, a line wrap or a server's
truncation is still removed), also in their URL-encoded form.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.parse
from typing import IO, Any

__all__ = ["MIN_PIECE", "MASK", "ScrubbingStream", "register", "scrub", "scrub_obj"]

MASK = "***"
#: the shortest piece of a secret that is removed on its own (shorter secrets are removed whole)
MIN_PIECE = 8
#: environment variables whose values are credentials wherever they appear
ENV_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_QUERY_KEYS = (r"api[-_]?key|apikey|key|access[-_]?token|token|auth|authorization|sig|signature|password|passwd|pwd|"
               r"secret|client[-_]?secret|x-api-key")

#: hf://name@revision is a model spec, not credentials
_USERINFO = re.compile(r"(?i)\b(?!hf://)([a-z][a-z0-9+.\-]*://)[^/\s@?#'\"<>]+@")
_QUERY = re.compile(rf"(?i)([?&;](?:{_QUERY_KEYS})=)[^&#\s'\"<>]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/\-]{16,}=*")

_lock = threading.Lock()
_registered: set[str] = set()
_pattern: tuple[frozenset[str], re.Pattern[str] | None] = (frozenset(), None)


def register(secret: str | None) -> None:
    """Treat this value (and its URL-encoded form) as a credential from now on, in this process."""
    if not secret or not secret.strip():
        return
    with _lock:
        _registered.add(secret)
        quoted = urllib.parse.quote(secret, safe="")
        if quoted != secret:
            _registered.add(quoted)


def _secrets() -> frozenset[str]:
    env = {os.environ.get(v) for v in ENV_SECRETS}
    with _lock:
        return frozenset(_registered | {s for s in env if s and s.strip()})


def _matcher(secrets: frozenset[str]) -> re.Pattern[str] | None:
    """One regex that finds, at every position, any piece of any secret (a lookahead, so overlaps are seen)."""
    global _pattern
    if _pattern[0] == secrets:
        return _pattern[1]
    pieces = set()
    for s in secrets:
        if len(s) <= MIN_PIECE:
            pieces.add(s)
        else:
            pieces.update(s[i:i + MIN_PIECE] for i in range(len(s) - MIN_PIECE + 1))
    rx = re.compile("(?=(" + "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True)) + "))") \
        if pieces else None
    _pattern = (secrets, rx)
    return rx


def scrub(text: str | None) -> str | None:
    """`text` with every credential replaced by *** (see the module docstring)."""
    if not text:
        return text
    text = str(text)
    if "://" in text:
        text = _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    if "=" in text:
        text = _QUERY.sub(lambda m: m.group(1) + MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    rx = _matcher(_secrets())
    if rx is None:
        return text
    spans: list[list[int]] = []
    for m in rx.finditer(text):
        a, b = m.start(), m.start() + len(m.group(1))
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    if not spans:
        return text
    out, at = [], 0
    for a, b in spans:
        out += [text[at:a], MASK]
        at = b
    out.append(text[at:])
    return "".join(out)


def scrub_obj(doc: Any) -> Any:
    """JSON-like data with every string (keys included) scrubbed."""
    if isinstance(doc, str):
        return scrub(doc)
    if isinstance(doc, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_obj(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return type(doc)(scrub_obj(v) for v in doc)
    return doc


class ScrubbingStream:
    """A text stream that scrubs what is written to it (the CLI's stdout and stderr), line by line so that a
    secret split over two writes is still seen whole."""

    def __init__(self, inner: IO[str]) -> None:
        self._inner = inner
        self._pending = ""

    def write(self, s: str) -> int:
        self._pending += s
        if "\n" in self._pending:
            done, self._pending = self._pending.rsplit("\n", 1)
            self._inner.write(scrub(done + "\n") or "")
        return len(s)

    def flush(self) -> None:
        if self._pending:
            self._inner.write(scrub(self._pending) or "")
            self._pending = ""
        self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
