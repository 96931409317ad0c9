"""`modeltrace attest` signs a report's finding about a model as an in-toto statement in a Sigstore bundle;
`modeltrace lookup` finds indexed models by model, values or file digest. (`verify --bundle` is in report.py and
calls provenance/check.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from modeltrace.console import byte_progress, err, guarded, out, print_json
from modeltrace.errors import InputError

if TYPE_CHECKING:
    from modeltrace.provenance.content import ContentDigest


def digest_model(spec: str, allow_pickle: bool = False) -> ContentDigest:
    """The content digest of a model (reads every tensor once; progress on a terminal)."""
    from modeltrace.provenance.content import digest_model as digest

    with byte_progress(f"content digest of {spec}") as progress:
        return digest(spec, allow_pickle, progress=progress)


def register(app: typer.Typer) -> None:
    @app.command("attest")
    @guarded
    def attest_cmd(
        report: Annotated[Path, typer.Argument(help="A report written with --format json (audit or inspect).")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the Sigstore bundle "
                                             "(e.g. model.sigstore.json).")],
        key: Annotated[Path | None, typer.Option("--key", help="PEM private key: ECDSA P-256/384/521 or Ed25519 "
                                                 "(offline; no network needed).")] = None,
        certificate: Annotated[Path | None, typer.Option("--certificate", help="PEM certificate of --key; "
                                                         "verifiers then trust it through its root CA.")] = None,
        chain: Annotated[list[Path] | None, typer.Option("--chain", help="PEM intermediate certificates between "
                                                         "--certificate and the root (repeatable).")] = None,
        keyless: Annotated[bool, typer.Option("--keyless", help="Sign with Sigstore's public instance (Fulcio "
                                              "certificate from an OIDC login, Rekor entry): needs a network.")]
        = False,
        password_env: Annotated[str | None, typer.Option("--key-password-env", help="Environment variable "
                                                         "holding the private key's password.")] = None,
        model: Annotated[str | None, typer.Option("--model", help="Read the model from here instead of the "
                                                  "location the report names (one-model reports).")] = None,
        allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read .bin pickles with the "
                                                   "restricted loader.")] = False,
    ) -> None:
        """Sign a report's provenance finding about a model: an in-toto statement whose subject is the model's
        content digest (and its weight files' SHA-256) and whose predicate is the finding (relation, parents with
        recipe and p-values, evidence hashes, the report's SHA-256, tool version), in a DSSE envelope in a
        Sigstore bundle. Check it with `modeltrace verify REPORT --bundle BUNDLE --key PUBKEY`.

        Example: modeltrace attest rio.json --key signing.pem -o rio.sigstore.json
        """
        from modeltrace.provenance.attest import KeySigner, sign, sign_keyless, statement
        from modeltrace.report.model import load_report, parse_report

        if keyless == (key is not None):
            raise InputError("give exactly one of --key (offline key, optionally with --certificate) or --keyless")
        if (certificate is None) and chain:
            raise InputError("--chain needs --certificate")
        password = None
        if password_env:
            if password_env not in os.environ:
                raise InputError(f"--key-password-env: ${password_env} is not set")
            password = os.environ[password_env].encode()
        signer = KeySigner(key, password, certificate, list(chain or [])) if key is not None else None
        load_report(report)  # one clear line for a missing or unreadable report
        data = report.read_bytes()
        doc = parse_report(data.decode("utf-8", errors="replace"), str(report))
        if model is not None and len(doc.subjects) != 1:
            raise InputError(f"--model names one model, but the report is about {len(doc.subjects)}")
        digests = {s.name: digest_model(model or s.location, allow_pickle) for s in doc.subjects}
        stmt = statement(doc, data, digests)
        bundle = sign(stmt, signer) if signer is not None else sign_keyless(stmt)
        try:
            output.write_text(json.dumps(bundle, indent=2) + "\n")
        except OSError as exc:
            raise InputError(f"{output}: cannot write the bundle ({exc.strerror})") from None
        for name, d in digests.items():
            out.print(f"{name}: {d.model_id}  ({len(d.tensors)} tensors, values {d.values_id[:21]}…)",
                      markup=False, highlight=False)
        how = "certificate" if certificate else "key" if key else "keyless"
        err.print(f"wrote signed attestation ({how}) to {output}", markup=False, highlight=False)

    @app.command("lookup")
    @guarded
    def lookup_cmd(
        digest: Annotated[str, typer.Argument(help="mtc1:HEX (model digest), mtv1:HEX (same values in any dtype), "
                                              "sha256:HEX (a weight file) or bare hex (any of them).")],
        index: Annotated[Path | None, typer.Option("--index", help="Index file (default: $MODELTRACE_INDEX, else "
                                                   "~/.local/share/modeltrace/index.sqlite).",
                                                   show_default=False)] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Find indexed models by content digest (from `inspect --hashes` or `index add --digest`) or by a weight
        file's SHA-256. Exit 1 when nothing matches.

        Example: modeltrace lookup mtc1:3f2a…
        """
        from modeltrace.index import Index, default_index_path
        from modeltrace.index.digests import find
        from modeltrace.provenance.content import parse_digest

        parse_digest(digest)  # a malformed digest is bad input before the index is opened
        with Index(index or default_index_path()) as ix:
            found = find(ix, digest)
        if json_out:
            print_json([m.__dict__ for m in found])
        else:
            what = {"model": "identical content", "values": "same values (any dtype)", "file": "weight file"}
            for m in found:
                extra = f" ({m.detail})" if m.detail else ""
                out.print(f"{m.name}  {what[m.kind]}{extra}  {m.spec}", markup=False, highlight=False)
            if not found:
                err.print("no indexed model has this digest (models are digested by `index add --digest`)",
                          markup=False)
        if not found:
            raise typer.Exit(1)
