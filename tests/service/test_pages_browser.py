"""The service's pages in a real headless Chromium (the OS package, tests/chromium.py): they render, log no console
errors (a Content-Security-Policy violation included), load nothing from another origin, a new upload appears on the
open home page without a reload, and a hostile model card stays text.

MODELTRACE_REQUIRE_CHROMIUM=1 (CI) turns a missing browser into a failure instead of a skip."""

from __future__ import annotations

import time

import pytest
from chromium import Chromium

from tests.service.harness import wait_for


@pytest.fixture(scope="module")
def svc(shared_service):
    return shared_service(["--workers", "1"])


class Tab:
    """One page in the browser: navigate, evaluate, and what it logged and requested."""

    def __init__(self, browser: Chromium) -> None:
        self.b = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", {}, self.session)

    def goto(self, url: str) -> None:
        self.b.send("Page.navigate", {"url": url}, self.session)
        self.b.wait_event("Page.loadEventFired", self.session)

    def eval(self, expr: str):
        got = self.b.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True},
                          self.session)
        return got.get("result", {}).get("value")

    def log(self) -> tuple[list[str], list[str]]:
        """(console errors, every URL requested) so far."""
        self.b.send("Runtime.evaluate", {"expression": "1"}, self.session)  # flush pending events
        errors, urls = [], []
        for e in self.b.events:
            if e.get("sessionId") != self.session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(p["entry"].get("text", ""))
            elif m == "Network.requestWillBeSent":
                urls.append(p.get("request", {}).get("url", ""))
        return errors, urls


def test_home_page_shows_a_new_upload_without_reload(browser, svc):
    first = svc.wait_job(svc.submit("org/rio")["job"])
    assert first["state"] == "done"
    tab = Tab(browser)
    tab.goto(svc.url + "/")
    assert tab.eval("document.title").startswith("modeltrace")
    assert tab.eval("document.querySelectorAll('#results tr').length") == 1
    assert tab.eval("document.querySelector('#results tr a').textContent") == "org/rio"
    tab.eval("window.__marker = 42")  # survives only if the page is never reloaded
    job = svc.wait_job(svc.submit("org/ft")["job"])
    assert job["state"] == "done"
    wait_for(lambda: "org/ft" in (tab.eval("document.getElementById('results').innerText") or ""), 30,
             "the new upload to appear on the open page")
    assert tab.eval("window.__marker") == 42
    row = tab.eval("document.querySelector('#results tr').innerText")
    assert "org/ft" in row and ("finetune" in row or "related" in row)
    errors, urls = tab.log()
    assert errors == []
    assert urls and all(u.startswith(svc.url + "/") for u in urls), urls


def test_model_page_renders_verdict_plots_and_escapes_the_card(browser, svc):
    job = svc.wait_job(svc.submit("org/evil")["job"])
    assert job["state"] == "done"
    tab = Tab(browser)
    tab.goto(svc.url + "/models/org/rio")
    verdict = tab.eval("document.querySelector('.verdict').innerText")
    assert "Merge of existing models" in verdict and "It is not an original model" in verdict
    assert tab.eval("document.querySelectorAll('svg.plot').length") >= 1
    assert tab.eval("[...document.querySelectorAll('a[download]')].map(a => a.textContent).join(',')") == \
        "JSON,HTML,CycloneDX,SPDX,Markdown"
    tab.goto(svc.url + "/models/org/evil")
    time.sleep(0.5)  # let any (wrongly) injected handler run
    assert tab.eval("typeof window.__pwned") == "undefined"
    assert tab.eval("document.querySelectorAll('main script, main img').length") == 0
    assert "<script>window.__pwned=1</script>" in tab.eval("document.body.innerText")
    errors, urls = tab.log()
    assert errors == []
    assert all(u.startswith(svc.url + "/") for u in urls), urls
