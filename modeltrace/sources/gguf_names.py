"""GGUF tensor names -> the Hugging Face names modeltrace's families recognise, for any architecture gguf knows.

Data flow: `general.architecture` -> gguf's own HF->GGUF tensor map for that architecture (gguf.get_tensor_name_map,
every HF spelling any converter maps to each GGUF tensor) -> reversed, GGUF base name -> candidate HF names ->
the candidate that the architecture's modeltrace family (families/*.toml, chosen by model_type, else the family
that recognises most of the file's tensors) gives a canonical role -> that name. A tensor no candidate of which the
family recognises keeps its GGUF name (and is reported as unrecognised, never silently renamed to a wrong role).

Also here, as data about llama.cpp's converter: which architectures' Q/K rows it permutes, which HF model_type and
class a GGUF architecture stands for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import gguf
from gguf.tensor_mapping import TensorNameMap

from modeltrace.architectures import Family, family_names, get_family

__all__ = ["GGUFNaming", "PERMUTED_ARCHS", "hf_class", "model_type_for", "naming_for"]

#: GGUF `general.architecture` -> HF `model_type` where they differ (besides '-' -> '_')
_MODEL_TYPES = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "qwen3next": "qwen3_next", "olmo2": "olmo2",
                "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe",
                "jina-bert-v2": "jina_bert", "nomic-bert": "nomic_bert", "modern-bert": "modernbert"}
_HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "bert": "BertModel",
    "gpt2": "GPT2LMHeadModel",
}
#: architectures whose q_proj/k_proj rows llama.cpp's convert_hf_to_gguf reorders (LlamaModel.permute): LlamaModel
#: and the subclasses that keep undo_permute (granite, granitemoe, arcee, smollm3, llama-embed), deci, olmo, minicpm
PERMUTED_ARCHS = frozenset({"llama", "llama-embed", "deci", "olmo", "minicpm", "granite", "granitemoe", "arcee",
                            "smollm3"})

# Where several HF spellings of one GGUF tensor get a role from the family, the llama/qwen convention ("{bid}" =
# layer number) wins, in this order; then gguf's own order.
_PREFERRED = [
    "model.embed_tokens", "lm_head", "model.norm",
    "model.layers.{bid}.input_layernorm", "model.layers.{bid}.post_attention_layernorm",
    "model.layers.{bid}.self_attn.q_proj", "model.layers.{bid}.self_attn.k_proj",
    "model.layers.{bid}.self_attn.v_proj", "model.layers.{bid}.self_attn.o_proj",
    "model.layers.{bid}.self_attn.q_norm", "model.layers.{bid}.self_attn.k_norm",
    "model.layers.{bid}.mlp.gate_proj", "model.layers.{bid}.mlp.up_proj", "model.layers.{bid}.mlp.down_proj",
    "model.layers.{bid}.mlp.gate",
    "model.layers.{bid}.mlp.experts.gate_proj", "model.layers.{bid}.mlp.experts.up_proj",
    "model.layers.{bid}.mlp.experts.down_proj",
    "model.layers.{bid}.mlp.shared_expert.gate_proj", "model.layers.{bid}.mlp.shared_expert.up_proj",
    "model.layers.{bid}.mlp.shared_expert.down_proj", "model.layers.{bid}.mlp.shared_expert_gate",
]
_PREFERRED_RANK = {p: i for i, p in enumerate(_PREFERRED)}
_LAYER_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)")

# TensorNameMap.__init__ updates its class-level block table in place for some architectures (a gguf quirk), which
# would leak one architecture's overrides into the next map; each map is built from this pristine copy.
_PRISTINE_BLOCK_CFG = dict(TensorNameMap.block_mappings_cfg)


def model_type_for(arch: str, has_experts: bool = False) -> str:
    """The HF model_type a GGUF architecture stands for (llama.cpp writes Mixtral as `llama` with experts)."""
    if arch == "llama" and has_experts:
        return "mixtral"
    return _MODEL_TYPES.get(arch, arch.replace("-", "_"))


def hf_class(model_type: str, arch: str) -> str | None:
    return _HF_CLASSES.get(model_type) or _HF_CLASSES.get(arch)


def _candidates(arch: str, n_blocks: int) -> dict[str, list[str]]:
    """GGUF base name (no .weight/.bias) -> every HF base name gguf maps to it for this architecture, in its order."""
    member = {name: m for m, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if member is None:
        return {}
    saved = TensorNameMap.block_mappings_cfg
    TensorNameMap.block_mappings_cfg = dict(_PRISTINE_BLOCK_CFG)
    try:
        tmap = gguf.get_tensor_name_map(member, n_blocks)
    finally:
        TensorNameMap.block_mappings_cfg = saved
    out: dict[str, list[str]] = {}
    for hf_name, (_kind, gguf_name) in tmap.mapping.items():
        if hf_name != gguf_name:
            out.setdefault(gguf_name, []).append(hf_name)
    return out


def _recognised(names: list[str], family: Family) -> list[str]:
    """The candidates the family gives a role, best first (preferred spelling, then gguf's order)."""
    hits = [(i, n) for i, n in enumerate(names) if family.classify(n) is not None]
    hits.sort(key=lambda h: (_PREFERRED_RANK.get(_LAYER_NUM.sub("{bid}", h[1]), len(_PREFERRED)), h[0]))
    return [n for _, n in hits]


def _split(gguf_name: str) -> tuple[str, str]:
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return gguf_name, ""
    return base, suffix


@dataclass(frozen=True)
class GGUFNaming:
    """How one GGUF file's tensors are named: the family chosen and GGUF base name -> HF base name."""

    family: Family | None
    base_names: Mapping[str, str]

    def hf_name(self, gguf_name: str) -> str:
        base, suffix = _split(gguf_name)
        hf = self.base_names.get(base)
        if hf is None:
            return gguf_name
        if base.endswith("_exps") and suffix == "weight":
            return hf  # stacked experts: model.layers.N.mlp.experts.gate_proj, shape [experts, out, in]
        return f"{hf}.{suffix}" if suffix else hf

    def transposed(self, hf_name: str) -> bool:
        """Whether the family stores this tensor [in, out] (GPT-2's Conv1D) while GGUF stores it [out, in]."""
        if self.family is None or not self.family.transposed:
            return False
        hit = self.family.classify(hf_name)
        if hit is None or hit[2]:
            return False
        rule, groups, _ = hit
        return rule.role.format(part=groups.get("part", "")) in self.family.transposed


def naming_for(arch: str | None, model_type: str | None, n_blocks: int, gguf_names: Iterable[str]) -> GGUFNaming:
    """The naming of a GGUF file of architecture `arch` holding tensors `gguf_names`."""
    if not arch:
        return GGUFNaming(None, {})
    candidates = _candidates(arch, n_blocks)
    bases = {_split(n)[0] for n in gguf_names}
    present = {b: candidates[b] for b in bases if b in candidates}
    family = None
    for fname in family_names():
        if model_type and model_type in get_family(fname).model_types:
            family = get_family(fname)
            break
    if family is None:  # an architecture no family declares: the family that recognises most of its tensors
        best = 0
        for fname in family_names():
            fam = get_family(fname)
            hits = sum(1 for names in present.values() if _recognised(names, fam))
            if hits > best:
                family, best = fam, hits
    if family is None:
        return GGUFNaming(None, {})
    out = {}
    for base, names in present.items():
        picked = _recognised(names, family)
        if picked:
            out[base] = picked[0]
    return GGUFNaming(family, out)
