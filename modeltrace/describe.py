"""`modeltrace inspect`: what a checkpoint is, from headers and small metadata files only (no tensor data)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from modeltrace.architectures import Slot, canonical_parts, detect_family, is_expert_role
from modeltrace.card import parse_card
from modeltrace.schema import SCHEMA_VERSION
from modeltrace.sources.base import Source
from modeltrace.tokenizer_info import tokenizer_summary


def _first(cfg: dict, *keys: str) -> Any:
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v
    return None


def text_config(cfg: dict | None) -> dict:
    """Multimodal configs nest the language model under text_config; use it when present."""
    cfg = cfg or {}
    inner = cfg.get("text_config")
    if isinstance(inner, dict):
        merged = dict(inner)
        merged.setdefault("architectures", cfg.get("architectures"))
        return merged
    return cfg


def describe(source: Source, hashes: bool = False) -> dict[str, Any]:
    tensors = source.tensors()
    raw_cfg = source.config()
    cfg = text_config(raw_cfg)
    model_type = cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None
    family = detect_family(list(tensors), model_type)
    parts, unknown = canonical_parts(tensors, family, cfg)

    # One pass over the canonical parts and one over the stored tensors (a 400B MoE has 93k of each).
    buffers: set[str] = set()
    layer_ids: set[int] = set()
    expert_ids: set[int] = set()
    routed_params = 0
    has_shared = False
    for s, p in parts.items():
        if s.role == "buffer":
            buffers.add(p.name)
        if s.layer >= 0:
            layer_ids.add(s.layer)
        if s.expert >= 0:
            expert_ids.add(s.expert)
        if is_expert_role(s.role):
            routed_params += p.numel
        has_shared = has_shared or s.role.startswith("shared_")
    # Parameters: each stored tensor once (tied weights are stored once); buffers excluded.
    total = total_bytes = 0
    weight_files: set[str] = set()
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for n, t in tensors.items():
        numel = t.numel
        if n not in buffers:
            total += numel
        d = dtypes[t.dtype]
        d["tensors"] += 1
        d["parameters"] += numel
        d["bytes"] += t.nbytes
        total_bytes += t.nbytes
        weight_files.add(t.file)
    routed = _first(cfg, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    if routed is None and expert_ids:
        routed = max(expert_ids) + 1
    active_k = _first(cfg, "num_experts_per_tok", "moe_top_k", "num_selected_experts")
    shared_n = _first(cfg, "n_shared_experts", "num_shared_experts")
    if shared_n is None and has_shared:
        shared_n = 1
    active = total
    if routed and active_k and routed_params:
        active = total - routed_params + routed_params * int(active_k) // int(routed)

    embed = parts.get(Slot("embed"))
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model") or (embed.cols if embed else None)
    vocab = _first(cfg, "vocab_size") or (embed.rows if embed else None)

    sizes = {f.name: f.size for f in source.files()}
    files = [{"name": f, "size": sizes.get(f)} for f in sorted(weight_files)]
    if hashes:
        for entry in files:
            entry["sha256"] = source.file_sha256(entry["name"])

    card = parse_card(source.card_text())
    return {
        "schema_version": SCHEMA_VERSION,
        "location": source.location,
        "format": source.format,
        "architecture": {
            "family": family.name,
            "model_type": model_type,
            "architectures": cfg.get("architectures") or [],
        },
        "parameters": total,
        "active_parameters": active,
        "layers": _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
        or (max(layer_ids) + 1 if layer_ids else 0),
        "hidden_size": hidden,
        "intermediate_size": _first(cfg, "intermediate_size", "n_inner"),
        "attention_heads": _first(cfg, "num_attention_heads", "n_head"),
        "kv_heads": _first(cfg, "num_key_value_heads", "num_attention_heads", "n_head"),
        "experts": None if not routed else {"routed": int(routed), "active": active_k, "shared": shared_n or 0},
        "vocab_size": vocab,
        "dtypes": dict(sorted(dtypes.items())),
        "tensors": len(tensors),
        "unrecognized_count": len(unknown),
        "unrecognized_tensors": sorted(unknown),
        "files": files,
        "total_bytes": total_bytes,
        "tokenizer": tokenizer_summary(source),
        "card": card,
        "config_present": raw_cfg is not None,
        "bytes_read": source.stats.bytes_read,
    }
