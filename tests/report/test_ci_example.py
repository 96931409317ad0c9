"""The GitHub Actions example in examples/ runs as written: its shell steps, on a local model, gate and render."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / "examples" / "github-actions" / "modeltrace-audit.yml"


def test_example_workflow_steps_run(rio_models, tmp_path):
    wf = yaml.safe_load(WORKFLOW.read_text())
    steps = {s.get("name", ""): s for s in wf["jobs"]["audit"]["steps"]}
    audit = next(s["run"] for n, s in steps.items() if n.startswith("Audit"))
    render = next(s["run"] for n, s in steps.items() if n.startswith("Render"))
    env = {**os.environ, "MODEL_DIR": str(rio_models["rio"]),
           "CANDIDATES": f"-c {rio_models['nex']} -c {rio_models['qwen']}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "-e", "-c", audit], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr  # the Rio case: undisclosed merge and a changed licence fail the job
    assert "undisclosed-merge" in r.stderr or "license" in r.stderr
    r = subprocess.run(["bash", "-e", "-c", render], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("report.json", "report.html", "model.cdx.json", "model.spdx.json"):
        assert (tmp_path / "modeltrace-report" / name).stat().st_size > 1000
