"""Markdown: the report as a pull-request comment, issue or wiki page (GitHub-flavoured tables)."""

from __future__ import annotations

from modeltrace.report.formats import ReportFormat
from modeltrace.report.model import Report, Subject
from modeltrace.report.plain import headline

SEVERITY_MARK = {"critical": "🟥 critical", "high": "🟧 high", "medium": "🟨 medium", "low": "⬜ low", "info": "info"}


def _cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def _num(x: float | None, nd: int = 4) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


class MarkdownFormat(ReportFormat):
    name = "md"
    suffixes = (".md",)

    def render(self, report: Report) -> str:
        lines = [f"# modeltrace {report.command} report", "",
                 f"modeltrace {report.tool.version} · {report.created} · schema {report.schema_version}", ""]
        for s in report.subjects:
            lines += self._subject(report, s)
        return "\n".join(lines).rstrip() + "\n"

    def _subject(self, report: Report, s: Subject) -> list[str]:
        title, sentence, _tone = headline(s)
        out = [f"## {s.name}: {title}", "", f"> **{title}.** {sentence}", ""]
        v = s.audit
        if v is not None and v.summary:
            out += [f"Technical summary: {v.summary}", ""]
        findings = [f for f in report.findings if f.subject == s.name]
        if findings:
            out += ["### Findings", ""]
            out += _table(["severity", "finding", "detail"],
                          [[SEVERITY_MARK[f.severity], f"{f.title} (`{f.code}`)", f.detail] for f in findings])
        if v is not None:
            if v.parents and v.parents[0].weight is not None:
                out += ["### Recipe", ""]
                out += _table(["parent", "weight", "95% interval"],
                              [[p.model, _num(p.weight), f"[{_num((p.interval or [None])[0])}, "
                                f"{_num((p.interval or [None, None])[-1])}]"] for p in v.parents])
            if v.p_values:
                out += ["### Independence tests", "", "H0: the suspect is independent of the candidate.", ""]
                out += _table(["candidate", "p-value"], [[k, p.text] for k, p in v.p_values.items()])
            if v.layer_map:
                out += ["### Layer map", ""]
                out += _table(["suspect layer", "from", "layer"],
                              [[e.layer, e.model, e.source_layer] for e in v.layer_map])
            elif v.layers:
                out += ["### Per layer", ""]
                out += _table(["layer", "method", "weights", "R² min"],
                              [["emb/head" if e.layer < 0 else e.layer, e.method,
                                ", ".join(f"{k} {_num(w, 3)}" for k, w in e.weights.items()), _num(e.r2_min, 5)]
                               for e in v.layers])
            if v.mergekit_yaml:
                out += ["### Recipe as mergekit YAML", "", "```yaml", v.mergekit_yaml.rstrip(), "```", ""]
        for probe in s.probes:
            out += [f"### Probe: {probe.probe} ({probe.questions} questions)", ""]
            out += _table(["answer names", "share", "95% interval"],
                          [[x.name, f"{100 * x.share:.1f}%", f"[{100 * (x.interval[0] or 0):.1f}%, "
                            f"{100 * (x.interval[1] or 0):.1f}%]"] for x in probe.shares])
        if s.card is not None:
            c = s.card
            out += ["### Model card", ""]
            out += _table(["field", "value"], [
                ["present", "yes" if c.present else "no"],
                ["base_model", ", ".join(c.base_model) or "–"],
                ["base_model_relation", c.base_model_relation or "–"],
                ["license", c.license or "–"]])
        if s.ancestors:
            out += ["### Ancestors", ""]
            out += _table(["model", "relation", "licence (from its card)", "independence"],
                          [[a.model, a.relation, a.license or "unknown", a.p_text or "–"] for a in s.ancestors])
        if s.evidence is not None:
            e = s.evidence
            out += ["### Evidence", "", f"Hashing: {e.hashing}.", ""]
            out += _table(["source", "role", "location", "files", "hashes", "ranges read", "bytes read"],
                          [[x.label, x.role, x.location + (f" @ {x.commit[:12]}" if x.commit else ""),
                            len(x.files), _hash_kind(x), len(x.ranges), x.bytes_read] for x in e.sources])
            out += [f"Parameters: `{_cell(e.parameters)}`", ""]
        return out


def _hash_kind(src) -> str:
    kinds = set()
    for f in src.files:
        kinds.add("full" if f.sha256 else "hub" if f.lfs_sha256 else "sampled" if f.sample_sha256 else "none")
    return ", ".join(sorted(kinds))
