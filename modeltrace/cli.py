"""Command line: parse arguments, call the library, print. No provenance logic lives here.

Exit codes (stable, for CI gates):
  0  success, nothing to flag
  1  the check ran and found what --fail-on asked to fail on (audit/gate commands)
  2  bad input or usage: unreadable checkpoint, refused pickle, unreachable remote, bad arguments
  70 internal error (a bug: please report it; MODELTRACE_DEBUG=1 shows the traceback)

Every error is one line on stderr, usage errors included (with a pointer to --help). Everything the CLI prints and
every report it writes goes through modeltrace.redact, so credentials (API keys, HF_TOKEN, URL userinfo, ?api-key=)
never reach the terminal or a file. A report's --output path is checked before the work starts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modeltrace.engine import RAY_ADDRESS_HELP
from modeltrace.errors import InputError, ModelTraceError
from modeltrace.redact import ScrubbingStream, scrub

app = typer.Typer(
    name="modeltrace",
    help="Establish where an open-weight model came from: byte copy, re-encoded copy, fine-tune, merge (with its "
    "recipe), layer stack, or independent. Reads weights lazily (local folders, safetensors shards, GGUF, hf://).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def guarded(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and a stable exit code; never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ModelTraceError as exc:
            err.print(f"modeltrace: error: {scrub(str(exc))}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err.print("modeltrace: interrupted", markup=False)
            raise typer.Exit(130) from None
        except MemoryError:
            err.print("modeltrace: error: out of memory", markup=False)
            raise typer.Exit(2) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("MODELTRACE_DEBUG"):
                raise
            msg = (scrub(str(exc)) or "").splitlines()[0] if str(exc) else ""
            err.print(f"modeltrace: internal error: {type(exc).__name__}: {msg} (MODELTRACE_DEBUG=1 for details)",
                      markup=False, soft_wrap=True)
            raise typer.Exit(70) from None

    return wrapper


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


# ---- report options shared by every command that produces findings (modeltrace/report) ----------------------------
FormatOpt = Annotated[str | None, typer.Option("--format", "-f", help="Report format: json, md, html, cyclonedx "
                                               "(CycloneDX 1.6 ML-BOM) or spdx (SPDX 3.0.1 AI). Default: a terminal "
                                               "summary; with --output, taken from the file name.")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to this file (the terminal "
                                                "summary is still printed).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
FailOnOpt = Annotated[list[str] | None, typer.Option("--fail-on", help="Exit 1 when a finding of severity medium or "
                                                     "above is in this class: undisclosed (derivation the card does "
                                                     "not disclose), license, or any. Repeatable.")]


TimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", help="Seconds the whole run may spend reading remote (hf://) models; then it stops with one "
    "line (default: no limit; env MODELTRACE_TIMEOUT).", show_default=False)]
ConnectionsOpt = Annotated[int | None, typer.Option(
    "--connections", min=1, max=256, help="Remote requests in flight at once, over pooled connections (default 16; "
    "env MODELTRACE_CONNECTIONS).", show_default=False)]
BudgetOpt = Annotated[str | None, typer.Option(
    "--budget", help="Bytes the audit may fetch from remote models, e.g. 4G: without --sample, the fraction of rows "
    "read is chosen to fit; it is never exceeded (env MODELTRACE_BUDGET).", show_default=False)]


def remote_limits(timeout: float | None, connections: int | None, budget: str | None = None) -> int | None:
    """Apply --timeout/--connections/--budget for this command (and its worker processes); the budget in bytes."""
    from modeltrace.sources.remote import configure, parse_bytes

    nbytes = parse_bytes(budget) if budget is not None else None
    configure(timeout=timeout, connections=connections, budget=nbytes)
    return nbytes


def _report_format(fmt: str | None, json_out: bool, output: Path | None) -> str | None:
    from modeltrace.report.formats import FORMATS, format_for

    if json_out:
        if fmt not in (None, "json"):
            raise InputError(f"--json and --format {fmt} contradict each other")
        fmt = "json"
    if fmt is None and output is not None:
        fmt = format_for(output)
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if output is not None:
        check_output(output)
    return fmt


def check_output(output: Path) -> None:
    """Fail before any work when a report could not be written there: a missing folder, a folder as the file, no
    permission or a read-only file system (a probe file is created and removed, which also holds for root)."""
    import tempfile

    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise InputError(f"{output}: is a folder; give a file name for the report")
    if not folder.is_dir():
        raise InputError(f"{output}: folder {folder} does not exist" if not folder.exists() else
                         f"{output}: {folder} is not a folder")
    if output.exists() and not os.access(output, os.W_OK):
        raise InputError(f"{output}: not writable (permission denied)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{output}: cannot write there ({exc.strerror or exc})") from None


def render_findings(findings: list) -> None:
    if not findings:
        return
    colours = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}
    several = len({f.subject for f in findings}) > 1
    t = Table(title="findings (model card and licences vs the weights)")
    if several:
        t.add_column("model")
    t.add_column("severity")
    t.add_column("finding")
    t.add_column("detail")
    for f in findings:
        row = [f"[{colours[f.severity]}]{f.severity}[/]", f"{f.title} ({f.code})", f.detail]
        t.add_row(*([f.subject] if several else []), *row)
    out.print(t)


def deliver(report: Any, fmt: str | None, output: Path | None, text: Callable[[], None]) -> None:
    """Terminal summary and/or the report in the asked format, on stdout or in --output."""
    from modeltrace.report import formats

    if fmt is None or output is not None:
        text()
        render_findings(report.findings)
    if fmt is None:
        return
    if output is None:
        sys.stdout.write(formats.render(report, fmt))
        return
    size = formats.write(report, fmt, output)
    err.print(f"wrote {fmt} report to {output} ({_human_bytes(size)})", markup=False, highlight=False)


def gate(report: Any, fail_on: list[str]) -> None:
    from modeltrace.report.gate import tripped

    hits = tripped(report, fail_on)
    if hits:
        worst = hits[0]
        err.print(f"modeltrace: --fail-on {','.join(fail_on)}: {len(hits)} finding(s), e.g. {worst.severity} "
                  f"{worst.code}: {worst.title}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return str(n)


def _human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit} ({n:,})"
    return f"{n:,}"


def render_description(d: dict) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold cyan")
    t.add_column()
    arch = d["architecture"]
    t.add_row("model", d["location"])
    t.add_row("format", d["format"])
    t.add_row("architecture", f"{arch['family']} family, model_type={arch['model_type'] or '?'}"
              + (f" ({', '.join(arch['architectures'])})" if arch["architectures"] else ""))
    t.add_row("parameters", _human_count(d["parameters"]))
    if d["experts"]:
        e = d["experts"]
        t.add_row("active parameters", _human_count(d["active_parameters"]))
        t.add_row("experts", f"{e['routed']} routed, {e['active'] or '?'} active per token, {e['shared']} shared")
    t.add_row("layers", str(d["layers"]))
    t.add_row("hidden size", str(d["hidden_size"]))
    t.add_row("attention heads", f"{d['attention_heads']} (kv {d['kv_heads']})")
    t.add_row("vocabulary", str(d["vocab_size"]))
    t.add_row("dtypes", ", ".join(f"{k}: {v['tensors']} tensors, {_human_bytes(v['bytes'])}"
                                  for k, v in d["dtypes"].items()))
    files = d["files"]
    t.add_row("weight files", f"{len(files)} ({_human_bytes(d['total_bytes'])} of tensors)")
    for f in files[:8]:
        extra = f"  sha256 {f['sha256']}" if "sha256" in f else ""
        t.add_row("", f"{f['name']}  {_human_bytes(f['size'])}{extra}")
    if len(files) > 8:
        t.add_row("", f"... and {len(files) - 8} more")
    tok = d["tokenizer"]
    if tok:
        specials = list(tok.get("special_tokens") or {})
        t.add_row("tokenizer", f"{tok.get('type') or '?'}, vocab {tok.get('vocab_size') or '?'}, "
                  f"chat template {'yes' if tok.get('chat_template') else 'no'}, "
                  f"special: {', '.join(specials[:6]) or 'none'}{' ...' if len(specials) > 6 else ''}")
    else:
        t.add_row("tokenizer", "none found")
    card = d["card"]
    if card["present"]:
        t.add_row("card", f"base_model={card['base_model'] or '-'}, relation={card['base_model_relation'] or '-'}, "
                  f"license={card['license'] or '-'}")
        for p in card["problems"]:
            t.add_row("", f"[yellow]{p}[/yellow]")
    else:
        t.add_row("card", "no model card (README.md)")
    names = d.get("unrecognized_tensors") or []
    count = d.get("unrecognized_count", len(names))
    if count:
        shown = ", ".join(names[:3]) + (f" (and {count - 3} more)" if count > 3 else "")
        t.add_row("unrecognized", f"{count} of {d['tensors']} tensors have no canonical role: {shown}")
    if d.get("content"):
        c = d["content"]
        t.add_row("content digest", f"{c['model_digest']}  ({c['tensors']} tensors; any sharding or file order)")
        t.add_row("values digest", f"{c['values_digest']}  (the same in any exact dtype)")
    t.add_row("bytes read", _human_bytes(d["bytes_read"]))
    out.print(t)


@app.command("inspect")
@guarded
def inspect_cmd(
    model: Annotated[str, typer.Argument(help="A model folder, a .safetensors/.gguf file, or hf://owner/name[@rev].")],
    json_out: JsonOpt = False,
    hashes: Annotated[bool, typer.Option("--hashes", help="Also compute SHA-256 of every weight file and the "
                                         "content digest (per-tensor manifest; reads all).")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read PyTorch .bin pickles with a restricted "
                                               "loader that never runs code.")] = False,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    fail_on: FailOnOpt = None,
    timeout: TimeoutOpt = None,
    connections: ConnectionsOpt = None,
) -> None:
    """Describe a checkpoint: architecture, parameters (MoE aware), dtypes, shards, tokenizer, model card.

    Only headers and small metadata files are read, so this is instant even for remote 400B-class models.

    Example: modeltrace inspect ./my-model --json
    """
    from modeltrace.align.view import label_for
    from modeltrace.describe import describe
    from modeltrace.report.build import inspect_subject, new_report
    from modeltrace.report.gate import check_gates
    from modeltrace.sources import open_source
    from modeltrace.sources.base import recording_remote_ranges

    fmt = _report_format(fmt, json_out, output)
    gates = check_gates(fail_on)
    remote_limits(timeout, connections)
    with recording_remote_ranges(), open_source(model, allow_pickle=allow_pickle) as src:
        d = describe(src, hashes=hashes)
        if hashes:
            from modeltrace.provenance.content import content_digest

            d["content"] = content_digest(src).to_dict()
        subject, findings = inspect_subject(label_for(model), model, d, src, hashes=hashes)
    report = new_report("inspect", [subject], findings)
    deliver(report, fmt, output, lambda: render_description(d))
    gate(report, gates)


def render_audit(v: dict) -> None:
    rel = v["relation"]
    colour = {"independent": "green", "copy": "red", "recast": "red"}.get(rel, "yellow")
    out.print(f"[bold {colour}]{rel.upper()}[/bold {colour}]" + (f"  method: {v['method']}" if v.get("method") else ""))
    out.print(v.get("summary", ""), markup=False, highlight=False)
    if v["parents"] and "weight" in v["parents"][0]:
        t = Table(title="recipe", show_lines=False)
        t.add_column("parent")
        t.add_column("weight", justify="right")
        t.add_column("95% interval", justify="right")
        for p in v["parents"]:
            w, iv = p.get("weight"), p.get("interval")
            t.add_row(p["model"], "-" if w is None else f"{w:.4f}",
                      "-" if not iv or None in iv else f"[{iv[0]:.4f}, {iv[1]:.4f}]")
        out.print(t)
    params = v.get("parameters") or {}
    for k, val in params.items():
        if isinstance(val, dict):
            out.print(f"  {k}: {val['value']} [{val['interval'][0]}, {val['interval'][1]}]", markup=False)
    if v.get("base"):
        out.print(f"  base: {v['base']}", markup=False)
    t = Table(title="independence tests (H0: suspect independent of candidate)")
    t.add_column("candidate")
    t.add_column("p-value", justify="right")
    for name, p in v["p_values"].items():
        t.add_row(name, p["text"])
    out.print(t)
    if v.get("layer_map"):
        t = Table(title="layer map")
        t.add_column("suspect layer", justify="right")
        t.add_column("from")
        t.add_column("layer", justify="right")
        for e in v["layer_map"]:
            t.add_row(str(e["layer"]), e["model"], str(e["source_layer"]))
        out.print(t)
    elif v["layers"]:
        t = Table(title="per layer")
        t.add_column("layer", justify="right")
        t.add_column("method")
        t.add_column("weights")
        t.add_column("R² min", justify="right")
        for e in v["layers"]:
            extra = f" t={e['t']}" if "t" in e else (f" density={e['density']}" if "density" in e else "")
            w = ", ".join(f"{k} {x:.3f}" for k, x in e["weights"].items()) + extra
            r2 = "" if e["r2_min"] is None else f"{e['r2_min']:.5f}"
            t.add_row(str(e["layer"]) if e["layer"] >= 0 else "emb/head", e["method"], w, r2)
        out.print(t)
    if v.get("mergekit_yaml"):
        out.print("recipe as mergekit YAML:", style="bold")
        out.print(v["mergekit_yaml"], markup=False, highlight=False)
    ver = v.get("verify")
    if ver:
        if ver.get("replayed"):
            out.print(f"verify: replayed {ver['method']} on {ver['tensors']} tensors: median relative error "
                      f"{ver['median_rel_error']:.2e}, max {ver['max_rel_error']:.2e} ({ver['worst_tensor']})",
                      markup=False)
        else:
            out.print(f"verify: not replayed: {ver['reason']}", markup=False)
    for w in v.get("warnings", []):
        err.print(f"warning: {w}", markup=False, highlight=False)
    out.print(f"read {_human_bytes(v['bytes_read'])} in {v['elapsed_s']:.1f} s", style="dim")


@app.command("audit")
@guarded
def audit_cmd(
    suspect: Annotated[list[str], typer.Argument(
        metavar="[ADDRESS] SUSPECT", show_default=False,
        help="The model to check (folder, file, or hf://owner/name[@rev]); with --ray, optionally preceded by the "
             "Ray ADDRESS.")],
    candidate: Annotated[list[str], typer.Option("--candidate", "-c", help="A possible ancestor; repeat for more.")],
    base: Annotated[str | None, typer.Option(help="The common base of the candidates, if known (enables task "
                                             "arithmetic, TIES, DARE detection).")] = None,
    sample: Annotated[float | None, typer.Option(help="Read only this fraction of rows per tensor (e.g. 0.01); "
                                                 "of a remote MoE also only a seeded subset of routed experts "
                                                 "(docs/remote.md).")] = None,
    json_out: JsonOpt = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read .bin pickles with the restricted loader.")]
    = False,
    verify: Annotated[bool, typer.Option("--verify", help="Replay the recovered recipe with modeltrace's own merge "
                                         "code and report how closely it reproduces the suspect.")] = False,
    recipe_out: Annotated[Path | None, typer.Option("--recipe", help="Write the recovered recipe as mergekit YAML "
                                                    "to this file.")] = None,
    fail_on_derived: Annotated[bool, typer.Option("--fail-on-derived", help="Exit 1 unless the suspect comes out "
                                                  "independent of every candidate (CI gate).")] = False,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    fail_on: FailOnOpt = None,
    hashes: Annotated[bool, typer.Option("--hashes", help="Evidence: hash every local weight file of every model in "
                                         "full (default: the suspect in full, others sampled).")] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Stream the weights in N local worker "
                                                "processes, the suspect's shards spread over them (default, and "
                                                "1: threads in this process). Same results.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Stream the weights as Ray tasks, grouped by the suspect's "
                                      "shard: " + RAY_ADDRESS_HELP + " Same results.")] = False,
    timeout: TimeoutOpt = None,
    connections: ConnectionsOpt = None,
    budget: BudgetOpt = None,
) -> None:
    """What was SUSPECT made from, and exactly how? Compares weights tensor by tensor, streaming.

    Answers copy, recast, finetune, merge (method, weights with 95% intervals, SLERP t, density), stack, partial
    or independent, with p-values for "independent of candidate X".

    The streaming pass runs on this machine's threads by default; --workers N spreads it over N local processes
    and --ray over a Ray cluster (one task per suspect shard, larger shards split). The verdict and the report
    are the same either way; only the time differs.

    Usage: modeltrace audit [--ray [ADDRESS]] SUSPECT -c CANDIDATE [-c ...]

    Examples: modeltrace audit ./rio --candidate ./nex --candidate ./qwen;
    modeltrace audit --ray auto hf://org/rio -c hf://org/nex -c hf://org/qwen --sample 0.05
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from modeltrace.audit import DEFAULT_AUDIT_CHUNK, run_audit
    from modeltrace.engine import split_address
    from modeltrace.progress import RemoteReadsColumn
    from modeltrace.report.build import audit_parameters, audit_subject, new_report
    from modeltrace.report.gate import check_gates
    from modeltrace.sources.base import recording_remote_ranges
    from modeltrace.verdict import decide

    address, suspect_spec = split_address(list(suspect), ray, "audit takes one SUSPECT (preceded by a Ray ADDRESS "
                                          "only with --ray)")
    fmt = _report_format(fmt, json_out, output)
    if recipe_out is not None:
        check_output(recipe_out)
    gates = check_gates(fail_on)
    nbytes = remote_limits(timeout, connections, budget)
    show = (fmt is None or output is not None) and err.is_terminal
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), RemoteReadsColumn(),
                  TimeRemainingColumn(), console=err, disable=not show, transient=True) as bar:
        task = bar.add_task("opening models", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, description="streaming weights", completed=done * 4, total=total * 4)

        with recording_remote_ranges():
            run = run_audit(suspect_spec, list(candidate), base=base, sample=sample, progress=progress,
                            allow_pickle=allow_pickle, workers=workers, ray=ray, address=address, budget=nbytes)
    verdict = decide(run)
    from modeltrace.recipe import replay, to_mergekit, to_yaml

    cfg = to_mergekit(verdict, verdict["sources"])
    verdict["mergekit_yaml"] = to_yaml(cfg) if cfg else None
    if recipe_out is not None and cfg:
        recipe_out.write_text(verdict["mergekit_yaml"])
    if verify:
        verdict["verify"] = replay(verdict, verdict["sources"], cfg) if cfg else {
            "replayed": False, "reason": "no merge recipe to replay"}
    params = audit_parameters(list(candidate), base, run.sample, DEFAULT_AUDIT_CHUNK, allow_pickle, hashes)
    subject, findings = audit_subject(run, verdict, params, full_hashes=hashes, allow_pickle=allow_pickle)
    report = new_report("audit", [subject], findings)
    deliver(report, fmt, output, lambda: render_audit(verdict))
    gate(report, gates)
    if fail_on_derived and verdict["relation"] != "independent":
        raise typer.Exit(1)


