"""Workers: take a job from the queue, find out what the uploaded revision is, record the result.

Data flow of one job (`analyse`, with modeltrace's own functions, as the CLI runs them):
  hf://repo@sha -> fingerprint (fingerprint.make_fingerprint; a Ray task with --ray, as `scan` does)
  -> identify against the index (identify.identify) -> add to the index under `repo@sha12` (index.Index.add)
  -> when ancestors are found (or the content is already indexed): the confirming audit on the weights against
     them (audit.run_audit, sampled for hf:// sources; the streaming pass on Ray with --ray) and its verdict
     (verdict.decide), else the model card alone (report.build.inspect_subject)
  -> the card audit against what the weights show (report.build.audit_subject) -> one report (report.model.Report)
  -> `Analysis`, written with the job's completion in one transaction (queue.complete).

`--workers N` runs N worker processes (each a loop of claim, analyse, complete), which exit when the service
process is gone; `--ray ADDRESS` runs the loops as threads of the service whose heavy parts are Ray tasks. A worker
renews its lease while it works; an error ends the attempt with its one-line reason (queue.fail retries it later).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert

from modeltrace.errors import ModelTraceError
from modeltrace.service.analysis import Analysis
from modeltrace.service.queue import Job, JobQueue, LeaseLost
from modeltrace.service.store import Store, alerts, results

__all__ = ["Analysis", "Settings", "Worker", "analyse", "start_workers"]

log = logging.getLogger("modeltrace.service")
#: findings of these gate classes (medium and above) mean the card is contradicted by the weights: an alert
ALERT_GATES = ["undisclosed", "license"]


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs (picklable: it is handed to worker processes)."""

    db_url: str
    index_path: str
    sample: float | None = 0.05  # fraction of rows the confirming audit reads of hf:// models
    lease_s: float = 60.0
    max_attempts: int = 3
    backoff_s: float = 2.0
    idle_s: float = 0.5  # wait between looks at an empty queue
    alerts: bool = False  # write an alert when a card is contradicted (alerts.py delivers it)
    public_url: str = ""  # where the service's pages are, for links in alerts
    ray: bool = False
    address: str | None = None


def _fingerprint(spec: str, name: str, settings: Settings):
    from modeltrace.fingerprint import Fingerprint
    from modeltrace.fingerprint.core import make_fingerprint

    if not settings.ray:
        return make_fingerprint(spec, label=name)
    from modeltrace.scan import fingerprints

    outcome = next(iter(fingerprints([spec], ray=True, address=settings.address)))
    if not outcome.ok:
        raise ModelTraceError(outcome.error)
    fp = Fingerprint.from_bytes(outcome.value[0])
    fp.model["label"] = name
    return fp


def _audit_targets(ident: dict[str, Any], specs: dict[str, str]) -> tuple[list[str], str | None]:
    """(candidate specs, base spec) for the confirming audit: the indexed model with the same content, else the
    parents and base identify found, else the related models it ranked."""
    if ident.get("identical") in specs:  # the same content is indexed: confirm the copy on the weights
        return [specs[ident["identical"]]], None
    hits = ident.get("hits") or []
    base = next((h["spec"] for h in hits if h["role"] == "base"), None)
    parents = [h["spec"] for h in hits if h["role"] == "parent"]
    if not parents:
        parents = [h["spec"] for h in hits if h["role"] not in ("unrelated", "base", "descendant")][:3]
    return parents, base


def analyse(repo_id: str, sha: str, settings: Settings) -> Analysis:
    from modeltrace.index import Index
    from modeltrace.report.build import new_report
    from modeltrace.report.gate import tripped

    spec = f"hf://{repo_id}@{sha}"
    name = f"{repo_id}@{sha[:12]}"
    fp = _fingerprint(spec, name, settings)
    with Index(settings.index_path, create=True) as ix:
        if ix.count():
            from modeltrace.identify import identify

            ident = identify(fp, ix, top=8)
        else:
            ident = {"relation": "independent", "summary": "the index was empty: nothing to compare with",
                     "hits": [], "identical": None}
        specs = {e.name: e.spec for e in ix.entries()} if ident.get("identical") else {}
        added = ix.add(fp, name)
    cands, base = _audit_targets(ident, specs)
    if cands:
        subject, findings, verdict = _audit(spec, cands, base, settings)
        relation, method, summary = verdict["relation"], verdict.get("method"), verdict.get("summary") or ""
        report = new_report("audit", [subject], findings, argv=["serve", spec])
    else:
        subject, findings = _card_only(spec, name)
        relation, method, summary = "independent", None, ident.get("summary") or "no ancestor in the index"
        report = new_report("inspect", [subject], findings, argv=["serve", spec])
    report.subjects[0].identify = ident
    bad = tripped(report, ALERT_GATES)
    summary = re.sub(r"@([0-9a-f]{12})[0-9a-f]{28}\b", r"@\1", summary)  # commits as on the Hub's pages
    return Analysis(repo_id=repo_id, commit_sha=sha, spec=spec,
                    index_name=added.name, content_hash=fp.content_hash, relation=relation, method=method,
                    summary=summary, contradicted=bool(bad), worst=report.worst(),
                    identify=json.loads(json.dumps(ident, default=str)), report_json=report.to_json(),
                    findings=[f.model_dump() for f in report.findings])


