"""The public API: one function per question, each returning a typed, frozen result (modeltrace/results.py).

    inspect(model)                          what a checkpoint is (headers only; `hashes=True` reads everything)
    audit(suspect, candidates, base)        what it was made from, and exactly how (streams the weights once)
    identify(suspect, index)                which indexed models it is made from (fingerprints only)
    fingerprint(model)                      the small sample of a model an `Index` keeps (Index.add)
    probe_identity(model) / probe_compare   behavioural evidence (local models or OpenAI-compatible endpoints)
    load_report(path), render(report, fmt), save(report, path)    reports without re-running anything
    verify(report), verify_attestation(report, bundle)             re-check a report, or a signed attestation

Data flow of `audit`, the one pipeline the command line, the demo and `verify` share (report/pipeline.py): open and
stream the models (audit.run_audit) -> verdict.decide -> the recipe as mergekit configuration and, with `verify`,
its replay (recipe.py) -> the report subject (report/build.py: card audit, ancestors' licences, evidence) ->
AuditResult.
The command line (cli.py) only turns flags into options and prints what comes back. Heavy modules are imported
inside the functions, so `import modeltrace` stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modeltrace.errors import InputError
from modeltrace.options import AuditOptions, ProbeOptions, ReadOptions, remote_limits

if TYPE_CHECKING:  # the results import pydantic: each function imports them when it builds one
    from modeltrace.fingerprint.core import Fingerprint
    from modeltrace.index.store import Index
    from modeltrace.provenance.check import BundleResult
    from modeltrace.report.verify import VerifyResult
    from modeltrace.results import (
        AuditResult,
        CompareProbe,
        IdentifyResult,
        IdentityProbe,
        InspectResult,
        Report,
    )

__all__ = ["audit", "fingerprint", "identify", "inspect", "load_report", "probe_compare", "probe_identity", "render",
           "save", "verify", "verify_attestation"]

#: (done, total) in bytes of the streaming pass
Progress = Callable[[int, int], None]


def inspect(model: str | Path, *, hashes: bool = False, options: ReadOptions | None = None) -> InspectResult:
    """Describe a checkpoint: architecture, parameters (MoE aware), dtypes, shards, tokenizer, model card and its
    problems. Only headers and small metadata files are read, unless `hashes` (file SHA-256s and the content
    digest: every byte)."""
    from modeltrace.align.view import label_for
    from modeltrace.describe import describe
    from modeltrace.report.build import inspect_subject, new_report
    from modeltrace.results import Description, InspectResult
    from modeltrace.sources import open_source
    from modeltrace.sources.base import recording_remote_ranges

    o = options or ReadOptions()
    spec = str(model)
    with remote_limits(o), recording_remote_ranges(), open_source(spec, allow_pickle=o.allow_pickle) as src:
        d = describe(src, hashes=hashes)
        if hashes:
            from modeltrace.provenance.content import content_digest

            d["content"] = content_digest(src).to_dict()
        subject, findings = inspect_subject(label_for(spec), spec, d, src, hashes=hashes)
    return InspectResult(description=subject.description or Description.model_validate(d),
                         report=new_report("inspect", [subject], findings))


def audit(suspect: str | Path, candidates: Sequence[str | Path], base: str | Path | None = None,
          options: AuditOptions | None = None, *, progress: Progress | None = None) -> AuditResult:
    """What was `suspect` made from, and exactly how? Compares its weights with each candidate's, tensor by tensor,
    in one streaming pass: relation (copy, recast, finetune, merge, stack, partial, related, independent), merge
    method and recipe with 95% intervals, per-layer rows and p-values of independence; then its model card against
    those findings. `base`: the candidates' common base, when known (task arithmetic, TIES, DARE)."""
    return audit_subjects(str(suspect), [str(c) for c in candidates], None if base is None else str(base),
                          options or AuditOptions(), progress=progress)


