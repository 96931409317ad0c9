"""Canonical identity of tensors across naming schemes: (role, layer, expert) for every stored tensor.

Families are data (`families/*.toml`, one per naming scheme): regex rules from a module path to a role. Fused
tensors (qkv, gate_up, stacked experts) are split here into canonical *parts*, each a row range of the stored
tensor, so that a per-expert checkpoint and a fused one compare expert by expert. Names are matched once per
template (every all-digit component as "#"): later names of a template take their layer and expert numbers from
their own components, so a 93k-tensor MoE is classified in about half a second.

A family's `[roles]` table says what each role means for alignment (`RoleSemantics`: the space it reads, the space
it writes, the norm gain that scales its input); align/roles.py turns that into disguise checks, so a family that
declares them gets permutation and rotation checks without code.
"""

from __future__ import annotations

import gc
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: sources/ reads family data from here (gguf_names)
    from modeltrace.sources.base import TensorInfo


@dataclass(frozen=True, order=True, slots=True)
class Slot:
    """What a tensor *is*, independent of its name: role, layer index and expert index."""

    role: str
    layer: int = -1  # -1: not inside a layer (embeddings, final norm, lm_head)
    expert: int = -1  # -1: not an expert

    @property
    def key(self) -> str:
        s = self.role if self.layer < 0 else f"L{self.layer}.{self.role}"
        return s if self.expert < 0 else f"{s}.E{self.expert}"


@dataclass(frozen=True, slots=True)
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


#: Signs that a rule tells numbers apart (a literal numeric component, `\d` not as `\d+`, a digit class): such a
#: family is classified name by name, without the template cache.
_NUMBER_SENSITIVE = re.compile(r"\\d(?!\+)|\[[^\]]*0-9|\\\.\d+(?:\\\.|$)")
#: An all-digit component of a dotted tensor name after the first (a layer or expert number), captured for `split`.
_NUMBERS = re.compile(r"\.(\d+)(?=\.|$)")
#: Templates remembered per family before the cache starts over (a checkpoint has a few dozen).
_CACHE_LIMIT = 1 << 16


#: Spaces a role may read, write or scale (align/roles.py maps each to an alignment map).
SPACES = frozenset({"residual", "vocab", "position", "token_type", "heads", "kv_heads", "qkv", "mlp", "shared",
                    "expert", "experts", "scalar", "pooled"})
_ROLE_KEYS = frozenset({"reads", "writes", "scales", "gain", "gain_layer", "gain_first", "table"})


@dataclass(frozen=True, slots=True)
class RoleSemantics:
    """What one role does, from a family's `[roles]` table.

    A matrix role `reads` one space and `writes` another: its canonical part (nn.Linear layout) has rows in the
    written space and columns in the read one; a `table` (an embedding) is looked up, so its rows are the read
    space. A family's `transposed` roles are stored the other way round (GPT-2's Conv1D). A vector role `scales`
    one space (a norm gain). `gain` names the norm role whose gain scales what the role reads, in the same layer, or
    in the previous one when `gain_layer` is -1 (post-LN BERT), `gain_first` standing in for layer 0; layer-less
    roles (lm_head) use the layer-less norm."""

    reads: str = ""
    writes: str = ""
    scales: str = ""
    gain: str = ""
    gain_layer: int = 0
    gain_first: str = ""
    table: bool = False


