"""Drive the OS's headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe): no driver, no
browser download, no port. Used to check that HTML reports render, hold their plots, log no console errors and make
no network requests, and to take a screenshot.

The pipe protocol: Chromium reads NUL-terminated JSON commands on fd 3 and writes NUL-terminated JSON replies and
events on fd 4.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome", "chromium-headless-shell"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    probe: dict[str, Any]
    console_errors: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    screenshot: bytes = b""
    load_seconds: float = 0.0


class Chromium:
    def __init__(self, binary: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="mt-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def child_fds() -> None:  # runs in the child before exec: put the pipe ends at fds 3 and 4, which
            a, b = os.dup(cmd_r), os.dup(out_w)  # pass_fds keeps open (closing happens after this hook)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=child_fds, pass_fds=(3, 4))
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        want = self._id
        while True:
            m = self._recv()
            if m.get("id") == want:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, session: str | None = None) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method and (session is None or e.get("sessionId") == session):
                return self.events.pop(i)
        while True:
            m = self._recv()
            if m.get("method") == method and (session is None or m.get("sessionId") == session):
                return m
            self.events.append(m)

    def _recv(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self._out_r], [], [], left)
            if ready:
                chunk = os.read(self._out_r, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                    raise RuntimeError(f"Chromium exited: {err}")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def open_page(self, url: str, width: int = 1200, height: int = 900, full_height_cap: int = 6000) -> PageResult:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", {}, session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        t0 = time.perf_counter()
        self.send("Page.navigate", {"url": url}, session)
        self.wait_event("Page.loadEventFired", session)
        load = time.perf_counter() - t0
        probe = self.send("Runtime.evaluate", {"expression": PROBE_JS, "returnByValue": True}, session)
        probe = probe.get("result", {}).get("value") or {}
        metrics = self.send("Page.getLayoutMetrics", {}, session)
        size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
        h = int(min(full_height_cap, max(height, size.get("height", height))))
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": width, "height": h,
                                                             "scale": 1}}, session)
        import base64

        res = PageResult(probe=probe, screenshot=base64.b64decode(shot["data"]), load_seconds=load)
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                res.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                res.console_errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                res.console_errors.append(p["entry"].get("text", ""))
            elif m == "Network.requestWillBeSent":
                u = p.get("request", {}).get("url", "")
                if not u.startswith(("file:", "data:", "about:")):
                    res.external_requests.append(u)
        return res

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._out_r):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


PROBE_JS = """(() => {
  const plots = {};
  for (const s of document.querySelectorAll('svg.plot')) {
    const k = s.dataset.plot; const r = s.getBoundingClientRect();
    plots[k] = (plots[k] || 0) + 1;
    if (r.width < 50 || r.height < 50) plots['_tiny'] = (plots['_tiny'] || 0) + 1;
  }
  const v = document.querySelector('.verdict');
  return {title: document.title, plots,
          verdict: v ? v.innerText : null,
          verdict_top: v ? v.getBoundingClientRect().top : null,
          rects: document.querySelectorAll('svg.plot rect').length,
          circles: document.querySelectorAll('svg.plot circle').length,
          scripts: document.scripts.length,
          resources: performance.getEntriesByType('resource').map(e => e.name),
          text: document.body.innerText.length};
})()"""


def render(html_file: Path, binary: str | None = None, **kw: Any) -> PageResult:
    binary = binary or find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium found")
    browser = Chromium(binary)
    try:
        return browser.open_page(html_file.resolve().as_uri(), **kw)
    finally:
        browser.close()
