"""`modeltrace serve`: run the upload-time provenance service (modeltrace/service) under uvicorn.

Secrets come from options or the environment (MODELTRACE_WEBHOOK_SECRET, MODELTRACE_API_TOKEN,
MODELTRACE_ALERT_SECRET) and are never printed; the database URL is printed without its password.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from modeltrace.console import err, guarded

    @app.command("serve")
    @guarded
    def serve_cmd(
        index: Annotated[Path | None, typer.Option("--index", help="Fingerprint index every upload is identified "
                                                   "against and added to (default: $MODELTRACE_INDEX, else "
                                                   "~/.local/share/modeltrace/index.sqlite).",
                                                   show_default=False)] = None,
        db: Annotated[str | None, typer.Option("--db", help="Service database: an SQLite file or sqlite:///FILE "
                                               "(default: $MODELTRACE_DB, else ~/.local/share/modeltrace/"
                                               "service.sqlite), or postgresql://USER:PASSWORD@HOST/DB.",
                                               show_default=False)] = None,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
        webhook_secret: Annotated[str | None, typer.Option("--webhook-secret", help="Secret the Hub webhook sends "
                                                           "in X-Webhook-Secret (default: "
                                                           "$MODELTRACE_WEBHOOK_SECRET). Without one, webhooks "
                                                           "are refused.", show_default=False)] = None,
        workers: Annotated[int, typer.Option("--workers", min=0, max=64, help="Worker processes checking uploads "
                                             "(0: queue only, another instance on the same --db works).")] = 1,
        ray: Annotated[str | None, typer.Option("--ray", help="Run the checks' heavy parts as Ray tasks: ADDRESS "
                                                "`local` (a private instance), `auto` (this machine's cluster) or "
                                                "`ray://HEAD:10001`; --workers is then the number of jobs at once. "
                                                "Every node needs modeltrace and must see the models (hf:// always).",
                                                metavar="ADDRESS", show_default=False)] = None,
        poll_interval: Annotated[float, typer.Option("--poll-interval", min=0, help="Seconds between looks at "
                                                     "the watched repositories' heads (0: no polling).")] = 300.0,
        alert_url: Annotated[str | None, typer.Option("--alert-url", help="POST a JSON alert here when a model's "
                                                      "card is contradicted by its weights (retried; signed with "
                                                      "$MODELTRACE_ALERT_SECRET when set).",
                                                      show_default=False)] = None,
        public_url: Annotated[str, typer.Option("--public-url", help="Where users reach this service, for links "
                                                "in alerts.")] = "",
        sample: Annotated[float, typer.Option("--sample", min=0.0001, max=1.0, help="Fraction of rows the "
                                              "confirming audit reads of hf:// models.")] = 0.05,
        attempts: Annotated[int, typer.Option("--attempts", min=1, max=20, help="Tries per job before it is "
                                              "marked failed.")] = 3,
        lease: Annotated[float, typer.Option("--lease", min=1.0, help="Seconds a worker holds a job without "
                                             "renewing it; a crashed worker's job is taken over after this.")]
        = 60.0,
        backoff: Annotated[float, typer.Option("--backoff", min=0.0, help="Seconds before the first retry of a "
                                               "failed job (doubling after each).")] = 2.0,
    ) -> None:
        """Run the provenance service: Hub webhooks and a JSON API queue every new revision; workers fingerprint,
        identify, audit and card-audit it; pages show verdicts, evidence, history and reports.

        Writes (POST /api/models, /api/watch) need MODELTRACE_API_TOKEN as a Bearer token.

        Example: MODELTRACE_API_TOKEN=... modeltrace serve --index team.sqlite --webhook-secret S --port 8000
        """
        from modeltrace.errors import InputError

        try:
            import uvicorn

            from modeltrace.service.app import ServiceConfig, create_app
        except ImportError as exc:
            raise InputError(f"the service needs its extra: pip install 'modeltrace[service]' ({exc.name} is "
                             "missing)") from None
        from modeltrace.index import default_index_path
        from modeltrace.service.store import Store, default_db_url, safe_url
        from modeltrace.service.worker import Settings

        if workers and ray is not None and workers > 8:
            raise InputError("--ray runs at most 8 job threads in this process (--workers 1..8)")
        if alert_url is not None and not alert_url.startswith(("http://", "https://")):
            raise InputError("--alert-url must be an http:// or https:// address")
        db_url = db or default_db_url()
        Store(db_url).close()  # bad URL, unreachable server or newer schema: one line now, not at the first request
        index_path = str((index or default_index_path()).expanduser().resolve())
        settings = Settings(db_url=db_url, index_path=index_path, sample=sample, lease_s=lease, max_attempts=attempts,
                            backoff_s=backoff, alerts=alert_url is not None, public_url=public_url,
                            ray=ray is not None, address=None if ray in (None, "local") else ray)
        token = os.environ.get("MODELTRACE_API_TOKEN") or None
        secret = webhook_secret or os.environ.get("MODELTRACE_WEBHOOK_SECRET") or None
        config = ServiceConfig(settings=settings, workers=workers, api_token=token, webhook_secret=secret,
                               poll_interval=poll_interval, alert_url=alert_url,
                               alert_secret=os.environ.get("MODELTRACE_ALERT_SECRET") or None)
        err.print(f"modeltrace serve: http://{host}:{port}  db {safe_url(db_url)}  index {index_path}  "
                  f"{'Ray' if ray is not None else 'workers'} {workers}", markup=False, highlight=False)
        if not token:
            err.print("warning: MODELTRACE_API_TOKEN is not set: the write API is disabled", markup=False)
        if not secret:
            err.print("warning: no webhook secret (--webhook-secret or MODELTRACE_WEBHOOK_SECRET): Hub webhooks "
                      "are refused", markup=False)
        uvicorn.run(create_app(config), host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
