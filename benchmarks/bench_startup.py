"""Start-up cost: seconds of imports a command pays before it reads its first weight byte, and `import modeltrace`.

    python benchmarks/bench_startup.py [--suspect DIR -c DIR ...] [--repeat 5]

Runs `modeltrace audit SUSPECT -c ...` (default: two tiny corpus models, $MODELTRACE_TEST_CORPUS) in a fresh
interpreter under `-X importtime` with an audit hook that marks the first open of a weight file; the imports before
that mark are summed (top-level entries of the import tree, so nothing is counted twice). Also `import modeltrace`
alone, and the `--help` of the CLI. Target (issue 14): <= 0.3 s of imports to the first byte read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "modeltrace-bench: first weight byte"

_HOOK = f"""
import runpy, sys
_done = []
def _hook(event, args):
    if not _done and event == "open" and isinstance(args[0], str) and args[0].endswith((".safetensors", ".gguf")):
        _done.append(1)
        sys.stderr.write("{MARK}\\n")
        sys.stderr.flush()
sys.addaudithook(_hook)
sys.argv = ["modeltrace", *sys.argv[1:]]
runpy.run_module("modeltrace.cli", run_name="__main__")
"""


def imports_before_mark(stderr: str) -> tuple[float, bool]:
    """Seconds of top-level imports listed before the mark (or in all of stderr when there is none)."""
    total_us = 0
    seen = False
    for line in stderr.splitlines():
        if line.startswith(MARK):
            seen = True
            break
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.split("|")
        name = parts[2]
        if name.startswith("  "):  # nested: already inside its parent's cumulative time
            continue
        try:
            total_us += int(parts[1].strip())
        except ValueError:
            continue  # the header line
    return total_us / 1e6, seen


def run(args: list[str], hook: bool = True, root: Path = ROOT) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-X", "importtime", "-c", _HOOK, *args] if hook else [sys.executable, "-X", "importtime",
                                                                               "-c", args[0]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    return imports_before_mark(p.stderr)


def main() -> None:
    corpus = Path(os.environ.get("MODELTRACE_TEST_CORPUS", "/work/corpus")) / "models"
    ap = argparse.ArgumentParser()
    ap.add_argument("--suspect", default=str(corpus / "m_linear_rio"))
    ap.add_argument("-c", dest="candidates", action="append")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose modeltrace is measured")
    a = ap.parse_args()
    cands = a.candidates or [str(corpus / "ft_a1"), str(corpus / "ft_a2")]
    audit = ["audit", a.suspect, *sum((["-c", c] for c in cands), []), "--json"]
    rows = {
        "import modeltrace": lambda: run(["import modeltrace"], hook=False, root=a.root),
        "audit: imports before the first weight byte": lambda: run(audit, root=a.root),
        "--help": lambda: run(["--help"], root=a.root),
    }
    for label, fn in rows.items():
        got = [fn() for _ in range(a.repeat)]
        secs = [s for s, _ in got]
        marked = all(m for _, m in got) if label.startswith("audit") else True
        print(f"{label:48s} median {statistics.median(secs):.3f} s  min {min(secs):.3f} s"
              + ("" if marked else "  (no weight byte read!)"))


if __name__ == "__main__":
    main()
