"""Report-only commands: `verify` re-checks a saved JSON report against its sources; `render` turns it into another
format without re-running anything (audit once, publish HTML, ML-BOM and SPDX from the same result)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from modeltrace.console import _human_bytes, err, guarded, out

    @app.command("verify")
    @guarded
    def verify_cmd(
        report: Annotated[Path, typer.Argument(help="A report written with --format json.")],
        tolerance: Annotated[float, typer.Option(help="Largest change of a recipe weight still counted as the "
                                                 "same.")] = 0.02,
        json_out: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
        allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow the restricted pickle reader for "
                                                   "sources that need it.")] = False,
        bundle: Annotated[Path | None, typer.Option("--bundle", help="A signed attestation (`modeltrace attest`): "
                                                    "check its signature, that REPORT is the attested one and that "
                                                    "the model in hand is its subject.")] = None,
        key: Annotated[Path | None, typer.Option("--key", help="With --bundle: the trusted public key (PEM).")]
        = None,
        trust_root: Annotated[list[Path] | None, typer.Option("--trust-root", help="With --bundle: a trusted root "
                                                              "certificate (PEM) for certificate-signed bundles.")]
        = None,
        recompute: Annotated[bool, typer.Option("--recompute", help="With --bundle: also re-derive the finding "
                                                "from the weights.")] = False,
        model: Annotated[str | None, typer.Option("--model", help="With --bundle: the model in hand, if not where "
                                                  "the report says.")] = None,
    ) -> None:
        """Re-check a report against the same sources: file hashes, pinned remote commits and byte ranges, and the
        conclusions re-computed with the recorded parameters. Exit 0 when everything matches, 1 when anything
        differs (each difference explained), 2 when the report cannot be read.

        With --bundle (from `modeltrace attest`) it checks the signature against the trusted --key or
        --trust-root, that REPORT is the attested report and that the model in hand has the attested content
        digest; --recompute also re-derives the finding.

        Example: modeltrace verify rio-report.json;  modeltrace verify rio.json --bundle rio.sigstore.json --key pub.pem
        """
        from modeltrace.api import verify, verify_attestation
        from modeltrace.errors import InputError

        if tolerance < 0:
            raise InputError("--tolerance must be >= 0")
        if bundle is not None:
            if (key is None) == (not trust_root):
                raise InputError("--bundle needs the signer's trust: exactly one of --key PUBKEY or --trust-root CA")
            result = verify_attestation(report, bundle, key=key, trust_roots=list(trust_root or []), model=model,
                                        recompute=recompute, tolerance=tolerance, allow_pickle=allow_pickle)
        elif key or trust_root or recompute or model:
            raise InputError("--key, --trust-root, --recompute and --model go with --bundle")
        else:
            result = verify(report, tolerance=tolerance, allow_pickle=allow_pickle)
        if json_out:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        else:
            for c in result.checks:
                mark = "[green]ok[/green]  " if c.ok else "[red]DIFF[/red]"
                out.print(f"{mark} {c.subject}: {c.what}: ", end="")
                out.print(c.message, markup=False, highlight=False)
            if result.ok:
                out.print(f"[bold green]verified[/bold green]: {len(result.checks)} checks match the report")
            else:
                out.print(f"[bold red]mismatch[/bold red]: {len(result.mismatches)} of {len(result.checks)} checks "
                          "differ from the report")
        if not result.ok:
            raise typer.Exit(1)

    @app.command("render")
    @guarded
    def render_cmd(
        report: Annotated[Path, typer.Argument(help="A report written with --format json.")],
        fmt: Annotated[str | None, typer.Option("--format", "-f", help="json, md, html, cyclonedx or spdx "
                                                "(default: from --output's name).")] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    ) -> None:
        """Turn a saved JSON report into another format, without reading any model again.

        Example: modeltrace render rio.json -o rio.html
        """
        from modeltrace.api import load_report, render, save
        from modeltrace.console import check_output
        from modeltrace.errors import InputError
        from modeltrace.report.formats import format_for

        if output is not None:
            check_output(output)
        doc = load_report(report)
        if fmt is None:
            if output is None:
                raise InputError("render needs --format or an --output file name to tell the format")
            fmt = format_for(output)
        if output is None:
            sys.stdout.write(render(doc, fmt))
            return
        size = save(doc, output, fmt)
        err.print(f"wrote {fmt} report to {output} ({_human_bytes(size)})", markup=False, highlight=False)
