"""What the probes ask a model and what comes back: `ChatRequest`, `ChatResult` and the `Backend` interface.

Data flow: a probe (identity.py, compare.py) builds `ChatRequest`s and hands them to a backend's `chat`, which
answers each with one `ChatResult` in order (an answer, or why there is none: failures are data, not exceptions);
the backends are local.py (transformers) and endpoint.py (OpenAI-compatible), opened by backends.open_backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Backend", "ChatRequest", "ChatResult", "Progress"]


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
