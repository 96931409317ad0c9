"""Canonical identity of tensors across naming schemes: (role, layer, expert) for every stored tensor.

Families are data (`families/*.toml`, one per naming scheme): regex rules from a module path to a role. Fused
tensors (qkv, gate_up, stacked experts) are split here into canonical *parts*, each a row range of the stored
tensor, so that a per-expert checkpoint and a fused one compare expert by expert.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: sources/ reads family data from here (gguf_names)
    from modeltrace.sources.base import TensorInfo


@dataclass(frozen=True, order=True)
class Slot:
    """What a tensor *is*, independent of its name: role, layer index and expert index."""

    role: str
    layer: int = -1  # -1: not inside a layer (embeddings, final norm, lm_head)
    expert: int = -1  # -1: not an expert

    @property
    def key(self) -> str:
        s = self.role if self.layer < 0 else f"L{self.layer}.{self.role}"
        return s if self.expert < 0 else f"{s}.E{self.expert}"


@dataclass(frozen=True)
class Part:
    """A canonical tensor: rows [row_start, row_stop) of the stored tensor `name`."""

    slot: Slot
    name: str
    row_start: int
    row_stop: int
    cols: int
    transposed: bool = False

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    role: str
    fused: tuple[str, ...] = ()
    per_expert: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    transposed: frozenset[str]

    def classify(self, tensor_name: str) -> tuple[Rule, dict[str, str], bool] | None:
        """(rule, captured groups, is_bias) for a tensor name, or None when no rule matches."""
        module, is_bias = tensor_name, False
        if module.endswith(".weight"):
            module = module[: -len(".weight")]
        elif module.endswith(".bias"):
            module, is_bias = module[: -len(".bias")], True
        for rule in self.rules:
            m = rule.pattern.fullmatch(module) or rule.pattern.fullmatch(tensor_name)
            if m:
                return rule, {k: v for k, v in m.groupdict().items() if v is not None}, is_bias
        return None


def _load(name: str) -> dict:
    text = resources.files(__package__).joinpath("families", f"{name}.toml").read_text()
    return tomllib.loads(text)


@cache
def family_names() -> tuple[str, ...]:
    files = resources.files(__package__).joinpath("families").iterdir()
    return tuple(sorted(f.name[:-5] for f in files if f.name.endswith(".toml")))


@cache
def get_family(name: str) -> Family:
    data = _load(name)
    prefix = data.get("prefix", "^")
    rules: list[Rule] = []
    transposed = set(data.get("transposed", []))
    # A family's own rules come first, so they win over the rules it extends.
    for r in data.get("rule", []):
        rules.append(Rule(re.compile(prefix + r["match"]), r["role"], tuple(r.get("fused", ())),
                          bool(r.get("per_expert", False))))
    if "extends" in data:
        parent = get_family(data["extends"])
        rules.extend(parent.rules)
        transposed |= parent.transposed
    return Family(name, tuple(data.get("model_types", [])), tuple(rules), frozenset(transposed))


def detect_family(tensor_names: list[str], model_type: str | None = None) -> Family:
    """The family declared by `model_type`, else the one whose rules name the most tensors."""
    if model_type:
        for fname in family_names():
            if model_type in get_family(fname).model_types:
                return get_family(fname)
    best, best_hits = get_family("llama"), -1
    for fname in family_names():
        fam = get_family(fname)
        hits = sum(1 for n in tensor_names if fam.classify(n) is not None)
        if hits > best_hits:
            best, best_hits = fam, hits
    return best


def _fused_split(rule: Rule, role_fmt: dict[str, str], info: TensorInfo, config: Mapping | None
                 ) -> list[tuple[str, int, int]]:
    """Split a fused tensor's rows (per expert block, if stacked) into (role, start, stop) pieces."""
    roles = [r.format(**role_fmt) for r in rule.fused]
    rows = info.rows
    if rule.per_expert:
        n_exp = info.shape[0] if len(info.shape) == 3 else 1
        block = rows // max(1, n_exp)
        sizes = [block // len(roles)] * len(roles)
        out = []
        for e in range(n_exp):
            start = e * block
            for role, size in zip(roles, sizes, strict=True):
                out.append((f"{role}#{e}", start, start + size))
                start += size
        return out
    sizes = [rows // len(roles)] * len(roles)
    if roles == ["attn_q", "attn_k", "attn_v"] and config:
        heads = config.get("num_attention_heads") or config.get("n_head")
        kv = config.get("num_key_value_heads") or heads
        if heads and kv and rows % (heads + 2 * kv) == 0:
            hd = rows // (heads + 2 * kv)
            sizes = [heads * hd, kv * hd, kv * hd]
    out, start = [], 0
    for role, size in zip(roles, sizes, strict=True):
        out.append((role, start, start + size))
        start += size
    return out


def canonical_parts(tensors: Mapping[str, TensorInfo], family: Family, config: Mapping | None = None
                    ) -> tuple[dict[Slot, Part], list[str]]:
    """Map every stored tensor to canonical parts. Returns (parts by slot, names no rule recognised)."""
    parts: dict[Slot, Part] = {}
    unknown: list[str] = []
    for name, info in tensors.items():
        hit = family.classify(name)
        if hit is None:
            unknown.append(name)
            continue
        rule, groups, is_bias = hit
        layer = int(groups.get("layer", -1))
        expert = int(groups.get("expert", -1))
        fmt = {"part": groups.get("part", "")}
        suffix = "_bias" if is_bias else ""
        role = rule.role.format(**fmt) + suffix
        transposed = role in family.transposed
        if rule.fused and not is_bias:
            for prole, a, b in _fused_split(rule, fmt, info, config):
                r, _, e = prole.partition("#")
                slot = Slot(r, layer, int(e) if e else expert)
                parts[slot] = Part(slot, name, a, b, info.cols, transposed)
            continue
        slot = Slot(role, layer, expert)
        parts[slot] = Part(slot, name, 0, info.rows, info.cols, transposed)
    return parts, unknown


STRUCTURED_ROLES = ("norm", "router", "shared_expert_gate", "buffer", "linattn_A_log", "linattn_dt_bias")


def is_structured(slot: Slot, part: Part) -> bool:
    """Tensors whose values share structure across unrelated models (norm gains near 1, biases, routers,
    tiny vectors): they get their own null and never carry the independence test alone."""
    role = slot.role
    return (role.endswith("_bias") or "norm" in role or any(role.startswith(s) for s in STRUCTURED_ROLES)
            or part.rows == 1 or part.cols == 1 or part.numel < 4096)


def is_expert_role(role: str) -> bool:
    return role.startswith("expert_")
