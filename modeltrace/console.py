"""Terminal side of the commands, shared by cli.py and the command modules (modeltrace/commands): library errors
turned into one line and a stable exit code, the report options, and the summaries printed for people.

Data flow: a command calls the library (modeltrace/api.py), gets typed results, and hands them here to be printed
(`render_*`) and delivered in the asked report format (`deliver`), then gated (`gate`). Nothing here decides anything.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modeltrace.errors import InputError, ModelTraceError
from modeltrace.redact import scrub

__all__ = ["ConnectionsOpt", "BudgetOpt", "FailOnOpt", "FormatOpt", "JsonOpt", "OutputOpt", "TimeoutOpt",
           "byte_progress", "check_output", "deliver", "err", "gate", "guarded", "out", "print_json", "render_audit",
           "render_description", "render_findings", "report_format"]

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



@contextmanager
def byte_progress(description: str, visible: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr (only on a terminal) for a pass over bytes; yields `progress(done, total)`."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, disable=not err.is_terminal, transient=True) as bar:
        task = bar.add_task(description, total=None, visible=visible)
        yield lambda done, total: bar.update(task, completed=done, total=total)

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


def report_format(fmt: str | None, json_out: bool, output: Path | None) -> str | None:
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
        if ver.get("replayed") and ver.get("median_rel_error") is None:
            out.print(f"verify: replayed {ver['method']}: no tensor could be compared ({ver.get('skipped', 0)} "
                      "skipped)", markup=False)
        elif ver.get("replayed"):
            out.print(f"verify: replayed {ver['method']} on {ver['tensors']} tensors: median relative error "
                      f"{ver['median_rel_error']:.2e}, max {ver['max_rel_error']:.2e} ({ver['worst_tensor']})",
                      markup=False)
        else:
            out.print(f"verify: not replayed: {ver['reason']}", markup=False)
    for w in v.get("warnings", []):
        err.print(f"warning: {w}", markup=False, highlight=False)
    out.print(f"read {_human_bytes(v['bytes_read'])} in {v['elapsed_s']:.1f} s", style="dim")


_report_format = report_format  # the name command modules used before console.py existed
