"""`modeltrace serve`: an upload-time provenance service (FastAPI + uvicorn; `pip install 'modeltrace[service]'`).

Data flow: Hub webhooks, the JSON API and the watch-list poller (hub.py, app.py) queue one job per new revision in
the service database (store.py: SQLite or PostgreSQL; queue.py: durable, leased); workers (worker.py: local processes
or Ray) fingerprint, identify, audit and card-audit each revision with modeltrace's own functions and record the
result and, when the card is contradicted, an alert (alerts.py); the pages (pages.py) and the API show verdicts,
evidence, reports and each repository's history (history.py).

Submodules import their dependencies themselves, so a worker process does not load the web framework.
"""