def audit_subjects(suspect: str, candidates: list[str], base: str | None, o: AuditOptions,
                   progress: Progress | None = None, seeds: dict[str, Any] | None = None,
                   command: str = "audit") -> AuditResult:
    """`audit` with the report's seeds and command named (the demo audits two models into one report)."""
    from modeltrace.report.pipeline import audit_pipeline

    done = audit_pipeline(suspect, candidates, base, o, progress=progress, seeds=seeds)
    from modeltrace.report.build import new_report  # after the reading: the first byte does not wait for them
    from modeltrace.results import AuditResult, Recipe, Replay

    recipe = None if done.recipe is None else Recipe(method=done.recipe["merge_method"], config=done.recipe,
                                                      yaml=done.recipe_yaml or "")
    replayed = None if done.replay is None else Replay.model_validate(done.replay)
    assert done.subject.audit is not None
    return AuditResult(verdict=done.subject.audit, recipe=recipe, replay=replayed,
                       report=new_report(command, [done.subject], done.findings))


def fingerprint(model: str | Path, *, options: ReadOptions | None = None) -> Fingerprint:
    """A model's fingerprint: a deterministic sample of every canonical tensor (at most ~16 MB, Range reads only for
    hf:// models), what `Index.add` stores and `identify` compares."""
    from modeltrace.fingerprint import make_fingerprint

    o = options or ReadOptions()
    with remote_limits(o):
        return make_fingerprint(str(model), allow_pickle=o.allow_pickle)


def identify(suspect: str | Path, index: Index | str | Path | None = None, *, top: int = 5, digest: bool = False,
             options: ReadOptions | None = None, progress: Progress | None = None) -> IdentifyResult:
    """Which indexed models is `suspect` made from, and how? Ranks the index (an open `Index`, a path, or None for
    $MODELTRACE_INDEX / the default) by evidence of ancestry, p-values Holm-adjusted over all of it, and recovers
    relation and recipe from fingerprints; `audit_command` confirms it on the weights. `digest`: also compute the
    suspect's content digest (reads every tensor), so identical models are named at once; `progress(done, total)`
    in bytes of that digest."""
    from modeltrace.identify import identify as run_identify
    from modeltrace.index.store import Index, default_index_path
    from modeltrace.results import IdentifyResult

    o = options or ReadOptions()
    if top < 1:
        raise InputError("top must be at least 1")
    spec = str(suspect)
    with remote_limits(o):
        owned = not isinstance(index, Index)
        ix = index if isinstance(index, Index) else Index(Path(index) if index is not None else default_index_path())
        try:
            fp = fingerprint(spec, options=o)
            cd = None
            if digest:
                from modeltrace.provenance.content import digest_model

                cd = digest_model(spec, allow_pickle=o.allow_pickle, progress=progress)
            doc = run_identify(fp, ix, top=top, digest=cd)
        finally:
            if owned:
                ix.close()
    return IdentifyResult.from_document(doc)


def probe_identity(model: str, *, languages: Sequence[str] | None = None, questions: int | None = None,
                   samples: int = 1, system_prompt: str | None = None, no_system_prompt: bool = False,
                   expect: Sequence[str] | None = None, options: ProbeOptions | None = None,
                   progress: Callable[[int], None] | None = None) -> IdentityProbe:
    """Ask `model` who it is (128 questions in en, pt, es and zh; `questions` per language, `samples` answers each)
    and count the names its answers give, with 95% intervals; `expect`: names it should give."""
    from modeltrace.probes.backends import open_backend
    from modeltrace.probes.bank import select_questions
    from modeltrace.probes.identity import run_identity
    from modeltrace.probes.reporting import identity_report
    from modeltrace.results import IdentityProbe

    o = options or ProbeOptions()
    if system_prompt is not None and no_system_prompt:
        raise InputError("--system-prompt and --no-system-prompt are exclusive")
    if samples < 1 or (o.max_tokens is not None and o.max_tokens < 1):
        raise InputError("--samples and --max-tokens must be at least 1")
    qs = select_questions(list(languages) if languages else None, questions)
    with open_backend(model, **_backend_options(o, len(qs) * samples)) as backend:
        rep = run_identity(backend, qs, samples=samples, system_prompt=system_prompt,
                           no_system_prompt=no_system_prompt, expected=list(expect) if expect else None,
                           max_tokens=o.max_tokens or 200, temperature=o.temperature, top_p=o.top_p, seed=o.seed,
                           progress=progress)
    return IdentityProbe(summary=rep["summary"], names=rep["names"], warnings=rep["warnings"],
                         report=identity_report(rep, model), data=rep)


