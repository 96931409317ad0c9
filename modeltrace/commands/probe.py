"""`modeltrace probe identity|compare`: behavioural evidence, for when only the model's outputs can be seen."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from modeltrace.console import FormatOpt, JsonOpt, OutputOpt, _report_format, deliver, err, guarded, out

probe_app = typer.Typer(
    name="probe",
    help="Behavioural evidence: what a model says it is (identity) and whose outputs it reproduces (compare). "
    "Runs a local model (the probe extra: pip install 'modeltrace\\[probe]') or asks any OpenAI-compatible "
    "endpoint.",
    no_args_is_help=True,
)

EndpointOpt = Annotated[str | None, typer.Option("--endpoint", help="An OpenAI-compatible endpoint (e.g. "
                                                 "http://127.0.0.1:8000/v1); MODEL is then a model it serves.")]
KeyEnvOpt = Annotated[str | None, typer.Option("--api-key-env", metavar="VAR", help="Read the API key from this "
                                               "environment variable (never printed or written to a report).")]
ConcOpt = Annotated[int, typer.Option(help="Endpoint: requests in flight at once.")]
TimeoutOpt = Annotated[float, typer.Option(help="Endpoint: seconds to wait for one response.")]
RetriesOpt = Annotated[int, typer.Option(help="Endpoint: retries per request after a time-out, 5xx, 429 or "
                                         "malformed response (exponential back-off, Retry-After honoured).")]
BudgetOpt = Annotated[int | None, typer.Option(help="Endpoint: at most this many HTTP requests, retries included "
                                               "(default: twice the planned requests).")]
DeviceOpt = Annotated[str, typer.Option(help="Local model: cpu, cuda, cuda:N or auto.")]


def register(app: typer.Typer) -> None:
    app.add_typer(probe_app, name="probe")


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=err, disable=not enabled, transient=True)


@probe_app.command("identity")
@guarded
def identity_cmd(
    model: Annotated[str, typer.Argument(help="A local model folder, a model served at --endpoint, or "
                                         "http(s)://HOST/v1#MODEL.")],
    system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="Send this system prompt (e.g. the "
                                                      "one the model is deployed with).")] = None,
    no_system_prompt: Annotated[bool, typer.Option("--no-system-prompt", help="Send an empty system turn, which "
                                                   "also removes a default the chat template would add.")] = False,
    samples: Annotated[int, typer.Option(help="Answers sampled per question.")] = 1,
    expect: Annotated[list[str] | None, typer.Option("--expect", help="A name the model should give (its claimed "
                                                     "identity); repeat for more. Always reported.")] = None,
    questions: Annotated[int | None, typer.Option("--questions", help="Ask only the first N questions of each "
                                                  "language (the bank has 32 per language).")] = None,
    language: Annotated[list[str] | None, typer.Option("--language", "-l", help="Only these languages (en, pt, "
                                                       "es, zh); repeat for more.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 200,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: the model's own).")]
    = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling (default: the model's own).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (local sampling; sent to endpoints).")] = 0,
    endpoint: EndpointOpt = None,
    api_key_env: KeyEnvOpt = None,
    concurrency: ConcOpt = 4,
    timeout: TimeoutOpt = 60.0,
    retries: RetriesOpt = 4,
    budget: BudgetOpt = None,
    device: DeviceOpt = "auto",
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Ask a model who it is, in four languages, and report the names it gives with 95% intervals.

    128 identity questions (English, Portuguese, Spanish, Chinese, several phrasings) are asked SAMPLES times each
    with the model's own sampling settings; the model and company names each answer declares are extracted and
    counted. Refusals, empty answers, answers in another language or script and failed requests are counted apart.

    Example: modeltrace probe identity ./rio --no-system-prompt --expect Rio
    """
    from modeltrace.api import probe_identity
    from modeltrace.options import ProbeOptions
    from modeltrace.probes.bank import select_questions

    fmt = _report_format(fmt, json_out, output)
    options = ProbeOptions(endpoint=endpoint, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                           retries=retries, budget=budget, device=device, max_tokens=max_tokens,
                           temperature=temperature, top_p=top_p, seed=seed)
    planned = len(select_questions(language, questions)) * max(samples, 1)  # also checks the languages now
    with _progress((fmt is None or output is not None) and err.is_terminal) as bar:
        task = bar.add_task("asking", total=planned)
        res = probe_identity(model, languages=language, questions=questions, samples=samples,
                             system_prompt=system_prompt, no_system_prompt=no_system_prompt, expect=expect,
                             options=options, progress=lambda k: bar.advance(task, k))
    deliver(res.report, fmt, output, lambda: render_identity(res.document()))


