"""The core commands: `inspect`, `audit` and `demo`. Each turns its flags into the library's options, calls the public
API (modeltrace/api.py) and prints what comes back (modeltrace/console.py). No provenance logic lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modeltrace.console import (
    BudgetOpt,
    ConnectionsOpt,
    FailOnOpt,
    FormatOpt,
    JsonOpt,
    OutputOpt,
    TimeoutOpt,
    check_output,
    deliver,
    err,
    gate,
    guarded,
    out,
    render_audit,
    render_description,
    report_format,
)
from modeltrace.engine import RAY_ADDRESS_HELP

__all__ = ["audit_cmd", "demo_cmd", "inspect_cmd", "register"]


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_cmd)
    app.command("audit")(audit_cmd)
    app.command("demo")(demo_cmd)


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
    from modeltrace.api import inspect
    from modeltrace.options import ReadOptions
    from modeltrace.report.gate import check_gates

    fmt = report_format(fmt, json_out, output)
    gates = check_gates(fail_on)
    result = inspect(model, hashes=hashes, options=ReadOptions(allow_pickle=allow_pickle, timeout=timeout,
                                                                connections=connections))
    deliver(result.report, fmt, output, lambda: render_description(result.document()))
    gate(result.report, gates)


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

    from modeltrace.api import audit
    from modeltrace.engine import split_address
    from modeltrace.options import AuditOptions
    from modeltrace.progress import RemoteReadsColumn
    from modeltrace.report.gate import check_gates

    address, suspect_spec = split_address(list(suspect), ray, "audit takes one SUSPECT (preceded by a Ray ADDRESS "
                                          "only with --ray)")
    fmt = report_format(fmt, json_out, output)
    if recipe_out is not None:
        check_output(recipe_out)
    gates = check_gates(fail_on)
    options = AuditOptions(sample=sample, allow_pickle=allow_pickle, workers=workers, ray=ray, address=address,
                           timeout=timeout, connections=connections, budget=budget, hashes=hashes, verify=verify)
    show = (fmt is None or output is not None) and err.is_terminal
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), RemoteReadsColumn(),
                  TimeRemainingColumn(), console=err, disable=not show, transient=True) as bar:
        task = bar.add_task("opening models", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, description="streaming weights", completed=done * 4, total=total * 4)

        result = audit(suspect_spec, list(candidate), base=base, options=options, progress=progress)
    if recipe_out is not None and result.recipe is not None:
        recipe_out.write_text(result.recipe.yaml)
    deliver(result.report, fmt, output, lambda: render_audit(result.document()))
    gate(result.report, gates)
    if fail_on_derived and result.relation != "independent":
        raise typer.Exit(1)


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

    fmt = report_format(fmt, json_out, output)

    def show(title: str, verdict: dict) -> None:
        out.rule(title)
        render_audit(verdict)

    report = run_demo(workdir, show=show if fmt is None or output is not None else None)
    deliver(report, fmt, output, lambda: None)
