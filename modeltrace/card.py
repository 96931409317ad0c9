"""Model-card front matter: the metadata through which a model is supposed to disclose its ancestry."""

from __future__ import annotations

from typing import Any

import yaml

#: values the Hub understands for `base_model_relation` (it builds the model tree from them)
RELATIONS = ("adapter", "merge", "quantized", "finetune")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def split_card(text: str) -> tuple[str | None, str, str | None]:
    """(front matter YAML, body, problem). The problem is one sentence when the front matter is absent or unclosed."""
    text = text.lstrip("\ufeff")
    if not text.startswith("---"):
        return None, text, "model card has no YAML front matter"
    end = text.find("\n---", 3)
    if end < 0:
        return None, text, "model card front matter is not closed with '---'"
    body_start = text.find("\n", end + 4)
    return text[3:end], text[body_start + 1:] if body_start >= 0 else "", None


def _type_problems(meta: dict) -> list[tuple[str, str]]:
    """(code, message) for list-vs-string mistakes the Hub silently ignores, so a disclosure that looks present is
    not."""
    out = []
    base = meta.get("base_model")
    if base is not None and not isinstance(base, str | list):
        out.append(("card-field-type",
                    f"base_model should be a repository id or a list of them, got a {type(base).__name__}"))
    elif isinstance(base, list) and not all(isinstance(b, str) for b in base):
        out.append(("card-field-type", "base_model list holds entries that are not repository ids (strings)"))
    rel = meta.get("base_model_relation")
    if isinstance(rel, list):
        out.append(("card-field-type",
                    "base_model_relation should be one string (adapter, merge, quantized or finetune), got a list"))
    elif rel is not None and str(rel) not in RELATIONS:
        out.append(("card-field-value",
                    f"base_model_relation {rel!r} is not one of adapter, merge, quantized, finetune"))
    if rel is not None and not base:
        out.append(("card-field-value",
                    "base_model_relation is set but base_model is missing, so the relation names no model"))
    lic = meta.get("license")
    if isinstance(lic, list):
        out.append(("card-field-type", "license should be one identifier (or an SPDX expression), got a list"))
    elif lic is not None and not isinstance(lic, str):
        out.append(("card-field-type", f"license should be a string identifier, got a {type(lic).__name__}"))
    tags = meta.get("tags")
    if isinstance(tags, str):
        out.append(("card-field-type", "tags should be a list, got a single string"))
    return out


def parse_card(text: str | None) -> dict[str, Any]:
    """Parse YAML front matter; problems become a `problems` list rather than exceptions."""
    out: dict[str, Any] = {"present": text is not None, "base_model": [], "base_model_relation": None,
                           "license": None, "license_name": None, "tags": [], "datasets": [], "pipeline_tag": None,
                           "front_matter": False, "problems": [], "problem_codes": []}

    def problem(code: str, message: str) -> None:
        out["problems"].append(message)
        out["problem_codes"].append(code)

    if text is None:
        return out
    front, _body, missing = split_card(text)
    if front is None:
        problem("card-no-front-matter" if "no YAML" in str(missing) else "card-bad-yaml", str(missing))
        return out
    try:
        meta = yaml.safe_load(front) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 2})" if line is not None else ""
        problem("card-bad-yaml", f"model card front matter is not valid YAML{where}")
        return out
    if not isinstance(meta, dict):
        problem("card-bad-yaml", "model card front matter is not a mapping")
        return out
    out["front_matter"] = True
    for code, message in _type_problems(meta):
        problem(code, message)
    out["base_model"] = _as_list(meta.get("base_model")) if isinstance(meta.get("base_model"), str | list) else []
    rel = meta.get("base_model_relation")
    out["base_model_relation"] = None if rel is None else (", ".join(_as_list(rel)) if isinstance(rel, list)
                                                           else str(rel))
    lic = meta.get("license")
    out["license"] = None if lic is None else (", ".join(_as_list(lic)) if isinstance(lic, list) else str(lic))
    out["license_name"] = str(meta["license_name"]) if meta.get("license_name") is not None else None
    out["tags"] = _as_list(meta.get("tags"))
    out["datasets"] = _as_list(meta.get("datasets"))
    out["pipeline_tag"] = str(meta["pipeline_tag"]) if meta.get("pipeline_tag") is not None else None
    return out
