"""Security of the service: forged webhooks and writes without the API token are refused, inputs are validated (a
4xx, never a crash), model cards are escaped on the pages, and no secret reaches logs, pages, results or reports."""

from __future__ import annotations

import json
import sqlite3

import pytest
from hubserver import commit_sha

from tests.service.harness import SECRET, TOKEN, webhook

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def svc(shared_service):
    return shared_service(["--workers", "1"])


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"X-Webhook-Secret": ""}, 401),
    ({"X-Webhook-Secret": "wrong"}, 403),
    ({"X-Webhook-Secret": SECRET + "x"}, 403),
    ({"X-Webhook-Secret": SECRET[:-1]}, 403),
])
def test_forged_webhooks_are_refused(svc, headers, status):
    sha = commit_sha("org/indep", "forged")
    got, body = svc.call("POST", "/webhooks/hub", webhook("org/indep", sha), headers)
    assert got == status, body
    jobs = svc.call("GET", "/api/jobs")[1]["jobs"]
    assert all(j["revision"] != sha for j in jobs)


def test_writes_need_the_api_token(svc):
    body = {"repo": "org/indep"}
    assert svc.call("POST", "/api/models", body)[0] == 401
    assert svc.call("POST", "/api/models", body, {"Authorization": "Bearer nope"})[0] == 403
    assert svc.call("POST", "/api/models", body, {"Authorization": f"Basic {TOKEN}"})[0] == 401
    assert svc.call("POST", "/api/watch", {"repos": ["org/indep"]})[0] == 401
    assert svc.call("DELETE", "/api/watch/org/indep")[0] == 401


@pytest.mark.parametrize("repo", ["../etc/passwd", "org/a b", "org/x/y", "https://evil.example/org/x", "org",
                                  "org/-bad", "org/a..b", "", "x" * 400, "org/x@main", "<script>/x"])
def test_bad_repository_ids_get_a_4xx(svc, repo):
    status, body = svc.call("POST", "/api/models", {"repo": repo}, AUTH)
    assert 400 <= status < 500, (repo, status, body)
    assert isinstance(body, dict) and "detail" in body


@pytest.mark.parametrize("payload, status", [
    (b"not json", 422),
    (b"[]", 422),
    (json.dumps({"event": {"action": "update", "scope": "repo.content"}}).encode(), 422),
    (json.dumps(webhook("../../etc", "a" * 40)).encode(), 422),
    (json.dumps(webhook("org/indep", "not-a-sha")).encode(), 422),
    (json.dumps(webhook("org/data", "b" * 40, kind="dataset")).encode(), 200),
    (json.dumps(webhook("org/indep", "c" * 40, scope="discussion", action="create")).encode(), 200),
])
def test_bad_or_irrelevant_webhook_payloads(svc, payload, status):
    got, body = svc.call("POST", "/webhooks/hub", raw=payload, headers={"X-Webhook-Secret": SECRET})
    assert got == status, body
    if status == 200:
        assert body["queued"] == [] and body["ignored"]


def test_other_bad_inputs_are_4xx(svc):
    assert svc.call("POST", "/api/models", {"repo": "org/indep", "revision": "../x"}, AUTH)[0] == 422
    assert svc.call("POST", "/api/models", {"repo": "org/unknown"}, AUTH)[0] == 502  # the Hub says no such repo
    assert svc.call("GET", "/api/jobs/abc")[0] == 422
    assert svc.call("GET", "/api/results?limit=100000")[0] == 422
    assert svc.call("GET", "/api/models/org/never-seen")[0] == 404
    assert svc.call("GET", "/models/org/a..b")[0] == 404
    assert svc.call("GET", "/models/org/never-seen")[0] == 404
    assert svc.call("GET", "/api/models/org/x/diff?a=1")[0] == 422


def test_card_content_is_escaped_and_no_secret_leaks(svc):
    job = svc.wait_job(svc.submit("org/evil")["job"])
    assert job["state"] == "done", job
    status, page = svc.call("GET", "/models/org/evil")
    assert status == 200
    assert "<script>window.__pwned" not in page and "<img src=http://example.invalid" not in page
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page  # shown, as text
    assert "http://example.invalid" not in page.replace("&lt;img src=http://example.invalid", "")
    status, html_report = svc.call("GET", f"/api/results/{job['result']}/report.html")
    assert status == 200 and "<script>window.__pwned" not in html_report
    # no secret in pages, results, reports, the database or the log
    shown = [svc.call("GET", p)[1] for p in ("/", "/models/org/evil", "/api/jobs", "/api/results", "/openapi.json",
                                             f"/api/results/{job['result']}", "/healthz")]
    text = json.dumps(shown) + html_report + svc.log.read_text()
    db = svc.db.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        for table in ("jobs", "results", "alerts", "repos"):
            text += json.dumps(conn.execute(f"SELECT * FROM {table}").fetchall())
    assert TOKEN not in text and SECRET not in text