@app.command("demo")
@guarded
def demo_cmd(
    workdir: Annotated[Path | None, typer.Option(help="Where to build the example models (default: a temp dir).")]
    = None,
    json_out: JsonOpt = False,
    fmt: FormatOpt = None,
    output: OutputOpt = None,
) -> None:
    """Build a miniature Rio case from real pretrained weights (MiniLM) and audit it. No network needed.

    It makes "nex-mini" (a fine-tune-like derivative of MiniLM), "rio-mini" = 0.6 x nex-mini + 0.4 x MiniLM
    released as if original, and an independent model of the same shape; then audits rio-mini against the others.
    """
    from modeltrace.demo import run_demo

    fmt = _report_format(fmt, json_out, output)
    report = run_demo(workdir, console=out, text=fmt is None or output is not None)
    deliver(report, fmt, output, lambda: None)


def _click_errors() -> tuple[type[Exception], type[Exception]]:
    """(UsageError, ClickException) of the click typer runs on (its own copy since typer 0.2x, click before)."""
    mro = typer.BadParameter.__mro__
    return (next(c for c in mro if c.__name__ == "UsageError"), next(c for c in mro if c.__name__ == "ClickException"))


def main() -> None:
    from modeltrace.commands import register_all

    register_all(app)
    sys.stdout = ScrubbingStream(sys.stdout)  # type: ignore[assignment]
    sys.stderr = ScrubbingStream(sys.stderr)  # type: ignore[assignment]
    usage_error, click_exception = _click_errors()
    code: Any = 0
    try:
        code = app(standalone_mode=False)
    except usage_error as exc:  # one line, not a usage block and a box
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            sys.stdout.write(ctx.get_help() + "\n")  # a bare `modeltrace` or `modeltrace index`: the help
            code = 0
        else:
            names = []
            while ctx is not None and ctx.parent is not None:  # the sub-command path, whatever the program is called
                names.append(ctx.info_name)
                ctx = ctx.parent
            where = " ".join(["modeltrace", *reversed(names)])
            err.print(f"modeltrace: error: {scrub(exc.format_message())} (see `{where} --help`)",  # type: ignore[attr-defined]
                      markup=False, highlight=False, soft_wrap=True)
            code = 2
    except click_exception as exc:
        err.print(f"modeltrace: error: {scrub(exc.format_message())}", markup=False, highlight=False,  # type: ignore[attr-defined]
                  soft_wrap=True)
        code = getattr(exc, "exit_code", 2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("modeltrace: interrupted", markup=False)
        code = 130
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
