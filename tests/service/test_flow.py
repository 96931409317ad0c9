"""Uploads through one real service (uvicorn on 127.0.0.1, the Hub stand-in, a seeded index): a merge upload ends
with its verdict and an alert, reports download in every format, a watched repository's new revisions are found by
polling and told apart in its history, failing jobs are retried then failed with their reason, duplicate deliveries
are ignored."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hubserver import commit_sha

from tests.service.harness import SECRET, TOKEN, wait_for, webhook

ALERT_SECRET = "alert-signing-secret-42"


class AlertReceiver(ThreadingHTTPServer):
    """Records alert POSTs; answers 500 to the first one (the sender must retry), then 200."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _AlertHandler)
        self.received: list[tuple[dict, bytes, int]] = []
        self.fail_first = 1


class _AlertHandler(BaseHTTPRequestHandler):
    server: AlertReceiver

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = 500 if self.server.fail_first > 0 else 200
        self.server.fail_first -= 1
        self.server.received.append((dict(self.headers), body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def alerts():
    srv = AlertReceiver()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def svc(shared_service, alerts):
    return shared_service(["--alert-url", f"http://127.0.0.1:{alerts.server_address[1]}/hook", "--poll-interval",
                           "0.3", "--attempts", "3"], {"MODELTRACE_ALERT_SECRET": ALERT_SECRET})


def test_merge_upload_ends_with_its_verdict_and_an_alert(svc, alerts):
    sub = svc.submit("org/rio")
    assert sub["revision"] == commit_sha("org/rio", "main") and sub["new"] is True
    job = svc.wait_job(sub["job"])
    assert job["state"] == "done" and job["attempts"] == 1, job
    status, res = svc.call("GET", f"/api/results/{job['result']}")
    assert status == 200
    assert res["relation"] == "merge" and res["method"] == "linear", res
    parents = {h["model"] for h in res["identify"]["hits"] if h["role"] == "parent"}
    assert parents == {"ft_a1", "ft_a2"}
    assert "undisclosed-merge" in {f["code"] for f in res["findings"]} and res["contradicted"] is True
    # the alert: refused once (500), retried, delivered, signed
    ok = wait_for(lambda: [r for r in alerts.received if r[2] == 200], 30, "the alert to be delivered")
    headers, body, _ = ok[0]
    assert len([r for r in alerts.received if r[2] == 500]) == 1
    payload = json.loads(body)
    assert payload["event"] == "modeltrace.card_contradicted" and payload["repo"] == "org/rio"
    assert payload["relation"] == "merge" and payload["result_id"] == res["id"]
    assert any(f["code"] == "undisclosed-merge" for f in payload["findings"])
    sig = {k.lower(): v for k, v in headers.items()}["x-modeltrace-signature"]
    assert sig == "sha256=" + hmac.new(ALERT_SECRET.encode(), body, hashlib.sha256).hexdigest()


def test_reports_download_in_every_format(svc):
    res = svc.call("GET", "/api/results?q=org/rio")[1]
    assert res and res[0]["repo"] == "org/rio"
    rid = res[0]["id"]
    status, doc = svc.call("GET", f"/api/results/{rid}/report.json")
    assert status == 200 and doc["document"] == "modeltrace-report" and doc["command"] == "audit"
    assert doc["subjects"][0]["audit"]["relation"] == "merge" and doc["subjects"][0]["identify"]["hits"]
    status, page = svc.call("GET", f"/api/results/{rid}/report.html")
    assert status == 200 and page.startswith("<!doctype html>") and "Merge of existing models" in page
    status, bom = svc.call("GET", f"/api/results/{rid}/report.cdx.json")
    assert status == 200 and bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    status, spdx = svc.call("GET", f"/api/results/{rid}/report.spdx.json")
    assert status == 200 and "spdx" in json.dumps(spdx["@context"]).lower()
    assert svc.call("GET", f"/api/results/{rid}/report.exe")[0] == 404
    assert svc.call("GET", "/api/results/999999/report.json")[0] == 404


def test_watched_repository_history_and_diff(svc, hub):
    hub.heads["org/history"] = "r1"  # main: a copy of the known ft_a1
    status, got = svc.call("POST", "/api/watch", {"repos": ["https://huggingface.co/org/history"]},
                           {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and got["watching"] == ["org/history"]
    r1 = commit_sha("org/history", "r1")
    wait_for(lambda: any(j["revision"] == r1 and j["state"] == "done" for j in svc.call("GET", "/api/jobs")[1]["jobs"]),
             120, "revision 1 to be found by polling and checked")
    hub.heads["org/history"] = "r2"  # a new commit on main: a linear merge of ft_a1 and ft_a2
    r2 = commit_sha("org/history", "r2")
    wait_for(lambda: any(j["revision"] == r2 and j["state"] == "done" for j in svc.call("GET", "/api/jobs")[1]["jobs"]),
             120, "revision 2 to be found by polling and checked")
    status, h = svc.call("GET", "/api/models/org/history")
    assert status == 200 and [r["commit"] for r in h["revisions"]] == [r1, r2]
    one, two = h["revisions"]
    assert one["relation"] == "copy" and one["lineage"] == "Revision 1 is a byte copy of ft_a1"
    assert two["relation"] == "merge"
    assert two["lineage"].startswith("Revision 2 is a linear merge of ") and "revision 1" in two["lineage"]
    assert "ft_a2" in two["lineage"] and "(revision 1 is a byte copy of ft_a1)" in two["lineage"]
    status, d = svc.call("GET", "/api/models/org/history/diff?a=1&b=2")
    assert status == 200 and d["b_derives_from_a"] and not d["same_content"]
    assert d["relation"] == ["copy", "merge"] and "ft_a2" in d["parents_added"]
    assert any("copy" in s and "merge" in s for s in d["sentences"])
    assert svc.call("GET", f"/api/models/org/history/diff?a=1&b={r2[:10]}")[1] == d
    assert svc.call("GET", "/api/models/org/history/diff?a=1&b=9")[0] == 404
    page = svc.call("GET", "/models/org/history?a=1&b=2")[1]
    assert "Revision 2 is a linear merge of" in page and "What changed between two revisions" in page
    status, _ = svc.call("DELETE", "/api/watch/org/history", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and svc.call("GET", "/api/watch")[1] == []


def test_failing_job_is_retried_then_marked_failed_with_its_reason(svc):
    sha = commit_sha("org/missing", "main")
    status, got = svc.call("POST", "/webhooks/hub", webhook("org/missing", sha), {"X-Webhook-Secret": SECRET})
    assert status == 202 and len(got["queued"]) == 1
    job = svc.wait_job(got["queued"][0]["job"], 60)
    assert job["state"] == "failed" and job["attempts"] == 3
    assert "not found" in job["error"] and "\n" not in job["error"]


def test_job_retried_after_a_failure_succeeds(svc, hub, corpus):
    sha = commit_sha("org/late", "main")  # pushed before the Hub serves it
    status, got = svc.call("POST", "/webhooks/hub", webhook("org/late", sha), {"X-Webhook-Secret": SECRET})
    job_id = got["queued"][0]["job"]
    first = wait_for(lambda: (j := svc.job(job_id))["error"] and j, 60, "the first attempt to fail")
    assert first["state"] in ("queued", "running") and first["attempts"] == 1
    hub.repos["org/late"] = {"main": corpus.path("indep_01")}
    job = svc.wait_job(job_id, 120)
    assert job["state"] == "done" and job["attempts"] == 2 and job["error"] is None


def test_duplicate_deliveries_are_ignored(svc):
    sha = commit_sha("org/indep", "main")
    answers = [svc.call("POST", "/webhooks/hub", webhook("org/indep", sha), {"X-Webhook-Secret": SECRET})
               for _ in range(5)]
    assert all(s == 202 for s, _ in answers)
    assert sum(len(a["queued"]) for _, a in answers) == 1 and sum(len(a["duplicates"]) for _, a in answers) == 4
    job_ids = {x["job"] for _, a in answers for x in a["queued"] + a["duplicates"]}
    assert len(job_ids) == 1
    job = svc.wait_job(job_ids.pop())
    assert job["state"] == "done"
    res = svc.call("GET", f"/api/results/{job['result']}")[1]
    assert res["relation"] == "independent"
    assert len([r for r in svc.call("GET", "/api/results?q=org/indep")[1] if r["repo"] == "org/indep"]) == 1
