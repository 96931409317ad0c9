"""The durable job queue, kept in the service database (store.py's `jobs` table): one job per (repository, revision).

Data flow: `enqueue` (webhook, API, poller) inserts a job unless its idempotency key `repo@revision` is already
there (duplicate deliveries are no-ops); a worker `claim`s the oldest due job by a compare-and-set on its row (state
and attempt count), which gives it a lease; while it works it `renew`s the lease; it ends the job with `complete`
(the result rows are written in the same transaction, only if it still holds the lease) or `fail` (back to the queue
with a back-off, or failed with its reason once the attempts are spent).

Why a job is neither lost nor run twice: a job's row changes state only inside a transaction; a worker that dies
(the service killed, the machine lost) stops renewing its lease, and once the lease has run out the job is claimed
again; a worker whose lease was taken over can no longer complete the job (the compare-and-set on owner and attempt
fails), so exactly one result is ever recorded per job, and the unique key gives one job per revision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from modeltrace.service.store import Store, jobs

__all__ = ["Job", "JobQueue", "LeaseLost", "job_key"]

#: retry back-off: BACKOFF_S * 2 ** (attempt - 1), at most BACKOFF_MAX_S
BACKOFF_S = 2.0
BACKOFF_MAX_S = 300.0


class LeaseLost(RuntimeError):
    """This worker no longer holds the job (its lease ran out and another worker claimed it)."""


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    repo_id: str
    revision: str
    source: str
    attempts: int
    max_attempts: int
    owner: str

    @property
    def spec(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}"


def job_key(repo_id: str, revision: str) -> str:
    return f"{repo_id}@{revision}"


class JobQueue:
    def __init__(self, store: Store, lease_s: float = 60.0, max_attempts: int = 3, backoff_s: float = BACKOFF_S
                 ) -> None:
        self.store = store
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s

    # ---- producers ---------------------------------------------------------------------------------------------
    def enqueue(self, repo_id: str, revision: str, source: str, conn: Connection | None = None) -> tuple[int, bool]:
        """(job id, True when new). A job with the same key already queued, running or finished is left alone."""
        if conn is None:
            with self.store.write() as c:
                return self.enqueue(repo_id, revision, source, c)
        key = job_key(repo_id, revision)
        now = time.time()
        ins = postgresql.insert(jobs) if self.store.dialect == "postgresql" else sqlite.insert(jobs)
        stmt = ins.values(key=key, repo_id=repo_id, revision=revision, source=source, state="queued", attempts=0,
                          max_attempts=self.max_attempts, not_before=now, created_at=now
                          ).on_conflict_do_nothing(index_elements=["key"]).returning(jobs.c.id)
        new_id = conn.execute(stmt).scalar()
        if new_id is not None:
            return int(new_id), True
        return int(conn.execute(select(jobs.c.id).where(jobs.c.key == key)).scalar_one()), False

    # ---- workers -----------------------------------------------------------------------------------------------
    def claim(self, owner: str) -> Job | None:
        """Lease the oldest due job (queued, or running with an expired lease) to `owner`, or None."""
        now = time.time()
        due = or_(and_(jobs.c.state == "queued", jobs.c.not_before <= now),
                  and_(jobs.c.state == "running", jobs.c.lease_until < now))
        with self.store.read() as conn:
            rows = conn.execute(select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts).where(due)
                                .order_by(jobs.c.id).limit(16)).all()
        for job_id, attempts, max_attempts in rows:
            with self.store.write() as conn:
                if attempts >= max_attempts:  # its last attempt's worker was lost: give up on it, with the reason
                    conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.attempts == attempts, due)
                                 .values(state="failed", finished_at=now, lease_owner=None,
                                         error=f"the worker running it was lost {attempts} times"))
                    continue
                got = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.attempts == attempts, due)
                                   .values(state="running", attempts=attempts + 1, lease_owner=owner,
                                           lease_until=now + self.lease_s, started_at=now)
                                   .returning(jobs.c.key, jobs.c.repo_id, jobs.c.revision, jobs.c.source)).first()
            if got is not None:
                return Job(job_id, got.key, got.repo_id, got.revision, got.source, attempts + 1, max_attempts, owner)
        return None

    def _mine(self, job: Job) -> Any:
        return and_(jobs.c.id == job.id, jobs.c.state == "running", jobs.c.lease_owner == job.owner,
                    jobs.c.attempts == job.attempts)

    def renew(self, job: Job) -> None:
        with self.store.write() as conn:
            n = conn.execute(update(jobs).where(self._mine(job)).values(lease_until=time.time() + self.lease_s))
            if n.rowcount != 1:
                raise LeaseLost(f"job {job.id}: lease lost")

    def complete(self, job: Job, write: Callable[[Connection], None] | None = None) -> None:
        """Close the job and, in the same transaction, run `write` (the result rows). LeaseLost if taken over."""
        with self.store.write() as conn:
            n = conn.execute(update(jobs).where(self._mine(job)).values(
                state="done", finished_at=time.time(), lease_owner=None, error=None))
            if n.rowcount != 1:
                raise LeaseLost(f"job {job.id}: lease lost before it completed")
            if write is not None:
                write(conn)

    def fail(self, job: Job, reason: str) -> str:
        """Back to the queue after a back-off, or `failed` with `reason` when no attempt is left; the new state."""
        now = time.time()
        last = job.attempts >= job.max_attempts
        delay = min(BACKOFF_MAX_S, self.backoff_s * 2 ** (job.attempts - 1))
        values: dict[str, Any] = {"error": reason[:2000], "lease_owner": None}
        values.update({"state": "failed", "finished_at": now} if last else {"state": "queued",
                                                                             "not_before": now + delay})
        with self.store.write() as conn:
            n = conn.execute(update(jobs).where(self._mine(job)).values(**values))
            if n.rowcount != 1:
                raise LeaseLost(f"job {job.id}: lease lost before it failed")
        return values["state"]

    # ---- reading -----------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.store.read() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {"queued": 0, "running": 0, "done": 0, "failed": 0, **{s: int(n) for s, n in rows}}
