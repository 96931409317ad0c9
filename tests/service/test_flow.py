"""Uploads through the real service: a merge upload ends with its verdict, report downloads, history and diffs."""

from __future__ import annotations

from hubserver import commit_sha


def test_merge_upload_ends_with_its_verdict(make_service):
    svc = make_service()
    sub = svc.submit("org/rio")
    assert sub["revision"] == commit_sha("org/rio", "main") and sub["new"] is True
    job = svc.wait_job(sub["job"])
    assert job["state"] == "done", job
    status, res = svc.call("GET", f"/api/results/{job['result']}")
    assert status == 200
    assert res["relation"] == "merge" and res["method"] == "linear", res
    assert {f["code"] for f in res["findings"]} >= {"undisclosed-merge"}
    assert res["contradicted"] is True
