"""Registry of the relations and merge methods modeltrace can recognise, each with its paper."""

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


register("linear", "weighted average of the parents, per tensor (model soup)",
         "Wortsman et al., Model soups, ICML 2022, arXiv:2203.05482", "linear")
register("task_arithmetic", "base plus weighted sum of task vectors (parent - base)",
         "Ilharco et al., Editing models with task arithmetic, ICLR 2023, arXiv:2212.04089", "linear")
register("slerp", "spherical interpolation of two parents, angle measured per output row",
         "Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985", "spherical")
register("model_stock", "average of fine-tunes pulled toward the base by a ratio set by their angle",
         "Jang et al., Model Stock, ECCV 2024, arXiv:2403.19522", "linear")
register("ties", "task vectors trimmed to top-k magnitudes, sign election, disjoint mean",
         "Yadav et al., TIES-Merging, NeurIPS 2023, arXiv:2306.01708", "sparse")
register("dare_linear", "task vectors randomly dropped with probability p and rescaled, then summed",
         "Yu et al., Language models are Super Mario (DARE), ICML 2024, arXiv:2311.03099", "sparse")
register("dare_ties", "DARE drop-and-rescale followed by TIES sign election",
         "Yu et al., arXiv:2311.03099; Yadav et al., arXiv:2306.01708", "sparse")
register("breadcrumbs", "task vectors with both the largest outliers and the smallest entries removed",
         "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv:2312.06795", "sparse")
register("della", "magnitude-ranked stochastic dropping (MagPrune) with sign election",
         "Deep et al., DELLA-Merging, arXiv:2406.11617", "sparse")
register("sparse", "a sparsified task-vector merge whose sparsifier is not identified (breadcrumbs-like)",
         "Davari & Belilovsky, arXiv:2312.06795; Yadav et al., arXiv:2306.01708", "sparse")
register("passthrough", "layers copied whole from parents and stacked (frankenmerge)",
         "Kim et al., SOLAR 10.7B depth up-scaling, arXiv:2312.15166", "stack")
register("finetune", "the parent plus one training delta",
         "Zhu et al., Independence tests for language models, ICML 2025, arXiv:2502.12292", "finetune")
