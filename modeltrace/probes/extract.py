"""What an answer says about its author: declared model names and organisations, refusals, empty answers, and the
language and script it is written in.

Names come from two sources, because neither is enough alone: self-description patterns in each bank language
("I am X", "made by Y", "Sou o X", "creado por Y", "我是X", "由Y开发") find names nobody listed (a fine-tune's
new persona), and the list of known names (data/names.toml) finds names said without a pattern and groups aliases
(ChatGPT / GPT-4o). A share counts answers that *mention* a name anywhere (word-bounded, case-insensitive), so
"Nex" also counts answers that say "Nex-AGI", as in the Rio case where "Nex" (79%) exceeded "Nex-AGI" (73%).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from modeltrace.probes.bank import known_names

# ----------------------------------------------------------------------------------------------- patterns

_LATIN_NAME = r"[A-Z0-9\u00C0-\u00DE][\w\-.+'’]*(?: (?:[A-Z0-9][\w\-.+]*))*"
_CJK = r"[\u3400-\u4dbf\u4e00-\u9fff]"
# Word characters for name boundaries: Latin letters and digits only, so "我是Nex" mentions Nex (Han characters
# are \w to the regex engine, but a Latin name inside Chinese text is still a whole word).
_WORD = r"0-9A-Za-z_\u00C0-\u024F"
# A name after a cue: a capitalised Latin name (possibly several words), or a run of Han characters.
_NAME = rf"({_LATIN_NAME}|{_CJK}{{2,12}})"

_NAME_CUES = [
    r"(?i:\bI am|\bI'm|\bI’m|\bmy name is|\bcall me|\bI am called|\bI'm called|\bknown as|\bnamed)\s+"
    r"(?:(?i:an?|the)\s+)?",
    r"(?i:\beu sou|\bsou|\bme chamo|\bchamo-me|\bmeu nome é|\bpode me chamar de)\s+(?:(?i:o|a|um|uma)\s+)?",
    r"(?i:\byo soy|\bsoy|\bme llamo|\bmi nombre es|\bpuedes llamarme)\s+(?:(?i:el|la|un|una)\s+)?",
    r"(?:我是|我叫|我的名字是|我的名字叫|名叫|叫做|名为)\s*",
]
_ORG_CUES = [
    r"(?i:\b(?:made|created|developed|trained|built|designed|produced|released|owned|maintained|fine-tuned|"
    r"powered)\s+by)\s+(?:(?i:the)\s+)?",
    r"(?i:\b(?:team|researchers|engineers|scientists|company) (?:at|from))\s+",
    r"(?i:\b(?:criad[oa]|desenvolvid[oa]|treinad[oa]|constru[ií]d[oa]|feit[oa]|projetad[oa]|lançad[oa]|"
    r"mantid[oa])\s+(?:pel[oa]s?|por))\s+(?:(?i:a|o|equipe d[ao])\s+)?",
    r"(?i:\b(?:cread[oa]|desarrollad[oa]|entrenad[oa]|construid[oa]|hech[oa]|diseñad[oa]|lanzad[oa])\s+por)\s+"
    r"(?:(?i:el|la|equipo de)\s+)?",
]
_ZH_ORG = [
    re.compile(rf"由\s*({_LATIN_NAME}|{_CJK}{{2,12}}?)\s*(?:公司|团队)?\s*(?:开发|训练|创建|创造|打造|研发|推出|构建|设计)"),
    re.compile(rf"({_LATIN_NAME}|{_CJK}{{2,12}}?)\s*(?:公司|团队)?\s*(?:开发|训练|研发|打造|推出)的"),
]
_NAME_RES = [re.compile(cue + _NAME) for cue in _NAME_CUES]
_ORG_RES = [re.compile(cue + _NAME) for cue in _ORG_CUES] + _ZH_ORG

# Words a cue is often followed by that are not names ("I am an AI assistant", "我是一个人工智能助手").
_NOT_NAMES = {w.casefold() for w in """
a an the ai ia i it is not just here sorry happy glad yes no sim sí your tu seu sua su artificial large language
assistant assistente asistente chatbot bot model modelo virtual um uma un una el la o lo llm able unable
""".split()} | {"一个", "一款", "一种", "人工智能", "助手", "语言模型", "大语言模型", "您的", "你的", "人工智能助手",
                "智能助手", "ai助手", "一名"}

_REFUSAL = re.compile(
    r"(?i:\bI can(?:no|'|’)t\b|\bI am (?:not able|unable)\b|\bI'm (?:not able|unable)\b|\bI won(?:'|’)t\b|"
    r"\bI will not\b|\bI(?:'m| am) sorry\b|\bsorry,? (?:but )?I\b|\bnot (?:allowed|permitted) to\b|\bdecline to\b|"
    r"\bnão posso\b|\bnão consigo\b|\bnão estou autorizad|\bdesculpe\b|\blamento\b|\bsinto muito\b|"
    r"\bno puedo\b|\blo siento\b|\bno estoy autorizad|\blamentablemente\b)|抱歉|对不起|无法|不能|不便|拒绝")

_STOPWORDS = {
    "en": set("the and is are am i i'm you my by of to with was made created developed trained assistant name "
              "which that this it not can an in your from".split()),
    "pt": set("sou eu o os é um uma não você meu minha pela pelo com para do da dos das em que criado criada "
              "desenvolvido treinado assistente nome sobre ao também seu sua".split()),
    "es": set("soy yo el los las es un una no eres mi por con para del al en que creado creada desarrollado "
              "entrenado asistente nombre sobre también y tu su".split()),
}
_LANG_SCRIPTS = {"en": {"Latin"}, "pt": {"Latin"}, "es": {"Latin"}, "zh": {"Han", "Latin"}}
_SCRIPT_LANG = {"Han": "zh", "Kana": "ja", "Hangul": "ko", "Cyrillic": "ru", "Arabic": "ar", "Greek": "el",
                "Hebrew": "he", "Devanagari": "hi", "Thai": "th"}


def script_of(ch: str) -> str:
    """The script of a letter, from its Unicode name ("LATIN SMALL LETTER A" -> Latin, "CJK ..." -> Han)."""
    try:
        word = unicodedata.name(ch).split()[0]
    except ValueError:
        return "Other"
    return {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana", "HANGUL": "Hangul"}.get(word, word.title())


def scripts(text: str) -> Counter:
    return Counter(script_of(ch) for ch in text if ch.isalpha())


def _weighted(sc: Counter) -> Counter:
    """Letter counts with a Han, Kana or Hangul character weighing as much as three Latin letters (about a word),
    so that "我是Nex，由Nex-AGI开发。" counts as Han."""
    return Counter({k: v * (3 if k in ("Han", "Kana", "Hangul") else 1) for k, v in sc.items()})


def main_script(sc: Counter) -> str | None:
    weighted = _weighted(sc)
    return max(weighted, key=weighted.get) if weighted else None


def detect_language(text: str) -> str | None:
    """en / pt / es by function words, zh / ja / ko / ru / ... by script; None when too short to tell."""
    sc = scripts(text)
    letters = sum(sc.values())
    if not letters:
        return None
    if sc.get("Kana", 0) > 0.1 * letters:
        return "ja"
    script = main_script(sc)
    if script != "Latin":
        return _SCRIPT_LANG.get(script, script.lower())
    words = re.findall(r"[\w'’]+", text.casefold())
    hits = {lang: sum(w in sw for w in words) for lang, sw in _STOPWORDS.items()}
    ranked = sorted(hits.items(), key=lambda kv: -kv[1])
    if ranked[0][1] >= 2 and ranked[0][1] > ranked[1][1]:
        return ranked[0][0]
    return None


# ----------------------------------------------------------------------------------------------- names


def _clean(name: str) -> str:
    name = name.strip().rstrip(".,;:!?'’)")
    name = re.sub(r"^(?:我是|我叫|由|是|被|为|我)", "", name)  # a Han run may start on the cue's own particle
    for sep in ("的",):  # "阿里云开发的通义千问": the name is what follows the last particle
        if sep in name:
            name = name.split(sep)[-1]
    return name


def _is_name(name: str) -> bool:
    if len(name) < 2 and not re.match(_CJK, name):
        return False
    first = name.split()[0].casefold() if " " in name else name.casefold()
    return first not in _NOT_NAMES and name.casefold() not in _NOT_NAMES


@dataclass
class Entity:
    """A model or organisation: every surface form seen, and the regex that finds a mention of any of them."""

    name: str
    kind: str  # model | organisation
    forms: set[str] = field(default_factory=set)
    known: bool = False
    org: str | None = None

    def pattern(self) -> re.Pattern:
        alts = sorted({f for f in self.forms | {self.name}}, key=len, reverse=True)
        parts = []
        for f in alts:
            esc = re.escape(f)
            parts.append(esc if re.search(_CJK, f) else rf"(?<![{_WORD}\-]){esc}(?![{_WORD}])")
        return re.compile("|".join(parts), re.IGNORECASE)


@functools.cache
def _gazetteer() -> dict[str, Entity]:
    """casefolded surface form -> known entity."""
    data = known_names()
    out: dict[str, Entity] = {}
    for m in data.get("model", []):
        e = Entity(m["name"], "model", set(m.get("aliases", [])) | {m["name"]}, known=True, org=m.get("org"))
        for f in e.forms:
            out[f.casefold()] = e
    for o in data.get("org", []):
        key = o["name"].casefold()
        if key in out:  # a company named like its model (DeepSeek, MiniMax): one entity
            out[key].forms |= set(o.get("aliases", []))
            continue
        e = Entity(o["name"], "organisation", set(o.get("aliases", [])) | {o["name"]}, known=True)
        for f in e.forms:
            out[f.casefold()] = e
    return out


@functools.cache
def _gazetteer_regex() -> re.Pattern:
    forms = sorted(_gazetteer(), key=len, reverse=True)
    parts = [re.escape(f) if re.search(_CJK, f) else rf"(?<![{_WORD}\-]){re.escape(f)}(?![{_WORD}])" for f in forms]
    return re.compile("|".join(parts), re.IGNORECASE)


@dataclass
class Facts:
    """What one answer says: status (answered | empty | refusal), declared names, language and script."""

    status: str
    names: list[tuple[str, str]]  # (surface form, model | organisation), declared or known
    language: str | None
    script: str | None
    other_language: bool
    other_script: bool

    def as_dict(self) -> dict:
        return {"status": self.status, "names": [n for n, _ in self.names], "language": self.language,
                "script": self.script, "other_language": self.other_language, "other_script": self.other_script}


def declared_names(text: str) -> list[tuple[str, str]]:
    """Names the answer gives itself or its maker, by the self-description patterns, in order of appearance."""
    found: list[tuple[int, str, str]] = []
    for kind, regexes in (("model", _NAME_RES), ("organisation", _ORG_RES)):
        for rx in regexes:
            for m in rx.finditer(text):
                name = _clean(m.group(1))
                if _is_name(name):
                    found.append((m.start(1), name, kind))
    found.sort()
    out, seen = [], set()
    for _, name, kind in found:
        if name.casefold() not in seen:
            seen.add(name.casefold())
            out.append((name, kind))
    return out


def known_mentions(text: str) -> list[tuple[str, str]]:
    """Known names mentioned anywhere (canonical name, kind)."""
    gaz = _gazetteer()
    out, seen = [], set()
    for m in _gazetteer_regex().finditer(text):
        e = gaz[m.group(0).casefold()]
        if e.name not in seen:
            seen.add(e.name)
            out.append((e.name, e.kind))
    return out


def analyse(text: str | None, question_lang: str) -> Facts:
    """Everything the probe records about one answer to a question asked in `question_lang`. A refusal that still
    names a model counts as an answer (the name is the evidence)."""
    text = (text or "").strip()
    if not text:
        return Facts("empty", [], None, None, False, False)
    gaz = _gazetteer()
    names, seen = [], set()
    for name, kind in declared_names(text) + known_mentions(text):
        key = gaz[name.casefold()].name if name.casefold() in gaz else name.casefold()
        if key not in seen:
            seen.add(key)
            names.append((name, kind))
    sc = _weighted(scripts(text))
    letters = sum(sc.values())
    script = main_script(sc)
    expected = _LANG_SCRIPTS.get(question_lang, {"Latin"})
    other_script = bool(letters) and sum(sc.get(s, 0) for s in expected) < 0.5 * letters
    lang = detect_language(text)
    other_language = lang is not None and lang != question_lang
    refused = not names and _REFUSAL.search(text) is not None
    return Facts("refusal" if refused else "answered", names, lang, script, other_language, other_script)


class NameTable:
    """Entities across many answers: declared names are grouped with known aliases (casefolded), shares are counted
    afterwards by searching every answer for every form of each entity."""

    def __init__(self, expected: list[str] | None = None) -> None:
        self.entities: dict[str, Entity] = {}
        self.declared: Counter = Counter()
        self.surface: dict[str, Counter] = {}
        self.expected: list[str] = []
        for name in expected or []:
            e = self._entity(name, "model")
            e.forms.add(name)
            self.expected.append(e.name)

    def _entity(self, name: str, kind: str) -> Entity:
        gaz = _gazetteer()
        known = gaz.get(name.casefold())
        key = (known.name if known else name).casefold()
        if key not in self.entities:
            self.entities[key] = (Entity(known.name, known.kind, set(known.forms), True, known.org) if known
                                  else Entity(name, kind, {name}))
        return self.entities[key]

    def add(self, facts: Facts) -> None:
        for name, kind in facts.names:
            e = self._entity(name, kind)
            e.forms.add(name)
            self.declared[e.name.casefold()] += 1
            self.surface.setdefault(e.name.casefold(), Counter())[name] += 1

    def rows(self, answers: list[str], min_declared: int = 2) -> list[dict]:
        """One row per entity worth listing (expected, known, or declared at least `min_declared` times), with
        the answers that mention it; sorted by mentions."""
        rows = []
        expected = {x.casefold() for x in self.expected}
        for key, e in self.entities.items():
            if key not in expected and not e.known and self.declared[key] < min_declared:
                continue
            rx = e.pattern()
            hits = [i for i, a in enumerate(answers) if a and rx.search(a)]
            if not hits and key not in expected:
                continue
            shown = e.name if e.known or key not in self.surface else self.surface[key].most_common(1)[0][0]
            rows.append({"name": shown, "kind": e.kind, "known": e.known, "org": e.org,
                         "expected": key in expected, "declared": self.declared[key], "mentions": len(hits),
                         "answers": hits})
        rows.sort(key=lambda r: (-r["mentions"], r["name"].casefold()))
        return rows
