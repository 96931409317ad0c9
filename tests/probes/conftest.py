"""Fixtures for the behavioural probe tests: tiny persona models trained once per session (tests/probe_models.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    from probe_models import build_probe_models
except ImportError:  # tests/ imported as a package
    from tests.probe_models import build_probe_models


@pytest.fixture(scope="session")
def probe_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The manifest of the persona models. Kept under $MODELTRACE_TEST_CORPUS/probes when that is set (built once,
    reused by later runs and by xdist workers), else in this run's temp folder."""
    env = os.environ.get("MODELTRACE_TEST_CORPUS")
    if env:
        root = Path(env) / "probes"
    else:
        base = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            base = base.parent
        root = base / "modeltrace-probes"
    return build_probe_models(root)