def _role_semantics(family: str, data: dict) -> dict[str, RoleSemantics]:
    out: dict[str, RoleSemantics] = {}
    for role, spec in data.items():
        if not isinstance(spec, dict) or set(spec) - _ROLE_KEYS:
            raise ValueError(f"family {family}: role {role}: unknown keys {sorted(set(spec) - _ROLE_KEYS)}")
        sem = RoleSemantics(**spec)
        for space in (sem.reads, sem.writes, sem.scales):
            if space and space not in SPACES:
                raise ValueError(f"family {family}: role {role}: unknown space {space!r}")
        if bool(sem.scales) == bool(sem.reads or sem.writes) or bool(sem.reads) != bool(sem.writes):
            raise ValueError(f"family {family}: role {role}: give reads and writes, or scales")
        out[role] = sem
    return out


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    transposed: frozenset[str]
    #: alignment semantics by role (the `[roles]` table, merged over the families it extends)
    roles: dict[str, RoleSemantics] = field(default_factory=dict, compare=False, hash=False)
    #: template (the name with every all-digit component as "#") -> (rule, groups by component index or as
    #: constants, is_bias), or False when names of that template must be matched one by one
    _templates: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def _cacheable(self) -> bool:
        return not any(_NUMBER_SENSITIVE.search(r.pattern.pattern) for r in self.rules)

    def classify(self, tensor_name: str) -> tuple[Rule, dict[str, str], bool] | None:
        """(rule, captured groups, is_bias) for a tensor name, or None when no rule matches.

        Names that differ only in their all-digit components (layer and expert numbers) are matched by the same
        rule with the same groups, so the regexes run once per template (`layers.#.mlp.experts.#.up_proj.weight`)
        and later names of it are read off their components: 93k tensors of a 400B MoE in a fraction of the time."""
        entry, pieces = self.template(tensor_name)
        if entry is False:
            return self._match(tensor_name)[0]
        if entry is True:
            return None
        rule, spec, is_bias = entry
        return rule, {g: (pieces[v] if isinstance(v, int) else v[0]) for g, v in spec}, is_bias

    def template(self, tensor_name: str) -> tuple[Any, list[str]]:
        """(entry, pieces): the name split around its numeric components (text, number, ..., text) and what its
        template classifies to: True (no rule), False (match this name by itself), or (rule, groups, is_bias) with
        each group an index into `pieces` or a 1-tuple holding its constant value."""
        pieces = _NUMBERS.split(tensor_name)
        key = "#".join(pieces[::2])
        entry = self._templates.get(key)
        if entry is None:
            entry = self._learn(tensor_name, key)
        return entry, pieces

    def _match(self, tensor_name: str) -> tuple[tuple[Rule, dict[str, str], bool] | None, re.Match | None]:
        module, is_bias = tensor_name, False
        if module.endswith(".weight"):
            module = module[: -len(".weight")]
        elif module.endswith(".bias"):
            module, is_bias = module[: -len(".bias")], True
        for rule in self.rules:
            m = rule.pattern.fullmatch(module) or rule.pattern.fullmatch(tensor_name)
            if m:
                return (rule, {k: v for k, v in m.groupdict().items() if v is not None}, is_bias), m
        return None, None

    def _learn(self, tensor_name: str, key: str) -> object:
        """Match one name of a template and record how its groups sit on the name's numeric components."""
        hit, m = self._match(tensor_name)
        entry: object
        if not self._cacheable:
            entry = False
        elif hit is None:
            entry = True
        else:
            assert m is not None  # a rule matched, so its match object exists
            numbers = [(n.start(1), n.end(1), 2 * i + 1) for i, n in enumerate(_NUMBERS.finditer(tensor_name))]
            spec: list[tuple[str, object]] = []
            for g, v in hit[1].items():
                a, b = m.span(g)
                same = [k for s0, e0, k in numbers if (s0, e0) == (a, b)]
                if same:
                    spec.append((g, same[0]))  # the group is one numeric component: read it off each name
                elif not any(s0 < b and a < e0 for s0, e0, _ in numbers):
                    spec.append((g, (v,)))  # no numeric component inside: the same for every name
                else:
                    spec = []
                    entry = False
                    break
            else:
                entry = (hit[0], tuple(spec), hit[2])
        if len(self._templates) >= _CACHE_LIMIT:
            self._templates.clear()
        self._templates[key] = entry
        return entry


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
    roles = _role_semantics(name, data.get("roles", {}))
    if "extends" in data:
        parent = get_family(data["extends"])
        rules.extend(parent.rules)
        transposed |= parent.transposed
        roles = {**parent.roles, **roles}
    return Family(name, tuple(data.get("model_types", [])), tuple(rules), frozenset(transposed), roles)


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


def _name_plan(family: Family, hit: tuple[Rule, dict[str, str], bool], entry: object) -> tuple:
    """(rule, role or None when fused, transposed, layer, expert, format groups) for one classified name; layer and
    expert as an index into the template's pieces or a 1-tuple holding the number."""
    rule, groups, is_bias = hit
    spec = dict(entry[1]) if isinstance(entry, tuple) else {}

    def number(g: str) -> int | tuple[int]:
        at = spec.get(g)
        return at if isinstance(at, int) else (int(groups[g]) if g in groups else -1,)

    fmt = {"part": groups.get("part", "")}
    role = rule.role.format(**fmt) + ("_bias" if is_bias else "")
    fused = bool(rule.fused) and not is_bias
    return rule, None if fused else role, role in family.transposed, number("layer"), number("expert"), fmt


def canonical_parts(tensors: Mapping[str, TensorInfo], family: Family, config: Mapping | None = None
                    ) -> tuple[dict[Slot, Part], list[str]]:
    """Map every stored tensor to canonical parts. Returns (parts by slot, names no rule recognised)."""
    # hundreds of thousands of small acyclic objects: the cyclic collector would rescan the growing heap many
    # times over (a third of the time for 93k tensors)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _canonical_parts(tensors, family, config)
    finally:
        if enabled:
            gc.enable()


def _canonical_parts(tensors: Mapping[str, TensorInfo], family: Family, config: Mapping | None
                     ) -> tuple[dict[Slot, Part], list[str]]:
    parts: dict[Slot, Part] = {}
    unknown: list[str] = []
    plans: dict[int, tuple] = {}  # id(template entry) -> what every name of that template becomes
    for name, info in tensors.items():
        entry, pieces = family.template(name)
        plan = plans.get(id(entry)) if isinstance(entry, tuple) else None
        if plan is None:
            hit = family.classify(name)
            if hit is None:
                unknown.append(name)
                continue
            plan = _name_plan(family, hit, entry)
            if isinstance(entry, tuple):
                plans[id(entry)] = plan
        rule, role, transposed, layer_at, expert_at, fmt = plan
        layer = int(pieces[layer_at]) if isinstance(layer_at, int) else layer_at[0]
        expert = int(pieces[expert_at]) if isinstance(expert_at, int) else expert_at[0]
        shape = info.shape
        if len(shape) == 2:
            rows, cols = shape
        else:
            rows, cols = info.rows, info.cols
        if role is None:  # fused: split into parts
            for prole, a, b in _fused_split(rule, fmt, info, config):
                r, _, e = prole.partition("#")
                slot = Slot(r, layer, int(e) if e else expert)
                parts[slot] = Part(slot, name, a, b, cols, transposed)
            continue
        slot = Slot(role, layer, expert)
        parts[slot] = Part(slot, name, 0, rows, cols, transposed)
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
