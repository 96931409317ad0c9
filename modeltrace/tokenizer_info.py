"""Tokenizer summary from the files next to the weights (tokenizer.json, tokenizer_config.json, ...)."""

from __future__ import annotations

from typing import Any

from modeltrace.errors import InputError
from modeltrace.sources.base import Source


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


def tokenizer_summary(source: Source) -> dict[str, Any] | None:
    """type, vocab_size, special_tokens, chat_template; None when the checkpoint carries no tokenizer."""
    native = source.native_tokenizer()
    if native is not None:
        return native
    names = {f.name for f in source.files()}
    have_json = "tokenizer.json" in names
    have_cfg = "tokenizer_config.json" in names
    have_spm = "tokenizer.model" in names
    have_vocab = "vocab.txt" in names or "vocab.json" in names
    if not (have_json or have_cfg or have_spm or have_vocab):
        return None
    out: dict[str, Any] = {"type": None, "vocab_size": None, "special_tokens": {}, "chat_template": False,
                           "files": sorted(n for n in names if n.startswith(("tokenizer", "vocab", "merges",
                                                                              "special_tokens", "chat_template")))}
    try:
        cfg = source.json_file("tokenizer_config.json") if have_cfg else None
        tj = source.json_file("tokenizer.json") if have_json else None
    except InputError as exc:
        out["problems"] = [str(exc)]
        return out
    if tj:
        model = tj.get("model") or {}
        out["type"] = model.get("type")
        vocab = model.get("vocab")
        ids = set()
        if isinstance(vocab, dict):
            ids = {v for v in vocab.values() if isinstance(v, int)}
        elif isinstance(vocab, list):
            ids = set(range(len(vocab)))
        added = tj.get("added_tokens") or []
        ids |= {t.get("id") for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)}
        out["vocab_size"] = len(ids) or None
        out["special_tokens"] = {t["content"]: t["id"] for t in added
                                 if isinstance(t, dict) and t.get("special") and "content" in t}
    elif have_spm:
        out["type"] = "sentencepiece"
    if cfg:
        out["class"] = cfg.get("tokenizer_class")
        out["chat_template"] = bool(cfg.get("chat_template"))
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            text = _token_text(cfg.get(key))
            if text is not None:
                out["special_tokens"].setdefault(text, None)
    if "chat_template.jinja" in names or "chat_template.json" in names:
        out["chat_template"] = True
    return out
