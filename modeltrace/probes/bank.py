"""The probe's data: identity questions, general prompts and known names live in data/*.toml, not in code, so that
adding a language or a phrasing is an edit to a data file that reviewers can read."""

from __future__ import annotations

import functools
import random
import re
import tomllib
from dataclasses import dataclass
from importlib import resources

from modeltrace.errors import InputError

LANGUAGES = ("en", "pt", "es", "zh")


@dataclass(frozen=True)
class Question:
    id: str
    lang: str
    asks: str
    text: str


@dataclass(frozen=True)
class Prompt:
    id: str
    lang: str
    text: str
    origin: str = "bank"  # bank | random (a random word string) ; how it was chosen is recorded by the caller


def _load(name: str) -> dict:
    with resources.files("modeltrace.probes").joinpath("data").joinpath(name).open("rb") as fh:
        return tomllib.load(fh)


@functools.cache
def identity_questions() -> tuple[Question, ...]:
    return tuple(Question(**q) for q in _load("identity_questions.toml")["question"])


@functools.cache
def general_prompts() -> tuple[Prompt, ...]:
    return tuple(Prompt(**p) for p in _load("prompts.toml")["prompt"])


@functools.cache
def known_names() -> dict:
    return _load("names.toml")


def select_questions(languages: list[str] | None = None, limit: int | None = None) -> list[Question]:
    """The bank, optionally restricted to some languages and to the first `limit` questions per language (the bank
    is ordered so that the first questions of each language are the most direct ones)."""
    qs = list(identity_questions())
    if languages:
        unknown = sorted(set(languages) - {q.lang for q in qs})
        if unknown:
            raise InputError(f"no identity questions in language(s) {', '.join(unknown)}; the bank has "
                             f"{', '.join(LANGUAGES)}")
        qs = [q for q in qs if q.lang in languages]
    if limit is not None:
        if limit < 1:
            raise InputError("--questions must be at least 1")
        per: dict[str, int] = {}
        kept = []
        for q in qs:
            per[q.lang] = per.get(q.lang, 0) + 1
            if per[q.lang] <= limit:
                kept.append(q)
        qs = kept
    return qs


def random_word_prompts(n: int, seed: int) -> list[Prompt]:
    """Strings of 3-8 words drawn from the prompt bank's own vocabulary (per language). Such prompts ask nothing in
    particular, so what a model does with them is idiosyncratic: its weights, not the question, decide the answer."""
    rng = random.Random(seed)
    vocab: dict[str, list[str]] = {}
    for p in general_prompts():
        words = list(p.text) if p.lang == "zh" else re.findall(r"\w+", p.text)
        words = [w for w in words if re.match(r"\w", w)]
        vocab.setdefault(p.lang, []).extend(words)
    langs = sorted(vocab)
    out = []
    for i in range(n):
        lang = langs[i % len(langs)]
        k = rng.randint(3, 8)
        words = rng.sample(vocab[lang], k)
        out.append(Prompt(id=f"rand-{seed}-{i:03d}", lang=lang, text=("" if lang == "zh" else " ").join(words),
                          origin="random"))
    return out
