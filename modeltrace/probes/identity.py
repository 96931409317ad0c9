"""`probe identity`: ask the identity questions, extract the names each answer declares, report shares.

A share is (answers that mention the name) / (answers the model gave), with a Wilson 95% interval. Answers the
model gave include refusals, empty answers and answers in another language or script (they are its behaviour);
requests that got no answer (time-outs, HTTP errors, malformed responses, budget) are not answers and are counted
apart. Identity is weak evidence on its own — models imitate each other's self-descriptions — so the summary says
what it can and cannot show.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from modeltrace.probes.backends import Backend, ChatRequest, Progress
from modeltrace.probes.bank import Question
from modeltrace.probes.extract import NameTable, analyse
from modeltrace.stats import format_share, share

WEAK = ("Self-identification is weak evidence alone (models imitate each other's answers); weights settle it: "
        "modeltrace audit.")


def system_messages(system_prompt: str | None, no_system_prompt: bool) -> tuple[list[dict[str, str]], str]:
    """The system turn to send and how to describe it. --no-system-prompt sends an empty system turn, which also
    replaces a default that a chat template would insert; with neither option nothing is sent."""
    if no_system_prompt:
        return [{"role": "system", "content": ""}], "removed (empty system turn)"
    if system_prompt is not None:
        return [{"role": "system", "content": system_prompt}], "given"
    return [], "none sent; the chat template's default, if any, applies"


def run_identity(backend: Backend, questions: list[Question], samples: int = 1, system_prompt: str | None = None,
                 no_system_prompt: bool = False, expected: list[str] | None = None, max_tokens: int = 200,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = 0,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Ask every question `samples` times and return the report: settings, counts, names with shares and
    intervals, expected names, every raw answer with what was extracted from it, warnings and a summary."""
    system, system_desc = system_messages(system_prompt, no_system_prompt)
    plan = [(q, s) for q in questions for s in range(samples)]
    # Each request its own seed: reproducible, and independent draws (one seed for all would make every question
    # draw the same random numbers, so the answers would be correlated and the intervals too narrow).
    requests = [ChatRequest(system + [{"role": "user", "content": q.text}], max_tokens=max_tokens,
                            temperature=temperature, top_p=top_p,
                            seed=None if seed is None else seed * 1_000_003 + k)
                for k, (q, _) in enumerate(plan)]
    results = backend.chat(requests, progress)

    table = NameTable(expected)
    answers: list[dict[str, Any]] = []
    texts: list[str] = []  # answered texts, aligned with the share denominator
    errors: Counter = Counter()
    status: Counter = Counter()
    other_lang = other_script = 0
    langs: Counter = Counter()
    for (q, s), res in zip(plan, results, strict=True):
        entry: dict[str, Any] = {"question_id": q.id, "lang": q.lang, "question": q.text, "sample": s,
                                 "answer": res.text, "finish_reason": res.finish_reason}
        if res.error is not None:
            errors[res.error] += 1
            entry.update({"status": "error", "error": res.error, "detail": res.detail})
            answers.append(entry)
            continue
        facts = analyse(res.text, q.lang)
        entry.update(facts.as_dict())
        status[facts.status] += 1
        other_lang += facts.other_language
        other_script += facts.other_script
        langs[q.lang] += 1
        table.add(facts)
        entry["index"] = len(texts)
        texts.append(res.text or "")
        answers.append(entry)

    n = len(texts)
    rows = table.rows(texts, min_declared=2 if n >= 20 else 1)
    for r in rows:
        r.update(share(r["mentions"], n))
        r["text"] = format_share(r)
        hits = set(r.pop("answers"))
        by_lang: Counter = Counter(a["lang"] for a in answers if a.get("index") in hits)
        r["by_language"] = {lang: {"mentions": by_lang.get(lang, 0), "answers": langs[lang]} for lang in langs}
    for a in answers:
        a.pop("index", None)
    named = sum(1 for a in answers if a.get("names"))
    counts = {
        "asked": len(plan), "answers": n, "errors": sum(errors.values()), "error_kinds": dict(errors),
        "empty": status["empty"], "refusals": status["refusal"], "naming_no_one": n - named - status["empty"]
        - status["refusal"], "other_language": other_lang, "other_script": other_script,
    }
    report = {
        "probe": "identity",
        "model": backend.describe(),
        "settings": {"questions": len(questions), "samples_per_question": samples,
                     "languages": sorted({q.lang for q in questions}), "system_prompt": system_desc,
                     "system_prompt_text": system_prompt, "max_tokens": max_tokens,
                     "temperature": temperature if temperature is not None else "model's own",
                     "top_p": top_p if top_p is not None else "model's own", "seed": seed},
        "counts": counts,
        "names": rows,
        "expected": [r for r in rows if r["expected"]],
        "answers": answers,
    }
    report["warnings"] = _warnings(report)
    report["summary"] = _summary(report)
    return report


def _warnings(rep: dict) -> list[str]:
    c = rep["counts"]
    w = []
    if c["errors"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(c["error_kinds"].items()))
        w.append(f"{c['errors']} of {c['asked']} requests got no answer ({kinds}); shares are over the "
                 f"{c['answers']} answers received")
    if c["empty"]:
        w.append(f"{c['empty']} answers were empty")
    if c["refusals"]:
        w.append(f"{c['refusals']} answers refused to say")
    if c["other_language"]:
        w.append(f"{c['other_language']} answers came in another language than the question's")
    if c["other_script"]:
        w.append(f"{c['other_script']} answers were mostly in another script than the question's")
    if c["answers"] == 0:
        w.append("no answers at all: nothing can be said about this model's identity")
    own = rep["model"].get("own_sampling")
    if own and not own.get("do_sample") and rep["settings"]["temperature"] == "model's own":
        w.append("the model's own settings decode greedily, so each question has one answer; give --temperature "
                 "to sample")
    return w


def _summary(rep: dict) -> str:
    c = rep["counts"]
    if c["answers"] == 0:
        return "No answers: no identity evidence."
    top = [r for r in rep["names"] if r["mentions"]][:3]
    parts = [f"{r['name']} {r['text']}" for r in top]
    s = (f"Over {c['answers']} answers to {rep['settings']['questions']} identity questions, the model names "
         + ("; ".join(parts) if parts else "no model or company") + ".")
    for r in rep["expected"]:
        s += f" Expected {r['name']}: {r['text']}."
    return s + " " + WEAK