def render_identity(rep: dict) -> None:
    m, s, c = rep["model"], rep["settings"], rep["counts"]
    where = m.get("endpoint") or m.get("device", "")
    out.print(f"[bold]IDENTITY[/bold]  {m['model']}  ({m['backend']}{', ' + where if where else ''})",
              highlight=False)
    out.print(f"system prompt: {s['system_prompt']}; {s['questions']} questions ({', '.join(s['languages'])}) x "
              f"{s['samples_per_question']} sample(s); temperature {s['temperature']}, top_p {s['top_p']}",
              markup=False, highlight=False)
    t = Table(title="names the model gives (share of its answers that mention them)")
    t.add_column("name")
    t.add_column("kind")
    t.add_column("answers", justify="right")
    t.add_column("share [95% interval]", justify="right")
    for r in rep["names"][:15]:
        label = r["name"] + (" (expected)" if r["expected"] else "")
        t.add_row(label, r["kind"], f"{r['mentions']}/{r['n']}", r["text"])
    if not rep["names"]:
        t.add_row("(none)", "", "", "")
    out.print(t)
    out.print(f"answers {c['answers']} of {c['asked']} asked; no answer {c['errors']}"
              + (f" ({', '.join(f'{k} {v}' for k, v in sorted(c['error_kinds'].items()))})" if c["errors"] else "")
              + f"; empty {c['empty']}; refusals {c['refusals']}; naming no one {c['naming_no_one']}; "
              f"other language {c['other_language']}; other script {c['other_script']}", markup=False,
              highlight=False)
    shown = [a for a in rep["answers"] if a.get("status") == "answered" and a.get("names")][:3]
    for a in shown:
        out.print(f"  e.g. [{a['lang']}] {a['question']} -> {a['answer'][:120]!r}", markup=False, highlight=False)
    out.print(rep["summary"], markup=False, highlight=False)
    for w in rep["warnings"]:
        err.print(f"warning: {w}", markup=False, highlight=False)
    out.print("(every answer: --json, or --output FILE.json / .md / .html)", style="dim")


@probe_app.command("compare")
@guarded
def compare_cmd(
    suspect: Annotated[str, typer.Argument(help="The model to check (local folder, model at --endpoint, or "
                                           "http(s)://HOST/v1#MODEL).")],
    candidate: Annotated[list[str], typer.Option("--candidate", "-c", help="A possible origin; repeat for more.")],
    reference: Annotated[list[str] | None, typer.Option("--reference", "-r", help="A model known to be unrelated "
                                                        "to the suspect (the baseline); repeat, 2-5 is typical.")]
    = None,
    prompts: Annotated[int, typer.Option("--prompts", help="Prompts sent to every model (half random, half "
                                         "chosen by the suspect's entropy).")] = 48,
    max_tokens: Annotated[int, typer.Option(help="Greedy answer length, in tokens.")] = 32,
    positions: Annotated[int, typer.Option(help="Next-token distributions compared along the first N tokens of "
                                           "the suspect's answer (local models).")] = 8,
    alpha: Annotated[float, typer.Option(help="Significance level after Holm correction.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed for the prompt draw.")] = 0,
    endpoint: EndpointOpt = None,
    api_key_env: KeyEnvOpt = None,
    concurrency: ConcOpt = 4,
    timeout: TimeoutOpt = 60.0,
    retries: RetriesOpt = 4,
    budget: BudgetOpt = None,
    device: DeviceOpt = "auto",
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Which candidate does SUSPECT behave like? A black-box provenance test with p-values.

    The same prompts go to every model; the suspect's greedy answers (and next-token distributions, where
    available) are compared with each candidate's and with unrelated reference models' (the baseline). A candidate
    is named when it is closer to the suspect than every reference, Holm-Bonferroni corrected.

    Example: modeltrace probe compare ./suspect -c ./parent -c ./other -r ./unrelated1 -r ./unrelated2
    """
    from modeltrace.api import probe_compare
    from modeltrace.options import ProbeOptions

    fmt = _report_format(fmt, json_out, output)
    options = ProbeOptions(endpoint=endpoint, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                           retries=retries, budget=budget, device=device, max_tokens=max_tokens, seed=seed)
    with _progress((fmt is None or output is not None) and err.is_terminal) as bar:

        def factory(label: str, total: int):
            task = bar.add_task(label, total=total or None)
            return lambda k: bar.advance(task, k)

        res = probe_compare(suspect, list(candidate), list(reference or []), prompts=prompts, positions=positions,
                            alpha=alpha, options=options, progress_factory=factory)
    deliver(res.report, fmt, output, lambda: render_compare(res.document()))


def _short_names(specs: list[str]) -> dict[str, str]:
    """Last path component (or endpoint model id) when that is unambiguous: tables stay readable at 80 columns."""
    short = {x: x.split("#")[-1].rstrip("/").rsplit("/", 1)[-1] or x for x in specs}
    return short if len(set(short.values())) == len(short) else {x: x for x in specs}


def render_compare(rep: dict) -> None:
    s = rep["settings"]
    names = _short_names([rep["suspect"]["model"]] + [r["model"] for r in rep["models"]])
    out.print(f"[bold]COMPARE[/bold]  suspect {rep['suspect']['model']}  ({s['prompts']} prompts: "
              f"{s['random_prompts']} random, {s['entropy_prompts']} by entropy; tested on {rep['metric']} "
              "similarity)", highlight=False)
    t = Table(title="similarity to the suspect: mean over prompts ± 95% half-width")
    for col in ("model", "role", "greedy", "exact", "distribution", "p (Holm)", "verdict"):
        t.add_column(col, justify="left" if col in ("model", "role", "verdict") else "right")

    def fmt(x: dict | None) -> str:
        return "-" if not x else f"{x['mean']:.2f}±{(x['interval'][1] - x['interval'][0]) / 2:.2f}"

    for r in rep["models"]:
        verdict = "" if r["role"] != "candidate" else ("RELATED" if r["related"] else "none")
        t.add_row(names[r["model"]], r["role"], fmt(r["greedy"]), f"{100 * r['exact_match']:.0f}%",
                  fmt(r["distribution"]), r.get("p_text", ""), verdict)
    out.print(t)
    out.print(rep["summary"], markup=False, highlight=False)
    for w in rep["warnings"]:
        err.print(f"warning: {w}", markup=False, highlight=False)
