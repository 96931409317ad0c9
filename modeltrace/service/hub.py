"""The Hugging Face Hub side of the service: webhook payloads, the shared secret, repository ids, commit look-ups and
the poller of watched repositories.

Data flow: a Hub webhook POST -> `check_secret` (the `X-Webhook-Secret` header, compared in constant time) ->
`HubWebhook` (the Hub's payload, version 3) -> `revisions` (which commits of which model repository to check) ->
queue.enqueue. The poller asks the Hub (huggingface_hub's `model_info`, so `HF_ENDPOINT` and `HF_TOKEN` apply) for
the head commit of every watched repository and queues the ones it has not seen.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update

from modeltrace.errors import InputError, RemoteError
from modeltrace.service.queue import JobQueue
from modeltrace.service.store import Store, repos

__all__ = ["HubWebhook", "Poller", "check_secret", "parse_repo", "resolve_commit", "revisions"]

log = logging.getLogger("modeltrace.service")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_URL_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "hf://")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class HubEvent(_Loose):
    action: str = Field(max_length=40)
    scope: str = Field(max_length=80)


class HubRepo(_Loose):
    type: str = Field(max_length=20)
    name: str = Field(max_length=200)
    headSha: str | None = Field(None, max_length=64)  # noqa: N815 - the Hub's field name


class HubRef(_Loose):
    ref: str = Field(max_length=300)
    oldSha: str | None = Field(None, max_length=64)  # noqa: N815
    newSha: str | None = Field(None, max_length=64)  # noqa: N815


class HubWebhook(_Loose):
    """What the Hub POSTs (https://huggingface.co/docs/hub/webhooks): only the fields the service uses."""

    event: HubEvent
    repo: HubRepo
    updatedRefs: list[HubRef] | None = Field(None, max_length=1000)  # noqa: N815


def check_secret(expected: str | None, given: str | None) -> int | None:
    """None when `given` is the configured secret; else the HTTP status to refuse with (401 missing, 403 wrong or
    no secret configured: an unauthenticated webhook would let anyone queue work)."""
    if not expected:
        return 403
    if not given:
        return 401
    return None if hmac.compare_digest(expected.encode(), given.encode()) else 403


def parse_repo(text: str) -> str:
    """A model repository id `owner/name` from an id, an hf:// spec or a huggingface.co URL; InputError otherwise."""
    from modeltrace.sources.hub import parse_spec

    raw = text.strip() if isinstance(text, str) else ""
    for prefix in _URL_PREFIXES:
        if raw.startswith(prefix):
            raw = raw[len(prefix):]
            break
    raw = raw.rstrip("/")
    if not raw or len(raw) > 200 or "@" in raw or raw.count("/") != 1:
        raise InputError(f"{text!r:.120}: not a model repository id (owner/name)")
    repo_id, _ = parse_spec(f"hf://{raw}")
    return repo_id


def check_revision(revision: str) -> str:
    if not isinstance(revision, str) or not re.fullmatch(r"[A-Za-z0-9._\-/]{1,200}", revision) or ".." in revision \
            or revision.startswith("/"):
        raise InputError(f"{revision!r:.80}: not a revision (a branch, tag or commit sha)")
    return revision


def revisions(payload: HubWebhook) -> tuple[str, list[str], str]:
    """(repo id, commit shas or branch names to check, why nothing when the list is empty)."""
    if payload.repo.type != "model":
        return "", [], f"{payload.repo.type} repositories are not checked"
    repo_id = parse_repo(payload.repo.name)
    ev = payload.event
    if ev.scope == "repo" and ev.action == "create":
        return repo_id, [payload.repo.headSha or "main"], ""
    if ev.scope == "repo.content" and ev.action in ("create", "update"):
        heads = [r.newSha for r in payload.updatedRefs or [] if r.ref.startswith("refs/heads/") and r.newSha]
        if not heads and payload.repo.headSha:
            heads = [payload.repo.headSha]
        for sha in heads:
            if not SHA_RE.match(sha):
                raise InputError(f"{sha!r:.80}: not a commit sha")
        return repo_id, list(dict.fromkeys(heads)), "" if heads else "no branch head changed"
    return repo_id, [], f"event {ev.scope}/{ev.action} does not change the weights"


def resolve_commit(repo_id: str, revision: str) -> str:
    """The commit sha a revision of a model repository points to (no request when it is one already)."""
    if SHA_RE.match(revision):
        return revision
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    from modeltrace.sources.hub import _endpoint

    try:
        info = HfApi(endpoint=_endpoint()).model_info(repo_id, revision=revision, timeout=30)
    except RepositoryNotFoundError:
        raise RemoteError(f"hf://{repo_id}: repository not found (or private without a token)") from None
    except RevisionNotFoundError:
        raise RemoteError(f"hf://{repo_id}@{revision}: revision not found") from None
    except HfHubHTTPError as exc:
        raise RemoteError(f"hf://{repo_id}: the Hub answered {_status(exc)}") from None
    except OSError as exc:
        raise RemoteError(f"hf://{repo_id}: cannot reach the Hub ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - httpx and friends: one line, never a traceback
        raise RemoteError(f"hf://{repo_id}: cannot reach the Hub ({type(exc).__name__})") from None
    if not info.sha or not SHA_RE.match(info.sha):
        raise RemoteError(f"hf://{repo_id}@{revision}: the Hub gave no commit sha")
    return info.sha


def _status(exc: Any) -> str:
    resp = getattr(exc, "response", None)
    return f"HTTP {getattr(resp, 'status_code', '?')}"


class Poller:
    """Checks the head of every watched repository every `interval` seconds, in a thread, and queues new commits."""

    def __init__(self, store: Store, queue: JobQueue, interval: float) -> None:
        self.store, self.queue, self.interval = store, queue, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="modeltrace-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - the poller must survive a bad round (database restarting)
                log.warning("poll round failed: %s", type(exc).__name__)
            self._stop.wait(self.interval)

    def poll_once(self) -> int:
        """One round over the watch-list; how many new revisions were queued."""
        with self.store.read() as conn:
            watched = conn.execute(select(repos.c.repo_id, repos.c.last_sha).where(repos.c.watched)).all()
        queued = 0
        for repo_id, last in watched:
            if self._stop.is_set():
                break
            now = time.time()
            try:
                sha = resolve_commit(repo_id, "main")
            except RemoteError as exc:
                with self.store.write() as conn:
                    conn.execute(update(repos).where(repos.c.repo_id == repo_id)
                                 .values(last_polled_at=now, poll_error=str(exc)[:500]))
                continue
            with self.store.write() as conn:
                if sha != last:
                    _, new = self.queue.enqueue(repo_id, sha, "poll", conn)
                    queued += new
                conn.execute(update(repos).where(repos.c.repo_id == repo_id)
                             .values(last_polled_at=now, last_sha=sha, poll_error=None))
        return queued


def bad_input(exc: InputError) -> str:
    return str(exc).splitlines()[0][:300]