def probe_compare(suspect: str, candidates: Sequence[str], references: Sequence[str] = (), *, prompts: int = 48,
                  positions: int = 8, alpha: float = 0.01, options: ProbeOptions | None = None,
                  progress_factory: Callable[[str, int], Callable[[int], None]] | None = None) -> CompareProbe:
    """Which candidate does `suspect` behave like? The same prompts to every model; greedy outputs and next-token
    distributions compared against unrelated `references`, Holm-adjusted p-values. `progress_factory(label, total)`
    gives the callback that counts one model's answers."""
    from modeltrace.probes.backends import open_backend
    from modeltrace.probes.compare import run_compare
    from modeltrace.probes.reporting import compare_report
    from modeltrace.results import CompareProbe

    o = options or ProbeOptions()
    max_tokens = o.max_tokens or 32
    if not 0 < alpha < 1 or max_tokens < 1 or positions < 1:
        raise InputError("--alpha must be in (0, 1); --max-tokens and --positions at least 1")
    backend_opts = _backend_options(o, 4 * prompts)
    rep = run_compare(suspect, list(candidates), list(references), lambda spec: open_backend(spec, **backend_opts),
                      n_prompts=prompts, max_tokens=max_tokens, positions=positions, seed=o.seed, alpha=alpha,
                      progress_factory=progress_factory)
    return CompareProbe(summary=rep["summary"], models=rep["models"], warnings=rep["warnings"],
                        report=compare_report(rep, suspect), data=rep)


def _backend_options(o: ProbeOptions, planned: int) -> dict[str, Any]:
    return {"endpoint": o.endpoint, "api_key_env": o.api_key_env, "concurrency": o.concurrency,
            "timeout": o.timeout, "retries": o.retries, "budget": o.budget or 2 * planned, "device": o.device}


def verify(report: str | Path | Report, *, tolerance: float = 0.02, allow_pickle: bool = False) -> VerifyResult:
    """Re-check a report against the same sources: file hashes, pinned remote commits and byte ranges, and every
    conclusion re-derived with the recorded parameters (the audit through the same pipeline). `.ok` when all match;
    each difference is a check with its explanation."""
    from modeltrace.report.model import Report
    from modeltrace.report.verify import verify_report

    if tolerance < 0:
        raise InputError("tolerance must be >= 0")
    doc = report if isinstance(report, Report) else load_report(report)
    return verify_report(doc, tolerance=tolerance, allow_pickle=allow_pickle)


def verify_attestation(report: str | Path, bundle: str | Path, *, key: str | Path | None = None,
                       trust_roots: Sequence[str | Path] = (), model: str | None = None, recompute: bool = False,
                       tolerance: float = 0.02, allow_pickle: bool = False) -> BundleResult:
    """Check a signed attestation (`modeltrace attest`): its signature against the trusted `key` or `trust_roots`,
    that `report` is the attested report, that the model in hand (`model`, default where the report says) has the
    attested content digest; `recompute` also re-derives the finding."""
    from modeltrace.provenance.check import verify_bundle

    if (key is None) == (not trust_roots):
        raise InputError("an attestation needs the signer's trust: exactly one of key or trust_roots")
    return verify_bundle(Path(report), Path(bundle), None if key is None else Path(key),
                         [Path(t) for t in trust_roots], model, recompute, tolerance, allow_pickle)


def load_report(path: str | Path) -> Report:
    """A report written with `--format json` (or `save(report, "x.json")`); any schema 1.x; one-line errors."""
    from modeltrace.report.model import load_report as load

    return load(path)


def render(report: Report, fmt: str = "json") -> str:
    """The report as text: json, md, html, cyclonedx (CycloneDX 1.6 ML-BOM) or spdx (SPDX 3.0.1 AI)."""
    from modeltrace.report import formats

    return formats.render(report, fmt)


def save(report: Report, path: str | Path, fmt: str | None = None) -> int:
    """Write the report (format from `fmt`, else from the file name: .json, .md, .html, .cdx.json, .spdx.json),
    atomically; returns its size in bytes."""
    from modeltrace.report import formats

    out = Path(path)
    return formats.write(report, fmt or formats.format_for(out), out)
