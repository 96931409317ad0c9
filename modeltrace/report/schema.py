"""Write the report's JSON Schema: `python -m modeltrace.report.schema [PATH]` (default docs/report.schema.json).

tests/report/test_model.py fails when the published file is stale, so the schema in the repo always matches the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from modeltrace.report.model import schema_text

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "report.schema.json"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT_PATH
    path.write_text(schema_text())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