def _audit(spec: str, cands: list[str], base: str | None, settings: Settings) -> tuple[Any, list, dict]:
    from modeltrace.audit import DEFAULT_AUDIT_CHUNK, run_audit
    from modeltrace.recipe import to_mergekit, to_yaml
    from modeltrace.report.build import audit_parameters, audit_subject
    from modeltrace.sources.base import recording_remote_ranges
    from modeltrace.verdict import decide

    remote = any(s.startswith("hf://") for s in [spec, *cands, *([base] if base else [])])
    sample = settings.sample if remote else None
    with recording_remote_ranges():
        run = run_audit(spec, cands, base=base, sample=sample, ray=settings.ray, address=settings.address)
    verdict = decide(run)
    cfg = to_mergekit(verdict, verdict["sources"])
    verdict["mergekit_yaml"] = to_yaml(cfg) if cfg else None
    params = audit_parameters(cands, base, sample, DEFAULT_AUDIT_CHUNK, False, False)
    subject, findings = audit_subject(run, verdict, params)
    return subject, findings, verdict


def _card_only(spec: str, name: str) -> tuple[Any, list]:
    from modeltrace.describe import describe
    from modeltrace.report.build import inspect_subject
    from modeltrace.sources import open_source
    from modeltrace.sources.base import recording_remote_ranges

    with recording_remote_ranges(), open_source(spec) as src:
        d = describe(src)
        return inspect_subject(name, spec, d, src)


def record(conn: Connection, job: Job, a: Analysis, settings: Settings) -> None:
    """The result row (and its alert when the card is contradicted), in the transaction that closes the job."""
    rid = conn.execute(insert(results).values(
        job_id=job.id, repo_id=a.repo_id, commit_sha=a.commit_sha, index_name=a.index_name,
        content_hash=a.content_hash, created_at=time.time(), relation=a.relation, method=a.method,
        summary=a.summary, contradicted=a.contradicted, worst=a.worst, identify_json=json.dumps(a.identify),
        report_json=a.report_json).returning(results.c.id)).scalar_one()
    if a.contradicted and settings.alerts:
        from modeltrace.service.alerts import alert_payload

        payload = alert_payload(rid, a, settings.public_url)
        conn.execute(insert(alerts).values(result_id=rid, payload_json=json.dumps(payload), state="pending",
                                           attempts=0, next_try=time.time(), created_at=time.time()))


def one_line(exc: BaseException) -> str:
    if isinstance(exc, ModelTraceError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"internal error: {type(exc).__name__}: {msg}"[:500]


class Worker:
    """One loop of claim, analyse, record (a worker process's main loop, or a thread with --ray)."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store(settings.db_url)
        self.queue = JobQueue(self.store, lease_s=settings.lease_s, max_attempts=settings.max_attempts,
                              backoff_s=settings.backoff_s)
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                job = self.queue.claim(self.owner)
            except Exception as exc:  # noqa: BLE001 - the database restarting must not end the worker
                log.warning("claim failed: %s", one_line(exc))
                stop.wait(2.0)
                continue
            if job is None:
                stop.wait(self.settings.idle_s)
                continue
            self.run_job(job)

    def run_job(self, job: Job) -> None:
        done = threading.Event()
        renew = threading.Thread(target=self._renew, args=(job, done), daemon=True)
        renew.start()
        try:
            a = analyse(job.repo_id, job.revision, self.settings)
        except BaseException as exc:  # noqa: BLE001 - every failure is this attempt's reason
            done.set()
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            try:
                state = self.queue.fail(job, one_line(exc))
                log.info("job %s (%s) attempt %s: %s -> %s", job.id, job.key, job.attempts, one_line(exc), state)
            except LeaseLost:
                pass
            return
        finally:
            done.set()
        try:
            self.queue.complete(job, lambda conn: record(conn, job, a, self.settings))
            log.info("job %s (%s): %s", job.id, job.key, a.relation)
        except LeaseLost:
            log.warning("job %s: lease lost; its result is left to the worker that took it over", job.id)

    def _renew(self, job: Job, done: threading.Event) -> None:
        while not done.wait(self.settings.lease_s / 3):
            try:
                self.queue.renew(job)
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 - try again at the next beat
                log.warning("lease renewal failed: %s", one_line(exc))


#: Scheduling priority of job worker processes relative to the service's API (higher = yields more).
WORKER_NICENESS = 10


def _process_main(settings: Settings, parent: int) -> None:
    """A worker process: the loop, ended when the service process that started it is gone (killed included)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(message)s")
    # Jobs yield the CPU to the API process: accepting a webhook must stay fast (p99 < 100 ms) while a job reads and
    # fits on the same cores (measured on 2 cores: p99 250-850 ms at equal priority).
    with contextlib.suppress(OSError, AttributeError):
        os.nice(WORKER_NICENESS)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            if os.getppid() != parent:
                os._exit(0)  # orphaned: the job's lease runs out and a new service takes the job

    threading.Thread(target=watch, daemon=True).start()
    try:
        Worker(settings).run(stop)
    except KeyboardInterrupt:
        pass


class Workers:
    """The running workers of a service: processes, or threads with --ray."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.threads: list[threading.Thread] = []
        self.stop_event = threading.Event()

    def stop(self) -> None:
        self.stop_event.set()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        for t in self.threads:
            t.join(timeout=10)


def start_workers(settings: Settings, n: int) -> Workers:
    w = Workers()
    if n <= 0:
        return w
    if settings.ray:
        for i in range(n):
            t = threading.Thread(target=Worker(settings).run, args=(w.stop_event,), name=f"modeltrace-worker-{i}",
                                 daemon=True)
            t.start()
            w.threads.append(t)
        return w
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for i in range(n):
        p = ctx.Process(target=_process_main, args=(settings, os.getpid()), name=f"modeltrace-worker-{i}",
                        daemon=True)
        p.start()
        w.procs.append(p)
    return w
