"""The web service (FastAPI): Hub webhooks in, a JSON API, the pages; workers, the poller and alerts run alongside.

Data flow: `POST /webhooks/hub` (secret checked, payload parsed by hub.py) and `POST /api/models` (API token) queue
one job per new revision (queue.py); workers (worker.py) turn jobs into results; `GET /api/...` and the pages
(pages.py) read results and a repository's history (history.py); reports download in every format modeltrace
renders. `create_app(config)` builds the app; its lifespan opens the database (store.py, migrations applied) and
starts and stops the workers, the watch-list poller and the alert sender. OpenAPI docs: /docs, /openapi.json.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import delete, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from modeltrace import __version__
from modeltrace.errors import InputError, ModelTraceError, RemoteError
from modeltrace.service import history as hist
from modeltrace.service import hub, pages
from modeltrace.service.queue import JobQueue
from modeltrace.service.store import Store, jobs, repos, results
from modeltrace.service.worker import Settings

__all__ = ["ServiceConfig", "create_app"]

log = logging.getLogger("modeltrace.service")
MAX_WEBHOOK_BYTES = 1 << 20
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; script-src 'nonce-{nonce}'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
REPORT_FORMATS = {"json": ("json", "application/json"), "html": ("html", "text/html; charset=utf-8"),
                  "cdx.json": ("cyclonedx", "application/vnd.cyclonedx+json"),
                  "spdx.json": ("spdx", "application/spdx+json"), "md": ("md", "text/markdown; charset=utf-8")}


@dataclass(frozen=True)
class ServiceConfig:
    settings: Settings
    workers: int = 1
    api_token: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    poll_interval: float = 300.0
    alert_url: str | None = field(default=None, repr=False)
    alert_secret: str | None = field(default=None, repr=False)


class Submit(BaseModel):
    repo: str = Field(max_length=300, description="owner/name, hf://owner/name or a huggingface.co URL")
    revision: str = Field("main", max_length=200, description="branch, tag or commit sha")


class Watch(BaseModel):
    repos: list[str] = Field(max_length=1000)


def create_app(config: ServiceConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from modeltrace.service.worker import start_workers

        store = Store(config.settings.db_url)
        queue = JobQueue(store, lease_s=config.settings.lease_s, max_attempts=config.settings.max_attempts,
                         backoff_s=config.settings.backoff_s)
        app.state.store, app.state.queue = store, queue
        running: list[Any] = [start_workers(config.settings, config.workers)]
        if config.poll_interval > 0:
            running.append(hub.Poller(store, queue, config.poll_interval))
            running[-1].start()
        if config.alert_url:
            from modeltrace.service.alerts import AlertSender

            running.append(AlertSender(store, config.alert_url, config.alert_secret))
            running[-1].start()
        try:
            yield
        finally:
            for r in reversed(running):
                r.stop()
            store.close()

    app = FastAPI(title="modeltrace service", version=__version__, lifespan=lifespan,
                  description="Provenance of every upload: Hub webhooks in, verdicts, history and reports out.")

    @app.exception_handler(ModelTraceError)
    async def _library_error(_request: Request, exc: ModelTraceError) -> JSONResponse:
        status = 502 if isinstance(exc, RemoteError) else 422
        return JSONResponse({"detail": str(exc).splitlines()[0][:500]}, status_code=status)

    def store_of(request: Request) -> Store:
        return request.app.state.store

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if not config.api_token:
            raise HTTPException(403, "writes are disabled: start the service with MODELTRACE_API_TOKEN set")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "an API token is required (Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), config.api_token.encode()):
            raise HTTPException(403, "wrong API token")

    def html(body_fn, status: int = 200) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        return HTMLResponse(body_fn(nonce), status_code=status,
                            headers={"Content-Security-Policy": CSP.format(nonce=nonce),
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    # ---- writes ------------------------------------------------------------------------------------------------
    @app.post("/webhooks/hub", status_code=202, tags=["hub"])
    async def webhook(request: Request, x_webhook_secret: Annotated[str | None, Header()] = None) -> JSONResponse:
        """A Hugging Face Hub webhook (repo created, new commit). The secret comes in `X-Webhook-Secret`."""
        refused = hub.check_secret(config.webhook_secret, x_webhook_secret)
        if refused is not None:
            raise HTTPException(refused, "missing webhook secret" if refused == 401 else "wrong webhook secret")
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BYTES:
            raise HTTPException(413, "payload too large")
        try:
            payload = hub.HubWebhook.model_validate(json.loads(body))
        except (ValueError, ValidationError) as exc:
            raise HTTPException(422, f"not a Hub webhook payload ({type(exc).__name__})") from None
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_queue_webhook, request.app.state.queue, payload)

    def _queue_webhook(queue: JobQueue, payload: hub.HubWebhook) -> JSONResponse:
        repo_id, revs, why = hub.revisions(payload)
        if not revs:
            return JSONResponse({"queued": [], "duplicates": [], "ignored": why}, status_code=200)
        queued, dups = [], []
        for rev in revs:
            sha = hub.resolve_commit(repo_id, rev)
            job_id, new = queue.enqueue(repo_id, sha, "webhook")
            (queued if new else dups).append({"job": job_id, "repo": repo_id, "revision": sha})
        return JSONResponse({"queued": queued, "duplicates": dups, "ignored": None}, status_code=202)

    @app.post("/api/models", status_code=202, dependencies=[Depends(require_token)], tags=["api"])
    def submit(body: Submit, request: Request) -> dict[str, Any]:
        """Check one revision of a model repository (a branch is resolved to its commit first)."""
        repo_id = hub.parse_repo(body.repo)
        sha = hub.resolve_commit(repo_id, hub.check_revision(body.revision))
        job_id, new = request.app.state.queue.enqueue(repo_id, sha, "api")
        return {"job": job_id, "repo": repo_id, "revision": sha, "new": new}

    @app.post("/api/watch", dependencies=[Depends(require_token)], tags=["api"])
    def watch(body: Watch, request: Request) -> dict[str, Any]:
        """Add repositories to the watch-list: their new commits are found by polling the Hub."""
        import time

        ids = list(dict.fromkeys(hub.parse_repo(r) for r in body.repos))
        store = store_of(request)
        ins = postgresql.insert(repos) if store.dialect == "postgresql" else sqlite.insert(repos)
        with store.write() as conn:
            for rid in ids:
                conn.execute(ins.values(repo_id=rid, watched=True, added_at=time.time())
                             .on_conflict_do_update(index_elements=["repo_id"], set_={"watched": True}))
        return {"watching": ids}

    @app.delete("/api/watch/{owner}/{name}", dependencies=[Depends(require_token)], tags=["api"])
    def unwatch(owner: str, name: str, request: Request) -> dict[str, Any]:
        repo_id = hub.parse_repo(f"{owner}/{name}")
        with store_of(request).write() as conn:
            n = conn.execute(delete(repos).where(repos.c.repo_id == repo_id)).rowcount
        if not n:
            raise HTTPException(404, f"{repo_id} is not watched")
        return {"removed": repo_id}

    # ---- reads -------------------------------------------------------------------------------------------------
    @app.get("/api/watch", tags=["api"])
    def watched(request: Request) -> list[dict[str, Any]]:
        with store_of(request).read() as conn:
            rows = conn.execute(select(repos).where(repos.c.watched).order_by(repos.c.repo_id)).mappings().all()
        return [dict(r) for r in rows]

    @app.get("/api/jobs/{job_id}", tags=["api"])
    def job(job_id: int, request: Request) -> dict[str, Any]:
        with store_of(request).read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
            res = conn.execute(select(results.c.id).where(results.c.job_id == job_id)).scalar()
        if row is None:
            raise HTTPException(404, f"no job {job_id}")
        return _job_dict(row) | {"result": res}

    @app.get("/api/jobs", tags=["api"])
    def job_list(request: Request, state: Annotated[str | None, Query(pattern="^(queued|running|done|failed)$")]
                 = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        q = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if state:
            q = q.where(jobs.c.state == state)
        with store_of(request).read() as conn:
            rows = conn.execute(q).mappings().all()
        return {"counts": request.app.state.queue.counts(), "jobs": [_job_dict(r) for r in rows]}

    @app.get("/api/results", tags=["api"])
    def result_list(request: Request, after: Annotated[int, Query(ge=0)] = 0,
                    q: Annotated[str, Query(max_length=200)] = "",
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
        """Newest results first; `after=ID` only those newer than ID (what the page polls), `q` a search."""
        return _recent(store_of(request), after, q, limit)

    @app.get("/api/results/{result_id}", tags=["api"])
    def result(result_id: int, request: Request) -> dict[str, Any]:
        row = _result_row(store_of(request), result_id)
        out = _result_dict(row)
        out.update(identify=json.loads(row["identify_json"]), findings=json.loads(row["report_json"])["findings"])
        return out

    @app.get("/api/results/{result_id}/report.{ext}", tags=["api"])
    def report(result_id: int, ext: str, request: Request) -> Response:
        """The report of one result, as JSON, HTML, CycloneDX 1.6, SPDX 3.0.1 or Markdown."""
        from modeltrace.report import formats
        from modeltrace.report.model import parse_report

        if ext not in REPORT_FORMATS:
            raise HTTPException(404, f"no report format .{ext}; choose {', '.join(REPORT_FORMATS)}")
        row = _result_row(store_of(request), result_id)
        fmt, media = REPORT_FORMATS[ext]
        text = row["report_json"] if fmt == "json" else formats.render(parse_report(row["report_json"]), fmt)
        name = f"{row['repo_id'].replace('/', '--')}-{row['commit_sha'][:12]}.{ext}"
        headers = {"Content-Disposition": f'inline; filename="{name}"', "X-Content-Type-Options": "nosniff"}
        if fmt == "html":
            headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
        return Response(text, media_type=media, headers=headers)

    @app.get("/api/models/{owner}/{name}", tags=["api"])
    def history(owner: str, name: str, request: Request) -> dict[str, Any]:
        """Every checked revision of a repository, numbered, with what it is in one sentence."""
        repo_id = hub.parse_repo(f"{owner}/{name}")
        with store_of(request).read() as conn:
            revs = hist.load_history(conn, repo_id)
        if not revs:
            raise HTTPException(404, f"no checked revision of {repo_id}")
        return {"repo": repo_id, "revisions": [{
            "revision": r.number, "commit": r.commit_sha, "result": r.result_id, "relation": r.relation,
            "method": r.method, "summary": r.summary, "contradicted": r.contradicted,
            "lineage": hist.lineage(revs, r), "parents": [n for n, _role, _s in r.parents()]} for r in revs]}

    @app.get("/api/models/{owner}/{name}/diff", tags=["api"])
    def diff(owner: str, name: str, request: Request, a: Annotated[str, Query(max_length=64)],
             b: Annotated[str, Query(max_length=64)]) -> dict[str, Any]:
        """What changed between two revisions (their numbers or commit shas)."""
        repo_id = hub.parse_repo(f"{owner}/{name}")
        with store_of(request).read() as conn:
            revs = hist.load_history(conn, repo_id)
        return hist.diff(_pick(revs, a), _pick(revs, b))

    @app.get("/healthz", tags=["api"])
    def health(request: Request) -> dict[str, Any]:
        return {"ok": True, "version": __version__, "schema": request.app.state.store.version(),
                "queue": request.app.state.queue.counts()}

    # ---- pages -------------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request, q: Annotated[str, Query(max_length=200)] = "") -> HTMLResponse:
        store = store_of(request)
        rows = _recent(store, 0, q, 100)
        with store.read() as conn:
            failed = conn.execute(select(jobs).where(jobs.c.state == "failed").order_by(jobs.c.id.desc()).limit(10)
                                  ).mappings().all()
        fails = [{"repo": f["repo_id"], "revision": f["revision"], "attempts": f["attempts"], "error": f["error"]}
                 for f in failed]
        counts = request.app.state.queue.counts()
        return html(lambda nonce: pages.home(rows, counts, fails, q, nonce))

    @app.get("/models/{owner}/{name}", response_class=HTMLResponse, include_in_schema=False)
    def model(owner: str, name: str, request: Request, a: str | None = None, b: str | None = None) -> HTMLResponse:
        try:
            repo_id = hub.parse_repo(f"{owner}/{name}")
        except InputError as exc:
            why = str(exc)
            return html(lambda nonce: pages.not_found(why, nonce), 404)
        with store_of(request).read() as conn:
            revs = hist.load_history(conn, repo_id)
            js = conn.execute(select(jobs).where(jobs.c.repo_id == repo_id).order_by(jobs.c.id)).mappings().all()
        if not revs and not js:
            return html(lambda nonce: pages.not_found(f"{repo_id} has not been checked", nonce), 404)
        d = hist.diff(_pick(revs, a), _pick(revs, b)) if a and b and revs else None
        jl = [{"revision": j["revision"], "state": j["state"], "error": j["error"]} for j in js]
        return html(lambda nonce: pages.model_page(repo_id, revs, jl, d, nonce))

    return app


def _job_dict(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "repo": row["repo_id"], "revision": row["revision"], "source": row["source"],
            "state": row["state"], "attempts": row["attempts"], "max_attempts": row["max_attempts"],
            "created_at": row["created_at"], "started_at": row["started_at"], "finished_at": row["finished_at"],
            "error": row["error"]}


def _result_dict(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "job": row["job_id"], "repo": row["repo_id"], "revision": row["commit_sha"],
            "relation": row["relation"], "method": row["method"], "summary": row["summary"],
            "contradicted": bool(row["contradicted"]), "worst": row["worst"], "created_at": row["created_at"],
            "index_name": row["index_name"]}


def _recent(store: Store, after: int, q: str, limit: int) -> list[dict[str, Any]]:
    cols = [c for c in results.c if c.name not in ("identify_json", "report_json")]
    query = select(*cols).where(results.c.id > after).order_by(results.c.id.desc()).limit(limit)
    words = q.strip().lower().split()[:5]
    for w in words:
        like = "%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(or_(results.c.repo_id.ilike(like, escape="\\"), results.c.summary.ilike(like, escape="\\"),
                                results.c.relation.ilike(like, escape="\\")))
    with store.read() as conn:
        return [_result_dict(r) for r in conn.execute(query).mappings().all()]


def _result_row(store: Store, result_id: int) -> Any:
    with store.read() as conn:
        row = conn.execute(select(results).where(results.c.id == result_id)).mappings().first()
    if row is None:
        raise HTTPException(404, f"no result {result_id}")
    return row


def _pick(revs: list[hist.Revision], which: str) -> hist.Revision:
    for r in revs:
        if which == str(r.number) or (len(which) >= 7 and r.commit_sha.startswith(which.lower())):
            return r
    raise HTTPException(404, f"no checked revision {which!r:.80}")
