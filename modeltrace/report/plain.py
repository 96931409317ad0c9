"""The verdict in plain words, for the first lines a moderator, lawyer or reviewer reads (Markdown and HTML)."""

from __future__ import annotations

from modeltrace.report.model import Subject, Verdict

HEADLINES = {
    "copy": "Byte-for-byte copy",
    "recast": "Copy in a different number format",
    "finetune": "Fine-tune of an existing model",
    "merge": "Merge of existing models",
    "stack": "Layers stacked from existing models",
    "partial": "Partly derived from an existing model",
    "related": "Related to an existing model (which came first is not known)",
    "upcycled": "Mixture of experts made from an existing dense model",
    "independent": "No relation found",
}
#: verdict tone for colour: derived findings are what a reader must act on
TONE = {"independent": "ok", "copy": "bad", "recast": "bad"}


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1] if names else "?"


def _pct(w: float | None) -> str:
    return "?" if w is None else f"{100 * w:.0f}%"


def plain_verdict(v: Verdict) -> str:
    """Two or three sentences a non-specialist can act on, with the strength of the evidence in words."""
    s, parents = v.suspect, v.parents
    names = [p.model for p in parents]
    if v.relation == "copy":
        text = f"{s} is the same file content as {names[0]}: every tensor is identical."
    elif v.relation == "recast":
        text = f"{s} is {names[0]} saved in a different number format; the values match up to rounding."
    elif v.relation == "finetune":
        chain = getattr(v, "chain", None)
        if chain:
            text = (f"{s} was made by mixing {_and(names)} and then training the result further: its weights are "
                    "such a mix plus a change that no mixing explains.")
        else:
            text = (f"{s} is {names[0]} with further training on top: its weights are {names[0]}'s plus a small "
                    "change.")
    elif v.relation == "merge":
        if v.method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "breadcrumbs", "sparse",
                        "model_stock"):
            text = (f"{s} was made by adding the changes of {', '.join(names)} onto the base model {v.base} "
                    f"({v.method} merge).")
        elif v.method == "slerp":
            t = (v.parameters or {}).get("t", {})
            text = (f"{s} was made by blending {' and '.join(names)} along a curve (SLERP), "
                    f"with mixing factor t = {t.get('value', '?') if isinstance(t, dict) else t}.")
        else:
            ranges = _layer_ranges(v)
            if ranges:
                mix = " and ".join(f"{p.model} ({ranges[p.model]})" if p.model in ranges else p.model for p in parents)
                text = (f"{s} was made by mixing existing models, {mix}, with a share that changes from layer to "
                        f"layer ({v.method or 'linear'} merge).")
            else:
                mix = " and ".join(f"{_pct(p.weight)} {p.model}" for p in parents)
                text = f"{s} was made by mixing existing models: {mix} ({v.method or 'linear'} merge)."
        text += " It is not an original model."
    elif v.relation == "stack":
        text = (f"{s} was assembled by stacking whole layers taken from {_and(names)}. It is not an original "
                "model.")
    elif v.relation == "upcycled":
        text = (f"{s} was made by copying the feed-forward block of {names[0]} into every expert of a mixture of "
                f"experts (upcycling), then training it further. It is not an original model.")
    elif v.relation == "related":
        text = (f"{s} and {_and(names)} share their training history: one was trained from the other, or both from "
                "a common model that was not among those compared. The weights alone cannot say which came first; "
                "compare against their common base to settle it.")
    elif v.relation == "partial":
        text = f"Some layers of {s} come from {', '.join(_related(v)) or 'a candidate'}; the others show no relation."
    else:
        compared = ", ".join(v.candidates) or "no model"
        text = (f"No sign that {s} was made from {compared}. This says nothing about models it was not compared "
                "with.")
    return text + " " + _strength(v)


def _layer_ranges(v: Verdict) -> dict[str, str]:
    """'80% to 20%' per parent when its weight varies across layers by more than 5 points (a layer gradient)."""
    out = {}
    for p in v.parents:
        ws = [e.weights.get(p.model) for e in v.layers if e.layer >= 0]
        ws = [w for w in ws if w is not None]
        if len(ws) >= 2 and max(ws) - min(ws) > 0.05:
            out[p.model] = f"{_pct(ws[0])} in the first layer to {_pct(ws[-1])} in the last"
    return out


def _related(v: Verdict) -> list[str]:
    return [n for n, p in v.p_values.items() if p.p < 1e-6]


def _strength(v: Verdict) -> str:
    if not v.p_values:
        return ""
    best = min(v.p_values.items(), key=lambda kv: kv[1].log10_p)
    name, p = best
    if v.relation == "independent":
        return (f"The closest candidate, {name}, is fully consistent with independent training ({p.text}).")
    return (f"How sure: the chance that two independently trained models look this alike is {p.text} "
            f"(for {name}).")


def headline(subject: Subject) -> tuple[str, str, str]:
    """(title, plain sentence, tone) for a subject: its audit verdict, else what inspect found."""
    if subject.audit is not None:
        v = subject.audit
        return HEADLINES.get(v.relation, v.relation), plain_verdict(v), TONE.get(v.relation, "warn")
    d = subject.description
    if d is not None:
        arch = d.architecture.get("model_type") or d.architecture.get("family") or "unknown architecture"
        n = f"{d.parameters:,} parameters" if d.parameters else "unknown size"
        return "Model description", f"{subject.name}: {arch}, {n}, {d.layers or '?'} layers.", "info"
    return subject.name, "", "info"
