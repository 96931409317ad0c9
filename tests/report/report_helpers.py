"""Helpers for the report tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

RIO_CARD = "---\nlicense: mit\ntags: [llm]\n---\n# rio\nOur own original model, trained from scratch.\n"
NEX_CARD = "---\nlicense: apache-2.0\nbase_model: org/base_a\nbase_model_relation: finetune\n---\n# nex\n"
QWEN_CARD = "---\nlicense: apache-2.0\n---\n# qwen\n"


def carded_copy(corpus, name: str, dest: Path, card: str | None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in corpus.path(name).iterdir():
        if f.is_file() and f.name != "corpus_meta.json":
            shutil.copy(f, dest / f.name)
    if card is not None:
        (dest / "README.md").write_text(card)
    return dest


def build_audit_report(suspect: Path, candidates: list[Path], base: Path | None = None):
    from modeltrace.audit import DEFAULT_AUDIT_CHUNK, run_audit
    from modeltrace.report.build import audit_parameters, audit_subject, new_report
    from modeltrace.sources.base import recording_remote_ranges
    from modeltrace.verdict import decide

    cands = [str(c) for c in candidates]
    with recording_remote_ranges():
        run = run_audit(str(suspect), cands, base=str(base) if base else None)
    verdict = decide(run)
    params = audit_parameters(cands, str(base) if base else None, None, DEFAULT_AUDIT_CHUNK, False, False)
    subject, findings = audit_subject(run, verdict, params)
    return new_report("audit", [subject], findings, argv=["audit", str(suspect)])


def cli(*args: str):
    """Run the CLI in-process (0.3 s per subprocess start saved); returns click's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from modeltrace.cli import app
    from modeltrace.commands import register_all

    if not any(c.name == "verify" for c in app.registered_commands):
        register_all(app)
    return CliRunner().invoke(app, [str(a) for a in args])
