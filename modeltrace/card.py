"""Model-card front matter: the metadata through which a model is supposed to disclose its ancestry."""

from __future__ import annotations

from typing import Any

import yaml


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def parse_card(text: str | None) -> dict[str, Any]:
    """Parse YAML front matter; problems become a `problems` list rather than exceptions."""
    out: dict[str, Any] = {"present": text is not None, "base_model": [], "base_model_relation": None,
                           "license": None, "tags": [], "problems": []}
    if text is None:
        return out
    if not text.startswith("---"):
        out["problems"].append("model card has no YAML front matter")
        return out
    end = text.find("\n---", 3)
    if end < 0:
        out["problems"].append("model card front matter is not closed with '---'")
        return out
    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 2})" if line is not None else ""
        out["problems"].append(f"model card front matter is not valid YAML{where}")
        return out
    if not isinstance(meta, dict):
        out["problems"].append("model card front matter is not a mapping")
        return out
    out["base_model"] = _as_list(meta.get("base_model"))
    rel = meta.get("base_model_relation")
    out["base_model_relation"] = None if rel is None else str(rel)
    lic = meta.get("license")
    out["license"] = None if lic is None else (", ".join(_as_list(lic)) if isinstance(lic, list) else str(lic))
    out["tags"] = _as_list(meta.get("tags"))
    return out
