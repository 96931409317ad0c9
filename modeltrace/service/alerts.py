"""Alerts: an outgoing webhook (JSON POST) when a model's card is contradicted by its weights.

Data flow: a worker writes the alert row (store.alerts, state `pending`) in the transaction that records the result,
so an alert is never lost with a crash; the `AlertSender` thread of the service takes due alerts (a compare-and-set
on the row, so two service instances do not both send one), POSTs the payload to `--alert-url` and marks it `sent`
on a 2xx answer, else retries with exponential back-off (Retry-After honoured) and marks it `failed` with the last
reason after `max_attempts`. With `MODELTRACE_ALERT_SECRET` set, each POST carries
`X-Modeltrace-Signature: sha256=<HMAC-SHA256 of the body>`. The URL and the secret are never logged or shown.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from modeltrace import __version__
from modeltrace.service.store import Store, alerts

if TYPE_CHECKING:
    from modeltrace.service.analysis import Analysis

__all__ = ["AlertSender", "alert_payload"]

log = logging.getLogger("modeltrace.service")
EVENT = "modeltrace.card_contradicted"


def alert_payload(result_id: int, a: Analysis, public_url: str) -> dict[str, Any]:
    base = public_url.rstrip("/")
    findings = [{k: f[k] for k in ("code", "severity", "category", "title", "detail")} for f in a.findings
                if f["severity"] in ("critical", "high", "medium")]
    return {"event": EVENT, "repo": a.repo_id, "revision": a.commit_sha, "relation": a.relation, "method": a.method,
            "summary": a.summary, "findings": findings, "result_id": result_id,
            "page": f"{base}/models/{a.repo_id}" if base else f"/models/{a.repo_id}",
            "report": f"{base}/api/results/{result_id}/report.json" if base else None}


class AlertSender:
    def __init__(self, store: Store, url: str, secret: str | None = None, max_attempts: int = 8,
                 backoff_s: float = 5.0, timeout_s: float = 10.0, idle_s: float = 1.0) -> None:
        self.store, self.url, self.secret = store, url, secret
        self.max_attempts, self.backoff_s, self.timeout_s, self.idle_s = max_attempts, backoff_s, timeout_s, idle_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="modeltrace-alerts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout_s + 5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.send_due()
            except Exception as exc:  # noqa: BLE001 - survive a database hiccup
                log.warning("alert round failed: %s", type(exc).__name__)
                busy = False
            if not busy:
                self._stop.wait(self.idle_s)

    def send_due(self) -> bool:
        """Send every due alert once; whether any was due."""
        now = time.time()
        with self.store.read() as conn:
            due = conn.execute(select(alerts.c.id, alerts.c.attempts, alerts.c.payload_json)
                               .where(alerts.c.state == "pending", alerts.c.next_try <= now)
                               .order_by(alerts.c.id).limit(20)).all()
        for alert_id, attempts, body in due:
            with self.store.write() as conn:  # take it: nobody else sends it while this attempt runs
                n = conn.execute(update(alerts).where(alerts.c.id == alert_id, alerts.c.attempts == attempts,
                                                      alerts.c.state == "pending")
                                 .values(attempts=attempts + 1, next_try=time.time() + 2 * self.timeout_s + 5))
                if n.rowcount != 1:
                    continue
            ok, error, retry_after = self._post(body.encode())
            values: dict[str, Any]
            if ok:
                values = {"state": "sent", "sent_at": time.time(), "last_error": None}
            elif attempts + 1 >= self.max_attempts:
                values = {"state": "failed", "last_error": error}
            else:
                wait = retry_after if retry_after is not None else self.backoff_s * 2 ** attempts
                values = {"next_try": time.time() + min(wait, 3600.0), "last_error": error}
            with self.store.write() as conn:
                conn.execute(update(alerts).where(alerts.c.id == alert_id).values(**values))
            log.info("alert %s attempt %s: %s", alert_id, attempts + 1, "sent" if ok else error)
        return bool(due)

    def _post(self, body: bytes) -> tuple[bool, str | None, float | None]:
        headers = {"Content-Type": "application/json", "User-Agent": f"modeltrace/{__version__}",
                   "X-Modeltrace-Event": EVENT}
        if self.secret:
            sig = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Modeltrace-Signature"] = f"sha256={sig}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - operator's URL
                resp.read(1024)
                return 200 <= resp.status < 300, None if 200 <= resp.status < 300 else f"HTTP {resp.status}", None
        except urllib.error.HTTPError as exc:
            return False, f"HTTP {exc.code}", _retry_after(exc.headers.get("Retry-After"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return False, f"cannot deliver ({type(reason).__name__})", None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
