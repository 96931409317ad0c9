"""The service database and its job queue on SQLite and on a real PostgreSQL (a throwaway cluster; skipped when the
server binaries are absent): one schema with recorded migrations, idempotent enqueue, exclusive claims under
concurrency, leases taken over after a crash, a stale worker unable to record, retries then failure with a reason."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import func, insert, inspect, select, update  # noqa: E402

from modeltrace.errors import InputError  # noqa: E402
from modeltrace.service.queue import JobQueue, LeaseLost  # noqa: E402
from modeltrace.service.store import SCHEMA_VERSION, Store, jobs, results, schema_version  # noqa: E402

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'q.sqlite'}"
    from sqlalchemy import create_engine

    from modeltrace.service.store import normalise_url

    base = request.getfixturevalue("pg_server")
    engine = create_engine(normalise_url(base))  # a fresh schema per test: drop what the previous test left
    with engine.begin() as conn:
        for t in ("alerts", "results", "jobs", "repos", "schema_version"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {t} CASCADE")
    engine.dispose()
    return base


def _sha(i: int) -> str:
    return f"{i:040x}"


def test_schema_and_migrations_are_recorded(db_url):
    store = Store(db_url)
    with store.read() as conn:
        versions = conn.execute(select(schema_version.c.version, schema_version.c.description)).all()
        tables = set(inspect(conn).get_table_names())
        cols = {c["name"] for c in inspect(conn).get_columns("jobs")}
    assert [v for v, _ in versions] == list(range(1, SCHEMA_VERSION + 1))
    assert {"schema_version", "repos", "jobs", "results", "alerts"} <= tables
    assert {"key", "state", "attempts", "lease_owner", "lease_until", "error"} <= cols
    store.close()
    Store(db_url).close()  # re-opening applies nothing twice
    with Store(db_url).write() as conn:
        assert conn.execute(select(func.count()).select_from(schema_version)).scalar() == SCHEMA_VERSION
        conn.execute(insert(schema_version).values(version=SCHEMA_VERSION + 1, description="from the future",
                                                   applied_at=time.time()))
    with pytest.raises(InputError, match="newer modeltrace"):
        Store(db_url)


def test_enqueue_is_idempotent_per_revision(db_url):
    q = JobQueue(Store(db_url))
    a, new_a = q.enqueue("org/x", SHA, "webhook")
    b, new_b = q.enqueue("org/x", SHA, "api")
    c, new_c = q.enqueue("org/x", _sha(7), "webhook")
    assert new_a and not new_b and new_c and a == b != c
    assert q.counts()["queued"] == 2


def test_each_job_is_claimed_by_exactly_one_worker(db_url):
    store = Store(db_url)
    q = JobQueue(store, lease_s=60)
    for i in range(40):
        q.enqueue("org/many", _sha(i), "webhook")
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker() -> None:
        me = uuid.uuid4().hex
        while (job := q.claim(me)) is not None:
            with lock:
                claimed.append((me, job.id))
            q.complete(job)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [j for _, j in claimed]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 40
    assert q.counts() == {"queued": 0, "running": 0, "done": 40, "failed": 0}


def test_lease_runs_out_and_the_stale_worker_cannot_record(db_url):
    store = Store(db_url)
    q = JobQueue(store, lease_s=0.3)
    job_id, _ = q.enqueue("org/crash", SHA, "webhook")
    first = q.claim("crashed-worker")
    assert first is not None and first.id == job_id and first.attempts == 1
    assert q.claim("other") is None  # leased
    time.sleep(0.5)  # the first worker died: nobody renewed
    second = q.claim("other")
    assert second is not None and second.id == job_id and second.attempts == 2
    wrote = []
    with pytest.raises(LeaseLost):
        q.complete(first, lambda conn: wrote.append(1))
    with pytest.raises(LeaseLost):
        q.renew(first)
    assert wrote == []

    def result(conn) -> None:
        conn.execute(insert(results).values(job_id=second.id, repo_id="org/crash", commit_sha=SHA, index_name="x",
                                            created_at=time.time(), relation="independent", summary="s",
                                            contradicted=False, identify_json="{}", report_json="{}"))

    q.complete(second, result)
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(results)).scalar() == 1
        assert conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar() == "done"


def test_failing_job_is_retried_then_failed_with_its_reason(db_url):
    store = Store(db_url)
    q = JobQueue(store, lease_s=30, max_attempts=3, backoff_s=0.05)
    job_id, _ = q.enqueue("org/bad", SHA, "api")
    states = []
    for _ in range(3):
        job = None
        deadline = time.monotonic() + 5
        while job is None and time.monotonic() < deadline:
            job = q.claim("w")
            time.sleep(0.02)
        assert job is not None
        states.append(q.fail(job, f"hf://org/bad: repository not found (attempt {job.attempts})"))
    assert states == ["queued", "queued", "failed"]
    assert q.claim("w") is None
    with store.read() as conn:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one()
    assert row["state"] == "failed" and row["attempts"] == 3 and "attempt 3" in row["error"]


def test_worker_lost_on_its_last_attempt_fails_the_job(db_url):
    store = Store(db_url)
    q = JobQueue(store, lease_s=0.2, max_attempts=1)
    job_id, _ = q.enqueue("org/lost", SHA, "api")
    assert q.claim("dies") is not None
    with store.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(lease_until=time.time() - 1))
    assert q.claim("next") is None
    with store.read() as conn:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one()
    assert row["state"] == "failed" and "lost" in row["error"]


@pytest.mark.parametrize("url, msg", [
    ("mysql://u@h/db", "not supported"), ("sqlite:///:memory:", "in-memory"), ("not a url://x", "not a database"),
])
def test_bad_database_urls_are_one_line_errors(url, msg):
    with pytest.raises(InputError, match=msg) as exc:
        Store(url)
    assert "\n" not in str(exc.value)
