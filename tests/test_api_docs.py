"""docs/api.md runs: every ```python block, in order, in one namespace, against the test corpus (blocks fenced
```python skip-test are shown, not run; the probe calls they show run in tests/probes/test_api_probes.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```python([^\n]*)\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_docs_have_examples():
    runnable = [code for info, code in blocks() if "skip-test" not in info]
    assert len(runnable) >= 8
    assert any("modeltrace.audit(" in c for c in runnable) and any("modeltrace.identify(" in c for c in runnable)


def test_api_md_examples_run(corpus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    from modeltrace.methods import unregister_method

    monkeypatch.setenv("MODELTRACE_TEST_CORPUS", str(corpus.root))
    namespace: dict = {"__name__": "api_md"}
    try:
        for i, (info, code) in enumerate(blocks()):
            if "skip-test" in info:
                continue
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        unregister_method("toy_mean")
    printed = capsys.readouterr().out
    assert "linear merge" in printed and "ft_a1" in printed
