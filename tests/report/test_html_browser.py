"""HTML reports in a real headless Chromium (the OS package): they render, the plots are there and sized, nothing is
fetched from the network, the console stays clean, and a screenshot is written.

Set MODELTRACE_ARTIFACTS=DIR to keep the screenshots; MODELTRACE_REQUIRE_CHROMIUM=1 (CI) turns a missing browser
into a failure instead of a skip.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from modeltrace.report import formats
from modeltrace.report.build import probe_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _keep(path: Path) -> None:
    dest = os.environ.get("MODELTRACE_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(dest) / path.name)


def identity_probe():
    """Shares in the shape the identity probe reports (counts like the Rio case: 120 questions)."""
    return probe_result("identity", {"Nex": 95, "Nex-AGI": 88, "Qwen": 6, "Rio": 0}, 120,
                        note="system prompt removed; answers matched against known model names")


def test_merge_report_renders_with_plots_and_no_errors(browser, rio_report, tmp_path):
    report = rio_report.model_copy(deep=True)
    report.subjects[0].probes.append(identity_probe())
    html = formats.render(report, "html")
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    page = tmp_path / "rio-report.html"
    page.write_text(html)
    res = browser.open_page(page.as_uri())
    assert res.console_errors == [] and res.external_requests == [] and res.probe["resources"] == []
    plots = res.probe["plots"]
    assert plots.get("weights") == 1 and plots.get("heatmap") == 2 and plots.get("shares") == 1, plots
    assert "_tiny" not in plots  # every plot is laid out at a readable size
    assert res.probe["verdict"].startswith("RIO") and "Merge of existing models" in res.probe["verdict"]
    assert res.probe["verdict_top"] < 120  # the verdict is the first thing on the page
    assert res.probe["circles"] >= 10  # weight points drawn
    shot = tmp_path / "rio-report.png"
    shot.write_bytes(res.screenshot)
    assert res.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(res.screenshot) > 50_000
    _keep(page)
    _keep(shot)


def test_stack_report_renders_layer_map(browser, stack_report, tmp_path):
    page = tmp_path / "stack-report.html"
    page.write_text(formats.render(stack_report, "html"))
    res = browser.open_page(page.as_uri(), full_height_cap=1600)
    assert res.console_errors == [] and res.external_requests == []
    assert res.probe["plots"].get("layermap") == 1 and res.probe["plots"].get("heatmap") == 2
    shot = tmp_path / "stack-report.png"
    shot.write_bytes(res.screenshot)
    _keep(shot)
