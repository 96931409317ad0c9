"""Registry of everything modeltrace can name, each with its paper: relations and tests as labels here, merge methods
as objects (modeltrace/methods: they fit into this dict when registered, with the same name, description, paper
and family)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    paper: str
    family: str  # linear | spherical | sparse | stack | copy


METHODS: dict[str, MethodInfo] = {}


def register(name: str, description: str, paper: str, family: str) -> MethodInfo:
    info = MethodInfo(name, description, paper, family)
    METHODS[name] = info
    return info


register("finetune", "the parent plus one training delta",
         "Zhu et al., Independence tests for language models, ICML 2025, arXiv:2502.12292", "finetune")
register("match_test", "independence test that matches hidden units twice (inputs, outputs) and counts agreement",
         "Zhu, Ahmed, Kuditipudi, Liang, Independence tests for language models, ICML 2025, arXiv:2502.12292",
         "independence")
