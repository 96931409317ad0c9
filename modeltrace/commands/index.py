"""`modeltrace index add|list|remove|check|repair`, `modeltrace identify` and `modeltrace scan`: a library of
fingerprints of known models, and the search that names a suspect's ancestors and recipe from it. Damaged index
entries (checksum mismatch) are never used: identify and scan name them in one warning line each."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from modeltrace.console import (
    ConnectionsOpt,
    TimeoutOpt,
    _human_bytes,
    byte_progress,
    err,
    guarded,
    out,
    print_json,
)
from modeltrace.engine import RAY_ADDRESS_HELP
from modeltrace.errors import InputError
from modeltrace.options import ReadOptions, remote_limits

IndexOpt = Annotated[Path | None, typer.Option("--index", help="Index file (default: $MODELTRACE_INDEX, else "
                                               "~/.local/share/modeltrace/index.sqlite).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DigestOpt = Annotated[bool, typer.Option("--digest", help="Also compute each model's content digest (reads every "
                                          "tensor once), so identical models are recognised at once and "
                                          "`modeltrace lookup` finds them.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Read .bin pickles with the restricted loader.")]

index_app = typer.Typer(name="index", help="A local library of model fingerprints (SQLite; no server).",
                        no_args_is_help=True)


def _open(path: Path | None, create: bool = False):
    from modeltrace.index import Index, default_index_path

    return Index(path or default_index_path(), create=create)


def _share(read: int | None, total: int | None) -> str:
    if not read or not total:
        return ""
    return f"read {_human_bytes(read)} of {_human_bytes(total)} ({100 * read / total:.2f}%)"


@index_app.command("add")
@guarded
def add_cmd(
    models: Annotated[list[str], typer.Argument(help="Model folders, .safetensors/.gguf files or hf://owner/name.")],
    name: Annotated[str | None, typer.Option("--name", help="Name in the index (one model only; default: the "
                                             "folder or repository name).")] = None,
    index: IndexOpt = None,
    workers: Annotated[int | None, typer.Option(help="Processes fingerprinting in parallel.")] = None,
    allow_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    timeout: TimeoutOpt = None,
    connections: ConnectionsOpt = None,
    digest: DigestOpt = False,
) -> None:
    """Fingerprint models into the index. Re-adding an unchanged model does nothing.

    Remote models are read by HTTP Range requests only (well under 1% of their bytes). Each model is stored
    atomically: one that fails half-way leaves nothing behind, and the others are still added.

    Example: modeltrace index add ./base ./ft-1 hf://org/model --index lib.sqlite
    """
    from modeltrace import engine
    from modeltrace.fingerprint import Fingerprint
    from modeltrace.scan import fingerprint_job

    if name is not None and len(models) != 1:
        raise InputError("--name names one model; give exactly one MODEL with it")
    with remote_limits(ReadOptions(allow_pickle=allow_pickle, timeout=timeout, connections=connections)):
        ix = _open(index, create=True)
        failed, rows = 0, []
        try:
            for o in engine.run(fingerprint_job, [(m, allow_pickle) for m in models], workers=workers):
                spec = models[o.index]
                if not o.ok:
                    failed += 1
                    err.print(f"modeltrace: error: {o.error}", markup=False, highlight=False, soft_wrap=True)
                    rows.append({"model": spec, "ok": False, "error": o.error})
                    continue
                blob, seconds = o.value
                fp = Fingerprint.from_bytes(blob)
                got = ix.add(fp, name)
                rows.append({"model": spec, "ok": True, "status": got.status, "name": got.name,
                             "fingerprint_bytes": len(blob), "bytes_read": fp.bytes_read,
                             "total_bytes": fp.model.get("total_bytes"), "seconds": round(seconds, 3)})
                if digest:
                    from modeltrace.commands.provenance import digest_model
                    from modeltrace.index.digests import digest_of, store

                    cd = digest_model(spec, allow_pickle)
                    rows[-1]["content_digest"] = cd.model_id
                    if got.status != "duplicate":
                        store(ix, got.name, cd)
                    elif (known := digest_of(ix, got.name)) is not None and known.model != cd.model:
                        rows[-1]["status"] = "not-added"
                        err.print(f"warning: {spec} has the fingerprint of indexed {got.name} but other content "
                                  f"({cd.model_id[:21]}… vs {known.model_id[:21]}…); not added (the index keys "
                                  "entries by fingerprint)", markup=False, highlight=False, soft_wrap=True)
                if not json_out:
                    what = {"added": "added", "updated": "updated", "unchanged": "unchanged, already indexed",
                            "duplicate": "same sampled values as indexed"}[got.status]
                    out.print(f"{what} {got.name}  (fingerprint {_human_bytes(len(blob))}, "
                              f"{_share(fp.bytes_read, fp.model.get('total_bytes'))}, {seconds:.1f} s)"
                              + (f"  {rows[-1]['content_digest']}" if "content_digest" in rows[-1] else ""),
                              markup=False, highlight=False)
            if any(r.get("status") in ("added", "updated") for r in rows):
                from modeltrace.tree.graph import update_tree

                tree = update_tree(ix)  # a family tree built for this index stays current
                if tree is not None and not json_out:
                    out.print(f"family tree updated ({tree.stats['pairs_computed']} pairs computed, "
                              f"{tree.stats['families_solved']} families re-solved, {tree.stats['seconds']:.1f} s)",
                              markup=False, highlight=False)
        finally:
            ix.close()
    if json_out:
        print_json(rows)
    if failed:
        raise typer.Exit(2)


@index_app.command("list")
@guarded
def list_cmd(index: IndexOpt = None, json_out: JsonOpt = False) -> None:
    """List the indexed models."""
    with _open(index) as ix:
        entries = ix.entries()
    if json_out:
        print_json([e.__dict__ for e in entries])
        return
    t = Table(title=f"{len(entries)} models in {ix.path}")
    for col in ("name", "family", "layers", "parameters", "fingerprint", "added", "location"):
        t.add_column(col, justify="right" if col in ("layers", "parameters", "fingerprint") else "left")
    for e in entries:
        t.add_row(e.name, f"{e.family or '?'} / {e.model_type or '?'}", str(e.layers or "?"),
                  f"{(e.parameters or 0) / 1e6:.1f}M", _human_bytes(e.fingerprint_bytes), e.added_at[:19], e.spec)
    out.print(t)


@index_app.command("remove")
@guarded
def remove_cmd(names: Annotated[list[str], typer.Argument(help="Names as shown by `index list`.")],
               index: IndexOpt = None) -> None:
    """Remove models from the index (all named, or none if one is unknown)."""
    with _open(index) as ix:
        n = ix.remove(list(names))
    out.print(f"removed {n} model{'s' if n != 1 else ''}", markup=False)


@index_app.command("check")
@guarded
def check_cmd(index: IndexOpt = None, json_out: JsonOpt = False) -> None:
    """Read every entry back and check it against its checksum (entries of older indexes, which have none, by
    structure). Exit 1 when an entry is damaged: `modeltrace index repair` drops such entries.

    Example: modeltrace index check --index lib.sqlite
    """
    with _open(index) as ix:
        res = ix.check()
    bad = bool(res.damaged) or res.sqlite != "ok"
    if json_out:
        print_json({"ok": not bad, "entries": res.entries, "damaged": [p.__dict__ for p in res.damaged],
                    "unverified": list(res.unverified), "sqlite": res.sqlite})
    else:
        for p in res.damaged:
            out.print(f"damaged {p.name}: {p.problem}", markup=False, highlight=False)
        if res.sqlite != "ok":
            out.print(f"SQLite structure: {res.sqlite}", markup=False, highlight=False)
        if res.unverified:
            out.print(f"{len(res.unverified)} entries have no checksums yet (written by an older modeltrace; "
                      "they passed a structure check): `modeltrace index repair` records them", markup=False)
        verdict = (f"{len(res.damaged)} of {res.entries} entries damaged; `modeltrace index repair` drops them"
                   if res.damaged else f"{res.entries} entries, all sound")
        out.print(verdict + ("" if res.sqlite == "ok" else "; the file itself is damaged"), markup=False)
    if bad:
        raise typer.Exit(1)


@index_app.command("repair")
@guarded
def repair_cmd(index: IndexOpt = None, json_out: JsonOpt = False) -> None:
    """Drop damaged entries (re-add those models with `index add`) and record checksums for sound entries that
    have none. One transaction: all or nothing.

    Example: modeltrace index repair --index lib.sqlite
    """
    with _open(index) as ix:
        dropped, sealed = ix.repair()
        left = ix.count()
    if json_out:
        print_json({"dropped": [p.__dict__ for p in dropped], "checksummed": sealed, "entries": left})
        return
    for p in dropped:
        out.print(f"dropped {p.name}: {p.problem}", markup=False, highlight=False)
    if sealed:
        out.print(f"recorded checksums for {len(sealed)} older entries", markup=False)
    out.print(f"{left} entries left" + (f"; re-add the {len(dropped)} dropped with `modeltrace index add`"
                                        if dropped else ", nothing was damaged"), markup=False)


def warn_damaged(r: dict[str, Any]) -> None:
    """One line per index entry left out: damaged (checksum) or failed numerically."""
    for d in r.get("damaged") or []:
        err.print(f"warning: index entry {d['model']!r} is damaged ({d['problem']}) and was not used; "
                  "`modeltrace index check` lists such entries", markup=False, highlight=False, soft_wrap=True)
    for d in r.get("failed") or []:
        err.print(f"warning: {d['model']} left out: {d['problem']}", markup=False, highlight=False, soft_wrap=True)


def render_identify(r: dict[str, Any]) -> None:
    s = r["suspect"]
    out.print(f"suspect {s['label']}  fingerprint {_human_bytes(s['fingerprint_bytes'])}, "
              f"{_share(s['bytes_read'], s['total_bytes'])}", markup=False, highlight=False)
    rel = r["relation"]
    colour = "green" if rel == "independent" else "red" if rel in ("copy", "recast") else "yellow"
    head = "NO ANCESTOR IN THE INDEX" if rel == "independent" else rel.upper()
    out.print(f"[bold {colour}]{head}[/bold {colour}]  ", end="")
    out.print(r["summary"], markup=False, highlight=False)
    t = Table(title=f"best matches among {r['index']['models']} indexed models "
                    f"(p-values Holm-adjusted over all of them)")
    for col in ("#", "model", "role", "p (independent)", "similarity", "note"):
        t.add_column(col, justify="right" if col in ("#", "similarity") else "left")
    for h in r["hits"]:
        t.add_row(str(h["rank"]), h["model"], h["role"], h["p"], f"{h['similarity']:.3f}", h["note"])
    out.print(t)
    for parent, line in (r.get("ancestry") or {}).items():
        if line:
            out.print(f"{parent} descends from " + " <- ".join(a["model"] for a in line), markup=False,
                      highlight=False)
    if r.get("undisclosed"):
        err.print(f"warning: {r['undisclosed']}", markup=False, highlight=False)
    warn_damaged(r)
    if r.get("audit_command"):
        out.print("confirm on the full weights:", style="bold")
        out.print(f"  {r['audit_command']}", markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")

    @app.command("identify")
    @guarded
    def identify_cmd(
        suspect: Annotated[str, typer.Argument(help="The model to identify (folder, file, or hf://owner/name).")],
        index: IndexOpt = None,
        top: Annotated[int, typer.Option("--top", min=1, max=100, help="Matches to list.")] = 5,
        json_out: JsonOpt = False,
        allow_pickle: PickleOpt = False,
        fail_on_related: Annotated[bool, typer.Option("--fail-on-related", help="Exit 1 when an indexed model is "
                                                      "an ancestor (upload gate).")] = False,
        timeout: TimeoutOpt = None,
        connections: ConnectionsOpt = None,
        digest: DigestOpt = False,
    ) -> None:
        """Which indexed models is SUSPECT made from, and how? Ranks the index by evidence of ancestry and recovers
        the relation and recipe from fingerprints alone; `modeltrace audit` (command printed) confirms on weights.

        Example: modeltrace identify ./new-upload --top 5
        """
        from modeltrace.api import identify

        options = ReadOptions(allow_pickle=allow_pickle, timeout=timeout, connections=connections)
        with _open(index) as ix, byte_progress(f"content digest of {suspect}", visible=digest) as progress:
            res = identify(suspect, ix, top=top, digest=digest, options=options, progress=progress).document()
        if json_out:
            print_json(res)
            warn_damaged(res)
        else:
            render_identify(res)
        if fail_on_related and res["relation"] != "independent":
            raise typer.Exit(1)

    @app.command("scan")
    @guarded
    def scan_cmd(
        targets: Annotated[list[str] | None, typer.Argument(
            metavar="[ADDRESS] LIST_OR_DIR", show_default=False,
            help="A text file with one model per line (paths or hf://owner/name, # comments), a folder of models, "
                 "or one model; with --ray, optionally preceded by the Ray ADDRESS.")] = None,
        ray: Annotated[bool, typer.Option("--ray", help="Run the tasks on Ray: " + RAY_ADDRESS_HELP)] = False,
        index: IndexOpt = None,
        add: Annotated[bool, typer.Option("--add", help="Also add every scanned model to the index.")] = False,
        workers: Annotated[int | None, typer.Option(help="Parallel tasks: local processes (default: CPUs, at "
                                                    "most 8), or the CPUs of a private Ray instance.")] = None,
        top: Annotated[int, typer.Option("--top", min=1, max=100, help="Matches to keep per model.")] = 3,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object per model (JSON lines).")]
        = False,
        allow_pickle: PickleOpt = False,
        timeout: TimeoutOpt = None,
        connections: ConnectionsOpt = None,
        digest: DigestOpt = False,
    ) -> None:
        """Fingerprint and screen many models in parallel (local processes, or Ray tasks with --ray).

        Each model is a task; a model in several safetensors shards is a planning task plus one task per shard,
        assembled into the same fingerprint one process would make. Results print in input order, the same with
        or without Ray; a model that fails (a bad shard included) prints one error line and is not indexed.

        Usage: modeltrace scan [--ray [ADDRESS]] LIST_OR_DIR

        Examples: modeltrace scan uploads.txt --add;  modeltrace scan --ray auto uploads.txt;
        modeltrace scan --ray ray://head:10001 /shared/models --json
        """
        from modeltrace.engine import split_address
        from modeltrace.scan import expand, scan

        address, list_or_dir = split_address(targets or [], ray, "scan takes one LIST_OR_DIR: a list file, a "
                                             "folder of models, or one model (preceded by a Ray ADDRESS only "
                                             "with --ray)")
        options = ReadOptions(allow_pickle=allow_pickle, timeout=timeout, connections=connections)
        with remote_limits(options):
            specs = expand(list_or_dir)
            failed = 0
            with _open(index, create=add) as ix:
                if not add and ix.count() == 0:
                    raise InputError(f"{ix.path}: the index is empty; add models first or pass --add")
                for row in scan(specs, ix, add=add, top=top, workers=workers, ray=ray, address=address,
                                allow_pickle=allow_pickle, digest=digest):
                    failed += not row["ok"]
                    if json_out:
                        sys.stdout.write(json.dumps(row, default=str) + "\n")
                        sys.stdout.flush()
                    elif not row["ok"]:
                        err.print(f"modeltrace: error: {row['error']}", markup=False, highlight=False,
                                  soft_wrap=True)
                    else:
                        added = f"  [{row['added']}]" if "added" in row else ""
                        out.print(f"{row['name']}: {row['summary']}{added}", markup=False, highlight=False)
                        for d in row.get("failed") or []:
                            err.print(f"warning: {d['model']} left out: {d['problem']}", markup=False,
                                      highlight=False)
                warn_damaged({"damaged": [{"model": n, "problem": p} for n, p in sorted(ix.damaged.items())]})
        if failed:
            err.print(f"modeltrace: {failed} of {len(specs)} models failed", markup=False)
            raise typer.Exit(2)
