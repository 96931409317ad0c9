"""The audit pipeline, assembled once: stream and compare the models (audit.run_audit) -> verdict.decide -> the recipe
as mergekit configuration and, when asked, its replay (recipe.py) -> the report subject and findings (report/build.py:
card audit, ancestors' licences, evidence).

`modeltrace.audit` (api.py), the demo (through the API) and `modeltrace verify`'s re-run (report/verify.py) all call
`audit_pipeline`; nothing else strings these steps together. Memory: what run_audit holds (bounded by chunk_bytes
per model) plus the per-slot statistics; the report is small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modeltrace.options import AuditOptions, remote_limits

if TYPE_CHECKING:
    from modeltrace.audit import AuditRun
    from modeltrace.report.model import Finding, Subject

__all__ = ["AuditOutcome", "audit_pipeline"]


@dataclass(frozen=True)
class AuditOutcome:
    """Everything one audit produced: the streamed run (views, slot results), the verdict as the report records it,
    the recipe as a mergekit configuration (and its YAML), the replay's measurements, and the report subject with its
    findings. (The API wraps the recipe and replay in its typed results.)"""

    run: AuditRun
    verdict: dict[str, Any]
    recipe: dict[str, Any] | None
    recipe_yaml: str | None
    replay: dict[str, Any] | None
    subject: Subject
    findings: list[Finding]


def audit_pipeline(suspect: str, candidates: list[str], base: str | None, o: AuditOptions, *,
                   progress: Callable[[int, int], None] | None = None, seeds: dict[str, Any] | None = None,
                   parameters: dict[str, Any] | None = None, evidence: bool = True) -> AuditOutcome:
    """Audit `suspect` against `candidates` with options `o`. `parameters`: the report's recorded parameters (verify
    re-runs with those of the report it checks; default: from `o`); `evidence=False` skips hashing (verify checks the
    files on its own)."""
    from modeltrace.audit import run_audit
    from modeltrace.sources.base import recording_remote_ranges

    nbytes = o.budget_bytes()
    with remote_limits(o, nbytes):
        with recording_remote_ranges():
            run = run_audit(suspect, candidates, base=base, sample=o.sample, chunk_bytes=o.chunk_bytes,
                            progress=progress, allow_pickle=o.allow_pickle, workers=o.workers, ray=o.ray,
                            address=o.address, budget=nbytes)
        from modeltrace.report.build import audit_parameters, audit_subject  # after the reading starts
        from modeltrace.verdict import decide

        verdict = decide(run)
        cfg, yaml, replayed = _recipe(verdict, o.verify)
        verdict["mergekit_yaml"] = yaml
        if replayed is not None:
            verdict["verify"] = replayed
        params = parameters if parameters is not None else audit_parameters(
            candidates, base, run.sample, o.chunk_bytes, o.allow_pickle, o.hashes)
        subject, findings = audit_subject(run, verdict, params, full_hashes=o.hashes, allow_pickle=o.allow_pickle,
                                          seeds=seeds, evidence=evidence)
    return AuditOutcome(run, verdict, cfg, yaml, replayed, subject, findings)


def _recipe(verdict: dict[str, Any], verify: bool
            ) -> tuple[dict[str, Any] | None, str | None, dict[str, Any] | None]:
    """(mergekit configuration, its YAML, the replay's measurements when `verify`)."""
    from modeltrace.recipe import replay, to_mergekit, to_yaml

    cfg = to_mergekit(verdict, verdict["sources"])
    yaml = to_yaml(cfg) if cfg else None
    if not verify:
        return cfg, yaml, None
    if cfg is None:
        return None, None, {"replayed": False, "reason": "no merge recipe to replay"}
    return cfg, yaml, replay(verdict, verdict["sources"], cfg)
