"""Model-card audit: what the card discloses (front matter, licence) against what the weights show.

A card is how a derivative is supposed to disclose itself: `base_model`, `base_model_relation`, `license`. The Hub
builds its model tree from those fields and silently ignores malformed ones, so every finding here says what a
reader of the Hub page would be misled about, with a severity a gate can act on (see `--fail-on`).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from modeltrace.card import parse_card, split_card
from modeltrace.report.licenses import HUB_ONLY, Licence, change_severity, parse_licence, same_terms
from modeltrace.report.model import Ancestor, CardInfo, Finding, Verdict

#: independence p-value below which a candidate counts as related (the verdict's own threshold)
ALPHA = 1e-6
#: what base_model_relation should say for each relation the weights show
EXPECTED_RELATION = {"merge": ("merge",), "stack": ("merge",), "finetune": ("finetune", "adapter"),
                     "recast": ("quantized", "finetune"), "copy": (), "partial": ("merge", "finetune"),
                     "related": ("finetune", "adapter", "merge", "quantized"), "upcycled": ("finetune",)}
UNDISCLOSED_CODE = {"merge": "undisclosed-merge", "stack": "undisclosed-merge", "finetune": "undisclosed-finetune",
                    "copy": "undisclosed-copy", "recast": "undisclosed-copy", "partial": "undisclosed-derivation",
                    "related": "undisclosed-relation", "upcycled": "undisclosed-finetune"}
CLAIMS_ORIGINAL = re.compile(r"\bfrom scratch\b|\bour own (?:original )?model\b|\boriginal model\b|"
                             r"\btrained (?:entirely )?in[- ]house\b|\bhome[- ]grown\b", re.I)
_COMMON_SPDX = ("apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0",
                "cc0-1.0", "gpl-3.0", "agpl-3.0", "lgpl-3.0", "mpl-2.0", "unlicense")
SEVERITY_BY_CODE = {"card-bad-yaml": "medium", "card-no-front-matter": "low", "card-field-type": "medium",
                    "card-field-value": "low"}
_CARD_TITLES = {"card-bad-yaml": "Card metadata unreadable", "card-no-front-matter": "Card has no metadata",
                "card-field-type": "Card field has the wrong type", "card-field-value": "Card field has a bad value"}


def _norm(name: str) -> str:
    s = name.strip().lower()
    for prefix in ("hf://", "https://huggingface.co/", "http://huggingface.co/"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    return s.split("@")[0].rstrip("/")


def refers_to(declared: str, label: str, spec: str | None = None) -> bool:
    """Whether a card's `base_model` entry names this model: same repository id, or same final name component
    (local folders are usually named after the repository they were downloaded from)."""
    d = _norm(declared)
    for x in (label, spec):
        if not x:
            continue
        n = _norm(x)
        if d == n or d.split("/")[-1] == n.split("/")[-1]:
            return True
    return False


def _licences(raw: str | None) -> list[Licence]:
    if raw is None:
        return []
    return [lic for part in str(raw).split(",") if (lic := parse_licence(part)) is not None]


def card_only(subject: str, text: str | None) -> tuple[CardInfo, str, list[Finding]]:
    """Parse a card and report what is wrong with it on its own: missing, broken YAML, wrong types, licence ids."""
    info = parse_card(text)
    body = ""
    if text is not None:
        _front, body, _ = split_card(text)
    findings: list[Finding] = []
    if text is None:
        findings.append(Finding(code="card-missing", severity="low", category="card", subject=subject,
                                title="No model card",
                                detail="no README.md: the model discloses no base model, relation or licence"))
    for code, message in zip(info.get("problem_codes", []), info["problems"], strict=False):
        findings.append(Finding(code=code, severity=SEVERITY_BY_CODE.get(code, "low"), category="card",
                                subject=subject, title=_CARD_TITLES.get(code, "Card problem"), detail=message))
    if info["front_matter"]:
        findings.extend(_licence_id_findings(subject, info))
    return CardInfo.model_validate(info), body, findings


def _licence_id_findings(subject: str, info: dict[str, Any]) -> list[Finding]:
    out = []
    if info["license"] is None:
        out.append(Finding(code="license-missing", severity="medium", category="license", subject=subject,
                           title="No licence declared", detail="the card's front matter has no `license` field"))
        return out
    for lic in _licences(info["license"]):
        if not lic.known:
            close = difflib.get_close_matches(lic.key, sorted(HUB_ONLY) + list(_COMMON_SPDX), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(Finding(code="license-unknown-id", severity="low", category="license", subject=subject,
                               title="Unknown licence identifier",
                               detail=f"license {lic.raw!r} is neither an SPDX id nor a Hub licence id{hint}"))
        elif lic.vague and not info.get("license_name"):
            out.append(Finding(code="license-unspecified", severity="low", category="license", subject=subject,
                               title="Licence not machine-readable",
                               detail=f"license: {lic.raw} without license_name / license_link"))
    return out


def ancestors_from(verdict: Verdict) -> list[Ancestor]:
    """The models the verdict says the suspect derives from, with how (before their cards are read)."""
    rel = verdict.relation
    kind = {"merge": "merge-parent", "stack": "stack-source", "finetune": "finetune-parent", "copy": "copy-source",
            "recast": "copy-source", "partial": "merge-parent", "related": "relative",
            "upcycled": "finetune-parent"}.get(rel)
    out: list[Ancestor] = []
    if kind is None:
        return out
    for p in verdict.parents:
        pv = verdict.p_values.get(p.model)
        out.append(Ancestor(model=p.model, location=verdict.sources.get(p.model), relation=kind, weight=p.weight,
                            interval=p.interval, layers=p.layers, p_text=pv.text if pv else None))
    if rel == "partial" and not out:
        for name, pv in verdict.p_values.items():
            if pv.p < ALPHA:
                out.append(Ancestor(model=name, location=verdict.sources.get(name), relation=kind, p_text=pv.text))
    if verdict.base and rel == "merge" and all(a.model != verdict.base for a in out):
        out.append(Ancestor(model=verdict.base, location=verdict.sources.get(verdict.base), relation="base"))
    return out


def _describe_relation(verdict: Verdict) -> str:
    terms = ", ".join(f"{p.model}" + (f" ({p.weight:.2f})" if p.weight is not None and verdict.relation == "merge"
                                      else "") for p in verdict.parents)
    what = {"merge": f"a {verdict.method or ''} merge of".replace("  ", " "), "stack": "a layer stack of",
            "finetune": "a fine-tune of", "copy": "a byte copy of", "recast": "a re-encoded copy of",
            "partial": "partly derived from", "related": "related (direction unknown) to",
            "upcycled": "a mixture of experts upcycled from"
            }.get(verdict.relation, verdict.relation)
    return f"{what} {terms}".strip()


def disclosure_findings(subject: str, card: CardInfo, body: str, verdict: Verdict,
                        ancestors: list[Ancestor]) -> list[Finding]:
    """Undisclosed derivation, wrong relation, declared base not in the weights, missing attribution, "original"."""
    out: list[Finding] = []
    rel = verdict.relation
    declared = card.base_model
    derived = rel in UNDISCLOSED_CODE
    parents = [a for a in ancestors if a.relation != "base"]
    if derived and parents:
        what = _describe_relation(verdict)
        named = {a.model: any(refers_to(d, a.model, a.location) for d in declared) for a in parents}
        in_text = {a.model: _mentioned(body, a) for a in parents}
        p_text = "; ".join(f"independent of {a.model}: {a.p_text}" for a in parents if a.p_text)
        if not any(named.values()):
            mentioned = [m for m, hit in in_text.items() if hit]
            severity = ("critical" if rel in ("copy", "recast") else "medium" if mentioned or rel == "related"
                        else "high")
            where = ("it has no model card" if not card.present else "the card's base_model "
                     + ("is missing" if not declared else f"names only {', '.join(declared)}"))
            detail = (f"the weights show {subject} is {what} ({p_text}), but {where}"
                      + (f"; the card text mentions {', '.join(mentioned)} but the Hub's model tree will not show it"
                         if mentioned else "") + ".")
            out.append(Finding(code=UNDISCLOSED_CODE[rel], severity=severity, category="disclosure", subject=subject,
                               title=f"Undisclosed {'derivation' if rel == 'partial' else _noun(rel)}"
                                     + (" (the weights do not say which model came first)" if rel == "related"
                                        else ""),
                               detail=detail, data={"relation": rel, "method": verdict.method,
                                                    "parents": [a.model for a in parents]}))
        else:
            for a in parents:
                if not named[a.model]:
                    share = f" (weight {a.weight:.2f})" if a.weight is not None and rel == "merge" else ""
                    out.append(Finding(code="missing-attribution", severity="medium", category="disclosure",
                                       subject=subject, title=f"{a.model} not credited",
                                       detail=f"{a.model} is a detected parent{share} but base_model does not name "
                                              "it" + (" (only the card text does)" if in_text[a.model] else ""),
                                       data={"parent": a.model}))
        expected = EXPECTED_RELATION.get(rel, ())
        have = card.base_model_relation
        if declared and have and expected and have not in expected:
            out.append(Finding(code="relation-mismatch", severity="medium", category="disclosure", subject=subject,
                               title="Declared relation contradicts the weights",
                               detail=f"the card says base_model_relation: {have}, the weights show {what}",
                               data={"declared": have, "found": rel}))
        elif declared and not have and rel in ("merge", "stack"):
            out.append(Finding(code="relation-undeclared", severity="low", category="disclosure", subject=subject,
                               title="Merge not declared as a merge",
                               detail="base_model is set but base_model_relation is not; the Hub will infer a "
                                      "relation from the files and may show this merge as a fine-tune"))
        claim = CLAIMS_ORIGINAL.search(body or "")
        if claim:
            out.append(Finding(code="claims-original", severity="high", category="disclosure", subject=subject,
                               title="Card claims an original model",
                               detail=f"the card says {claim.group(0)!r}, but the weights show {subject} is {what}"))
    out.extend(_declared_bases(subject, card, verdict, parents))
    return out


def _noun(rel: str) -> str:
    return {"stack": "merge (layer stack)", "recast": "copy (re-encoded)", "finetune": "fine-tune"}.get(rel, rel)


def _mentioned(body: str, a: Ancestor) -> bool:
    names = {a.model.lower(), a.model.split("/")[-1].lower()}
    text = (body or "").lower()
    return any(len(n) >= 3 and n in text for n in names)


def _declared_bases(subject: str, card: CardInfo, verdict: Verdict, parents: list[Ancestor]) -> list[Finding]:
    out = []
    for d in card.base_model:
        if any(refers_to(d, a.model, a.location) for a in parents):
            continue
        hit = next((c for c in verdict.candidates if refers_to(d, c, verdict.sources.get(c))), None)
        if hit is None:
            out.append(Finding(code="declared-base-unchecked", severity="info", category="provenance",
                               subject=subject, title=f"Declared base {d} not checked",
                               detail=f"the card names {d} as a base model, but it was not among the audited "
                                      f"candidates; add -c {d if '/' in d else '<path>'} to check it"))
            continue
        pv = verdict.p_values.get(hit)
        if pv is not None and pv.p >= ALPHA:
            out.append(Finding(code="declared-base-not-found", severity="high", category="disclosure",
                               subject=subject, title=f"Declared base {d} not found in the weights",
                               detail=f"the card names {d} as its base model, but the weights show no relation to "
                                      f"it ({pv.text} under independence)", data={"declared": d, "candidate": hit}))
    return out


def licence_findings(subject: str, card: CardInfo, body: str, ancestors: list[Ancestor]) -> list[Finding]:
    """Licence changed or dropped relative to the ancestors' cards."""
    out: list[Finding] = []
    mine = _licences(card.license)
    unknown = [a for a in ancestors if not _licences(a.license)]
    if unknown:
        why = "; ".join(f"{a.model}: " + ("no readable card" if not a.card_present else "no license in its card")
                        for a in unknown)
        out.append(Finding(code="ancestor-license-unknown", severity="info", category="license", subject=subject,
                           title=f"Licence of {', '.join(a.model for a in unknown)} unknown",
                           detail=f"{why}; their terms could not be compared",
                           data={"ancestors": [a.model for a in unknown]}))
    for a in ancestors:
        theirs = _licences(a.license)
        if not theirs:
            continue
        if not mine:
            out.append(Finding(code="license-dropped", severity="high", category="license", subject=subject,
                               title="Licence of an ancestor dropped",
                               detail=f"{subject} declares no licence, but it derives from {a.model} "
                                      f"({', '.join(x.raw for x in theirs)}), whose terms still apply",
                               data={"ancestor": a.model, "ancestor_license": a.license}))
            continue
        if any(same_terms(m, t) for m in mine for t in theirs):
            continue
        parent = theirs[0]
        severity = max((change_severity(m, parent) for m in mine), key=["info", "low", "medium", "high",
                                                                          "critical"].index)
        notice = _mentions_licence(body, parent)
        if severity == "high" and notice:
            severity = "medium"
        out.append(Finding(code="license-changed", severity=severity, category="license", subject=subject,
                           title="Licence changed from an ancestor's",
                           detail=f"{subject} is released as {', '.join(m.raw for m in mine)}, but it derives from "
                                  f"{a.model}, released as {parent.raw}"
                                  + (" (restrictive terms: they bind derivatives)" if parent.restrictive else "")
                                  + (" (copyleft: derivatives must keep it)" if parent.copyleft else "")
                                  + ("; the card mentions the ancestor's licence" if notice else
                                     "; the card does not mention the ancestor's licence or notices"),
                           data={"license": card.license, "ancestor": a.model, "ancestor_license": a.license}))
    return out


def _mentions_licence(body: str, lic: Licence) -> bool:
    text = (body or "").lower()
    words = {lic.key, lic.key.split("-")[0]} - {"", "other", "unknown"}
    return any(len(w) >= 3 and w in text for w in words) or "notice" in text
