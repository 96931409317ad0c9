"""A reproducible corpus of tiny checkpoints with known provenance, for modeltrace's tests.

`build_corpus(root)` writes, under `root`:

- `models/<name>/`: Hugging Face model folders (`config.json`, `model.safetensors`, bf16), each with a
  `corpus_meta.json` that records how it was made;
- `configs/<name>.yml`: the exact mergekit YAML of every merge and stack; `logs/<name>.log`: the equivalent
  `mergekit-yaml` command line and mergekit's output. Merges run in 2 worker processes that import mergekit once
  (that import is ~6 s of the ~6.5 s a `mergekit-yaml` call costs) and invoke the `mergekit-yaml` click command
  with the same arguments as the CLI, offline (HF_HUB_OFFLINE=1), fp32 compute and bf16 output;
- `manifest.json`: the ground truth for every model (see `Corpus` and the keys documented below).

What it builds (names are stable; the tests depend on them):

- dense llama family (`LlamaConfig`, hidden 64, 4 layers): `base_a`, `base_b` (independent inits, each pretrained
  briefly on its own synthetic language), `indep_00..` (independent inits for null calibration; every third one is
  trained a little, half of those on base_a's pretraining data), fine-tunes `ft_a1`, `ft_a2` (of base_a, different
  data) and `ft_b1` (of base_b), made by real AdamW steps on CPU;
- mergekit merges of those with known recipes (linear, slerp, task_arithmetic, ties, dare_linear, dare_ties,
  breadcrumbs, della, model_stock) and passthrough stacks (`s_*`);
- MoE families: qwen3_moe (`moe_base`, `moe_ft1`, `moe_ft2`, `moe_linear`, `moe_ties`) and mixtral (`mix_base`,
  `mix_ft1`, `mix_ft2`, `mix_linear`). `save_pretrained` writes per-expert keys, mergekit writes the fused
  transformers-5 layout; each entry's `expert_layout` says which.

Building is idempotent (each model carries a hash of its recipe and is rebuilt only when that changes) and safe to run
concurrently (an exclusive `fcntl` lock on `root/.build.lock`). A complete corpus is reused without importing torch.

Manifest (`manifest.json`): {"corpus_version", "fingerprint", "root", "dense_config", "moe_configs", "build",
"models": {name: entry}}. Every entry has `name`, `path` (absolute), `relpath`, `kind` (base | independent |
finetune | merge | stack), `family` (dense | qwen3_moe | mixtral), `model_type`, `num_layers`, `parents`, `tensors`
(sorted tensor names), `expert_layout` (None | "per_expert" | "fused"), `build_seconds`. By kind:

- base / independent: `seed`, `train` (None for a pure init, else steps, lr, data_seed, loss_before, loss_after);
- finetune: `parent`, `steps`, `train` (as above), `delta_rel_norm` ({"min", "median", "max", "per_tensor"}:
  ||ft - parent|| / ||parent|| per tensor, measured on the stored bf16 weights);
- merge: `method`, `base` (a model name or None), `parameters` ({model name: its parameters as written in the
  YAML}), `global_parameters`, `mergekit_yaml` (exact text), `config_path`, `random_seed`, `layer_values`
  (gradient parameters evaluated per layer as mergekit does: layer i of n gets t = i/(n-1), tensors outside the
  layers get t = 0), and for recipes that are an exact linear combination (linear, task_arithmetic)
  `coefficients` ({model name: coefficient} for tensors outside the layers, and for every layer unless
  `coefficients_by_layer`, a list with one such dict per layer, is given); None otherwise;
- stack: `layer_map` ([{"layer": i, "parent": name, "parent_layer": j}]), `other_tensors` ({tensor name: parent}),
  `mergekit_yaml`, `config_path`.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("modeltrace.tests.corpus")

CORPUS_VERSION = 1
VOCAB = 256
SEQ_LEN = 64
BATCH = 16
MERGE_SEED = 1234
MERGE_PARALLELISM = 2

DENSE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
MOE_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "moe_intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    },
    "mixtral": {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    },
}
MODEL_TYPES = {"dense": "llama", "qwen3_moe": "qwen3_moe", "mixtral": "mixtral"}

# Pretraining moves a random init somewhere non-trivial; fine-tuning is gentler so that siblings stay close
# (weight cosine >= 0.98, as in the wild) while deltas stay far above bf16 rounding (see `delta_rel_norm`).
PRETRAIN = {"steps": 60, "lr": 3e-3}
INDEP_TRAIN = {"steps": 30, "lr": 3e-3}
FINETUNE = {"steps": 40, "lr": 2e-4}
MOE_PRETRAIN = {"steps": 40, "lr": 3e-3}
MOE_FINETUNE = {"steps": 30, "lr": 3e-4}


# --------------------------------------------------------------------------------------------------- specs


def _spec_list(n_independent: int) -> list[dict[str, Any]]:
    """Every model of the corpus, in build order (parents before children)."""
    s: list[dict[str, Any]] = [
        {"name": "base_a", "kind": "base", "family": "dense", "seed": 1, "train": {**PRETRAIN, "data_seed": 1}},
        {"name": "base_b", "kind": "base", "family": "dense", "seed": 2, "train": {**PRETRAIN, "data_seed": 2}},
    ]
    for i in range(n_independent):
        seed = 100 + i
        train = None
        if i % 3 == 2:  # a few are trained a little, alternately on base_a's data and on their own
            train = {**INDEP_TRAIN, "data_seed": 1 if (i // 3) % 2 == 0 else seed}
        s.append({"name": f"indep_{i:02d}", "kind": "independent", "family": "dense", "seed": seed, "train": train})
    s += [
        {"name": "ft_a1", "kind": "finetune", "family": "dense", "parent": "base_a",
         "train": {**FINETUNE, "data_seed": 11}},
        {"name": "ft_a2", "kind": "finetune", "family": "dense", "parent": "base_a",
         "train": {**FINETUNE, "data_seed": 12}},
        {"name": "ft_b1", "kind": "finetune", "family": "dense", "parent": "base_b",
         "train": {**FINETUNE, "data_seed": 21}},
    ]

    def merge(name, method, models, base=None, params=None, family="dense", **extra):
        return {"name": name, "kind": "merge", "family": family, "method": method, "base": base,
                "models": models, "global_parameters": params or {}, "random_seed": MERGE_SEED, **extra}

    a1, a2 = "ft_a1", "ft_a2"
    s += [
        merge("m_linear_rio", "linear", [(a1, {"weight": 0.6}), (a2, {"weight": 0.4})]),
        merge("m_linear_indep", "linear", [("base_a", {"weight": 0.6}), ("base_b", {"weight": 0.4})]),
        merge("m_linear_unnorm", "linear", [(a1, {"weight": 0.7}), (a2, {"weight": 0.5})],
              params={"normalize": False}),
        merge("m_linear_grad", "linear", [(a1, {"weight": [0.8, 0.2]}), (a2, {"weight": [0.2, 0.8]})]),
        merge("m_linear_cross", "linear", [(a1, {"weight": 0.5}), ("ft_b1", {"weight": 0.5})]),
        merge("m_slerp_t03", "slerp", [(a1, {}), (a2, {})], base=a1, params={"t": 0.3}),
        merge("m_slerp_grad", "slerp", [(a1, {}), (a2, {})], base=a1, params={"t": [0.0, 0.5, 1.0]}),
        merge("m_slerp_indep", "slerp", [("base_a", {}), ("base_b", {})], base="base_a", params={"t": 0.5}),
        merge("m_task_arith", "task_arithmetic", [(a1, {"weight": 0.7}), (a2, {"weight": 0.5})], base="base_a"),
        merge("m_ties_d05", "ties", [(a1, {"weight": 1.0, "density": 0.5}), (a2, {"weight": 1.0, "density": 0.5})],
              base="base_a"),
        merge("m_ties_d03", "ties", [(a1, {"weight": 0.6, "density": 0.3}), (a2, {"weight": 0.4, "density": 0.3})],
              base="base_a"),
        merge("m_dare_linear", "dare_linear",
              [(a1, {"weight": 0.6, "density": 0.7}), (a2, {"weight": 0.4, "density": 0.7})], base="base_a"),
        merge("m_dare_ties", "dare_ties",
              [(a1, {"weight": 0.6, "density": 0.5}), (a2, {"weight": 0.4, "density": 0.5})], base="base_a"),
        merge("m_breadcrumbs", "breadcrumbs",
              [(a1, {"weight": 0.6, "density": 0.9, "gamma": 0.01}),
               (a2, {"weight": 0.4, "density": 0.9, "gamma": 0.01})], base="base_a"),
        merge("m_della", "della",
              [(a1, {"weight": 0.6, "density": 0.7, "epsilon": 0.15}),
               (a2, {"weight": 0.4, "density": 0.7, "epsilon": 0.15})], base="base_a", params={"lambda": 1.0}),
        merge("m_model_stock", "model_stock", [(a1, {}), (a2, {})], base="base_a"),
        {"name": "s_stack_2x2", "kind": "stack", "family": "dense", "slices": [(a1, 0, 2), ("base_b", 2, 4)],
         "random_seed": MERGE_SEED},
        {"name": "s_stack_deep", "kind": "stack", "family": "dense", "slices": [(a1, 0, 3), ("base_b", 1, 4)],
         "random_seed": MERGE_SEED},
    ]
    s += [
        {"name": "moe_base", "kind": "base", "family": "qwen3_moe", "seed": 7,
         "train": {**MOE_PRETRAIN, "data_seed": 7}},
        {"name": "moe_ft1", "kind": "finetune", "family": "qwen3_moe", "parent": "moe_base",
         "train": {**MOE_FINETUNE, "data_seed": 71}},
        {"name": "moe_ft2", "kind": "finetune", "family": "qwen3_moe", "parent": "moe_base",
         "train": {**MOE_FINETUNE, "data_seed": 72}},
        merge("moe_linear", "linear", [("moe_ft1", {"weight": 0.6}), ("moe_ft2", {"weight": 0.4})],
              family="qwen3_moe"),
        merge("moe_ties", "ties",
              [("moe_ft1", {"weight": 0.6, "density": 0.5}), ("moe_ft2", {"weight": 0.4, "density": 0.5})],
              base="moe_base", family="qwen3_moe"),
        {"name": "mix_base", "kind": "base", "family": "mixtral", "seed": 8,
         "train": {**MOE_PRETRAIN, "data_seed": 8}},
        {"name": "mix_ft1", "kind": "finetune", "family": "mixtral", "parent": "mix_base",
         "train": {**MOE_FINETUNE, "data_seed": 81}},
        {"name": "mix_ft2", "kind": "finetune", "family": "mixtral", "parent": "mix_base",
         "train": {**MOE_FINETUNE, "data_seed": 82}},
        merge("mix_linear", "linear", [("mix_ft1", {"weight": 0.6}), ("mix_ft2", {"weight": 0.4})],
              family="mixtral"),
    ]
    return s


def model_names(n_independent: int = 12) -> list[str]:
    """The names `build_corpus(root, n_independent)` builds, in build order."""
    return [s["name"] for s in _spec_list(n_independent)]


def _num_layers(family: str) -> int:
    cfg = DENSE_CONFIG if family == "dense" else MOE_CONFIGS[family]
    return int(cfg["num_hidden_layers"])


def _parents(spec: dict[str, Any]) -> list[str]:
    if spec["kind"] == "finetune":
        return [spec["parent"]]
    if spec["kind"] == "merge":
        names = [m for m, _ in spec["models"]]
        if spec["base"] and spec["base"] not in names:
            names = [spec["base"], *names]
        return names
    if spec["kind"] == "stack":
        return list(dict.fromkeys(m for m, _, _ in spec["slices"]))
    return []


def _family_config(family: str) -> dict[str, Any]:
    return DENSE_CONFIG if family == "dense" else MOE_CONFIGS[family]


def _spec_hashes(specs: list[dict[str, Any]], root: Path) -> dict[str, str]:
    """A hash of each model's recipe, including its parents' hashes, so a changed parent rebuilds its children
    (and, for merges, the root: their YAML names parents by absolute path)."""
    out: dict[str, str] = {}
    for spec in specs:
        payload = {
            "version": CORPUS_VERSION,
            "root": str(root) if spec["kind"] in ("merge", "stack") else None,
            "spec": spec,
            "config": _family_config(spec["family"]),
            "parents": [out[p] for p in _parents(spec)],
        }
        out[spec["name"]] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """A built corpus: `root` and the parsed `manifest.json`."""

    root: Path
    manifest: dict[str, Any]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.manifest["models"]

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self.models[name]

    def __contains__(self, name: str) -> bool:
        return name in self.models

    def path(self, name: str) -> Path:
        """The model folder of `name`."""
        return self.root / self.models[name]["relpath"]

    def weights(self, name: str) -> list[Path]:
        """The safetensors files of `name`."""
        return sorted(self.path(name).glob("*.safetensors"))

    def names(self, kind: str | None = None, family: str | None = None) -> list[str]:
        return [
            n for n, e in self.models.items()
            if (kind is None or e["kind"] == kind) and (family is None or e["family"] == family)
        ]


def build_corpus(root: Path | str, n_independent: int = 12) -> Corpus:
    """Build (or reuse) the corpus in `root` and return it. Safe to call concurrently from several processes."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    specs = _spec_list(n_independent)
    hashes = _spec_hashes(specs, root)
    fingerprint = hashlib.sha256("".join(hashes[s["name"]] for s in specs).encode()).hexdigest()

    existing = _load_complete(root, fingerprint, specs)
    if existing is not None:
        return existing
    with _locked(root / ".build.lock"):
        existing = _load_complete(root, fingerprint, specs)
        if existing is not None:
            return existing
        _build(root, specs, hashes, fingerprint)
        corpus = _load_complete(root, fingerprint, specs)
        if corpus is None:
            raise RuntimeError(f"corpus build in {root} finished but the manifest is incomplete")
        return corpus


def _load_complete(root: Path, fingerprint: str, specs: list[dict[str, Any]]) -> Corpus | None:
    mpath = root / "manifest.json"
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("fingerprint") != fingerprint or manifest.get("root") != str(root):
        return None
    models = manifest.get("models", {})
    for s in specs:
        entry = models.get(s["name"])
        if entry is None or not (root / entry["relpath"] / "corpus_meta.json").is_file():
            return None
    return Corpus(root=root, manifest=manifest)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _meta_if_current(model_dir: Path, spec_hash: str) -> dict[str, Any] | None:
    meta_path = model_dir / "corpus_meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("spec_hash") != spec_hash or not list(model_dir.glob("*.safetensors")):
        return None
    return meta


def _build(root: Path, specs: list[dict[str, Any]], hashes: dict[str, str], fingerprint: str) -> None:
    t_start = time.perf_counter()
    models_dir = root / "models"
    for sub in ("models", "configs", "logs"):
        (root / sub).mkdir(exist_ok=True)
    for stale in models_dir.glob(".tmp-*"):  # left by an interrupted build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    metas: dict[str, dict[str, Any]] = {}
    todo: list[dict[str, Any]] = []
    for spec in specs:
        meta = _meta_if_current(models_dir / spec["name"], hashes[spec["name"]])
        if meta is not None:
            metas[spec["name"]] = meta
        else:
            todo.append(spec)
    reused = len(metas)
    log.info("corpus %s: %d models current, %d to build", root, reused, len(todo))
    trained = [s for s in todo if s["kind"] in ("base", "independent", "finetune")]
    merged = [s for s in todo if s["kind"] in ("merge", "stack")]

    # mergekit's imports cost ~6 s a process: start the workers now so they import while we train.
    workers = _start_merge_workers(root, min(MERGE_PARALLELISM, len(merged)))
    try:
        if trained:
            t0 = time.perf_counter()
            with _torch_session():
                for spec in trained:
                    metas[spec["name"]] = _build_trained(root, spec, hashes[spec["name"]])
            log.info("corpus: trained/initialised %d models in %.1fs", len(trained), time.perf_counter() - t0)
        if merged:
            t0 = time.perf_counter()
            metas.update(_run_merges(root, merged, hashes, workers))
            log.info("corpus: ran %d mergekit merges in %.1fs", len(merged), time.perf_counter() - t0)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    total = time.perf_counter() - t_start
    manifest = {
        "corpus_version": CORPUS_VERSION,
        "fingerprint": fingerprint,
        "root": str(root),
        "dense_config": DENSE_CONFIG,
        "moe_configs": MOE_CONFIGS,
        "build": {
            "seconds_this_run": round(total, 2),
            "built_this_run": [s["name"] for s in todo],
            "reused": reused,
            "model_seconds": {s["name"]: metas[s["name"]].get("build_seconds") for s in specs},
        },
        "models": {},
    }
    for spec in specs:
        entry = dict(metas[spec["name"]])
        entry.pop("spec_hash", None)
        entry["path"] = str(models_dir / spec["name"])
        manifest["models"][spec["name"]] = entry
    tmp = root / f"manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))
    os.replace(tmp, root / "manifest.json")
    log.info("corpus %s: built %d models in %.1fs", root, len(todo), total)


# --------------------------------------------------------------------------------------------------- files


def _safetensors_names(model_dir: Path) -> list[str]:
    """Tensor names from the safetensors headers (no data read)."""
    names: list[str] = []
    for fn in sorted(model_dir.glob("*.safetensors")):
        with open(fn, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        names += [k for k in header if k != "__metadata__"]
    return sorted(names)


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def expert_layout(tensor_names: list[str]) -> str | None:
    """"per_expert" (`...experts.N.gate_proj.weight` / `block_sparse_moe.experts.N.w1.weight`), "fused"
    (`...mlp.experts.gate_up_proj [E, 2I, H]` = concat(gate, up) on dim 1, `...mlp.experts.down_proj [E, H, I]`),
    or None for a dense model."""
    if any(_PER_EXPERT.search(n) for n in tensor_names):
        return "per_expert"
    if any(n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj") for n in tensor_names):
        return "fused"
    return None


def _common_meta(spec: dict[str, Any], spec_hash: str, model_dir: Path) -> dict[str, Any]:
    names = _safetensors_names(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    return {
        "name": spec["name"],
        "relpath": f"models/{spec['name']}",
        "kind": spec["kind"],
        "family": spec["family"],
        "model_type": cfg.get("model_type"),
        "num_layers": cfg.get("num_hidden_layers"),
        "parents": _parents(spec),
        "tensors": names,
        "expert_layout": expert_layout(names),
        "spec_hash": spec_hash,
    }


def _finish(model_dir: Path, tmp_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    (tmp_dir / "corpus_meta.json").write_text(json.dumps(meta, indent=1))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp_dir, model_dir)
    return meta


def _fresh_tmp(root: Path, name: str) -> Path:
    tmp = root / "models" / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


# --------------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def _torch_session() -> Iterator[None]:
    """One thread with denormals flushed (tiny models trained on CPU otherwise stall erratically, 2-10x; the flush
    is per thread) and the caller's RNG state kept."""
    import torch

    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            torch.set_flush_denormal(False)
            torch.set_num_threads(threads)


def _markov_chain(seed: int, branching: int = 4):
    """A synthetic language: a sparse random bigram chain over the vocabulary (each token has `branching`
    successors with random probabilities). Different seeds give different "tasks"."""
    import torch

    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, VOCAB, (VOCAB, branching), generator=g)
    p = torch.rand(VOCAB, branching, generator=g) + 0.2
    return succ, p / p.sum(1, keepdim=True)


def _sample(chain, g, batch: int = BATCH):
    import torch

    succ, p = chain
    x = torch.empty(batch, SEQ_LEN, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
    for t in range(1, SEQ_LEN):
        j = torch.multinomial(p[x[:, t - 1]], 1, generator=g).squeeze(1)
        x[:, t] = succ[x[:, t - 1], j]
    return x


def _train(model, steps: int, lr: float, data_seed: int) -> dict[str, Any]:
    import torch

    chain = _markov_chain(data_seed)
    g = torch.Generator().manual_seed(data_seed * 7919 + 1)
    eval_x = _sample(chain, torch.Generator().manual_seed(data_seed * 7919 + 2), batch=32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    with torch.no_grad():
        before = float(model(input_ids=eval_x, labels=eval_x).loss)
    for _ in range(steps):
        x = _sample(chain, g)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(model(input_ids=eval_x, labels=eval_x).loss)
    if not after < before:
        raise RuntimeError(f"training did not reduce the loss ({before:.3f} -> {after:.3f})")
    return {"steps": steps, "lr": lr, "data_seed": data_seed, "optimizer": "AdamW(weight_decay=0.01)",
            "batch": BATCH, "seq_len": SEQ_LEN, "loss_before": round(before, 4), "loss_after": round(after, 4)}


def _model_classes(family: str):
    import transformers as tf

    return {
        "dense": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
    }[family]


def _build_trained(root: Path, spec: dict[str, Any], spec_hash: str) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    name, family = spec["name"], spec["family"]
    config_cls, model_cls = _model_classes(family)
    if spec["kind"] == "finetune":
        model = model_cls.from_pretrained(str(root / "models" / spec["parent"]), dtype=torch.float32)
    else:
        torch.manual_seed(spec["seed"])
        model = model_cls(config_cls(**_family_config(family)))
    train = None
    if spec.get("train"):
        t = spec["train"]
        train = _train(model, t["steps"], t["lr"], t["data_seed"])
    model = model.to(torch.bfloat16)
    tmp = _fresh_tmp(root, name)
    model.save_pretrained(str(tmp))
    meta = _common_meta(spec, spec_hash, tmp)
    meta["train"] = train
    if spec["kind"] == "finetune":
        meta["parent"] = spec["parent"]
        meta["steps"] = spec["train"]["steps"]
        meta["delta_rel_norm"] = _delta_stats(root / "models" / spec["parent"], tmp)
    else:
        meta["seed"] = spec["seed"]
    meta["build_seconds"] = round(time.perf_counter() - t0, 2)
    log.info("corpus: %s (%s) in %.1fs", name, spec["kind"], meta["build_seconds"])
    return _finish(root / "models" / name, tmp, meta)


def _delta_stats(parent_dir: Path, child_dir: Path) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    per: dict[str, float] = {}
    with safe_open(str(parent_dir / "model.safetensors"), "pt") as fp, \
            safe_open(str(child_dir / "model.safetensors"), "pt") as fc:
        for k in fc.keys():
            a, b = fp.get_tensor(k).float(), fc.get_tensor(k).float()
            per[k] = round(float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a)), 5)
    vals = sorted(per.values())
    return {"min": vals[0], "median": vals[len(vals) // 2], "max": vals[-1], "per_tensor": per}


# --------------------------------------------------------------------------------------------------- merges


def _gradient(value: Any, t: float) -> Any:
    """Evaluate a (possibly list-valued) mergekit parameter at position t in [0, 1], as mergekit does."""
    if not isinstance(value, list):
        return value
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def _layer_ts(n_layers: int) -> list[float]:
    return [i / (n_layers - 1) if n_layers > 1 else 1.0 for i in range(n_layers)]


def _merge_truth(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-layer values of gradient parameters and, for exactly linear recipes, the coefficients."""
    n = _num_layers(spec["family"])
    ts = _layer_ts(n)
    layer_values: dict[str, Any] = {}
    for key, val in spec["global_parameters"].items():
        if isinstance(val, list):
            layer_values[key] = {"non_layer": _gradient(val, 0.0), "layers": [_gradient(val, t) for t in ts]}
    for model, params in spec["models"]:
        for key, val in params.items():
            if isinstance(val, list):
                layer_values.setdefault(key, {})[model] = {
                    "non_layer": _gradient(val, 0.0), "layers": [_gradient(val, t) for t in ts]}

    def coeffs(t: float) -> dict[str, float] | None:
        method = spec["method"]
        w = {m: float(_gradient(p.get("weight", 1.0), t)) for m, p in spec["models"]}
        if method == "linear":
            if spec["global_parameters"].get("normalize", True):
                total = sum(w.values())
                return {m: v / total for m, v in w.items()}
            return w
        if method == "task_arithmetic":
            lam = float(spec["global_parameters"].get("lambda", 1.0))
            out = {spec["base"]: 1.0 - lam * sum(w.values())}
            out.update({m: lam * v for m, v in w.items()})
            return out
        return None

    base_coeffs = coeffs(0.0)
    by_layer = None
    if base_coeffs is not None and layer_values:
        by_layer = [coeffs(t) for t in ts]
    return {"layer_values": layer_values or None, "coefficients": base_coeffs, "coefficients_by_layer": by_layer}


def _merge_yaml(root: Path, spec: dict[str, Any]) -> str:
    def ref(name: str) -> str:
        return str(root / "models" / name)

    doc: dict[str, Any]
    if spec["kind"] == "stack":
        doc = {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": ref(m), "layer_range": [a, b]}]} for m, a, b in spec["slices"]],
        }
    else:
        doc = {"merge_method": spec["method"]}
        if spec["base"]:
            doc["base_model"] = ref(spec["base"])
        doc["models"] = [{"model": ref(m), **({"parameters": p} if p else {})} for m, p in spec["models"]]
        if spec["global_parameters"]:
            doc["parameters"] = spec["global_parameters"]
    doc["dtype"] = "float32"  # compute in fp32, round once on output
    doc["out_dtype"] = "bfloat16"
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


# Each worker imports mergekit once and runs the `mergekit-yaml` click command for every job it is given, with
# exactly the command-line arguments (so each job equals `mergekit-yaml CONFIG OUT ARGS...`, logged in its log).
_WORKER = """
import json, os, sys, traceback
from mergekit.scripts.run_yaml import main
for job in json.loads(sys.stdin.read()):
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(fd, 1); os.dup2(fd, 2)
    ok, err = True, ""
    try:
        main.main(args=job["args"], standalone_mode=False)
    except BaseException as exc:
        ok, err = False, repr(exc)
        traceback.print_exc()
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(fd); os.close(saved[0]); os.close(saved[1])
    print("@@" + json.dumps({"name": job["name"], "ok": ok, "error": err}), flush=True)
"""


def _mergekit_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start_merge_workers(root: Path, n: int) -> list[subprocess.Popen]:
    workers = []
    for i in range(n):
        with open(root / "logs" / f"_worker{i}.log", "w") as err:  # the child keeps its own copy of the fd
            workers.append(subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=err, text=True, env=_mergekit_env()))
    return workers


def _mergekit_args(cfg_path: Path, out: Path, random_seed: int) -> list[str]:
    return [str(cfg_path), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
            "--random-seed", str(random_seed)]


def _run_merges(root: Path, specs: list[dict[str, Any]], hashes: dict[str, str],
                workers: list[subprocess.Popen]) -> dict[str, dict[str, Any]]:
    t0 = time.perf_counter()
    jobs: list[dict[str, Any]] = []
    for spec in specs:
        name = spec["name"]
        cfg_path = root / "configs" / f"{name}.yml"
        text = _merge_yaml(root, spec)
        cfg_path.write_text(text)
        tmp = _fresh_tmp(root, name)
        args = _mergekit_args(cfg_path, tmp, spec["random_seed"])
        log_path = root / "logs" / f"{name}.log"
        log_path.write_text(f"HF_HUB_OFFLINE=1 mergekit-yaml {' '.join(args)}\n"
                            f"# (output then renamed to models/{name})\n\n")
        jobs.append({"name": name, "args": args, "log": str(log_path), "tmp": tmp, "yaml": text,
                     "cfg_path": cfg_path, "spec": spec})
    shares = [jobs[i::len(workers)] for i in range(len(workers))]
    for proc, share in zip(workers, shares, strict=True):
        payload = [{k: job[k] for k in ("name", "args", "log")} for job in share]
        proc.stdin.write(json.dumps(payload))
        proc.stdin.close()
    status: dict[str, dict[str, Any]] = {}
    for i, proc in enumerate(workers):
        out = proc.stdout.read()
        proc.wait()
        for line in out.splitlines():
            if line.startswith("@@"):
                st = json.loads(line[2:])
                status[st["name"]] = st
        if proc.returncode != 0:
            log.warning("mergekit worker %d exited %d (see %s)", i, proc.returncode, root / "logs")
    per_job = (time.perf_counter() - t0) / max(1, len(jobs)) * len(workers)

    metas: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for job in jobs:
        name, tmp = job["name"], job["tmp"]
        st = status.get(name, {"ok": False, "error": "worker died before reporting"})
        if not st["ok"] or not list(tmp.glob("*.safetensors")):
            shutil.rmtree(tmp, ignore_errors=True)
            lines = Path(job["log"]).read_text().strip().splitlines()
            failures.append(f"{name}: {st['error']} (log {job['log']}):\n  " + "\n  ".join(lines[-4:]))
            continue
        try:
            metas[name] = _finish_merge(root, job["spec"], hashes[name], tmp, job["yaml"], job["cfg_path"],
                                        round(per_job, 2))
        except Exception as exc:  # collect every failure before raising
            failures.append(f"{name}: {exc}")
    if failures:
        raise RuntimeError("mergekit failed for:\n" + "\n".join(failures))
    return metas


def _finish_merge(root: Path, spec: dict[str, Any], spec_hash: str, tmp: Path, text: str, cfg_path: Path,
                  seconds: float) -> dict[str, Any]:
    name = spec["name"]
    meta = _common_meta(spec, spec_hash, tmp)
    meta.update({"mergekit_yaml": text, "config_path": str(cfg_path), "random_seed": spec["random_seed"]})
    if spec["kind"] == "stack":
        layer_map = []
        for m, a, b in spec["slices"]:
            for j in range(a, b):
                layer_map.append({"layer": len(layer_map), "parent": m, "parent_layer": j})
        first, last = spec["slices"][0][0], spec["slices"][-1][0]
        other = {k: (first if "embed_tokens" in k else last) for k in meta["tensors"] if ".layers." not in k}
        meta.update({"layer_map": layer_map, "other_tensors": other})
        if meta["num_layers"] != len(layer_map):
            raise RuntimeError(f"{name}: config has {meta['num_layers']} layers, expected {len(layer_map)}")
    else:
        meta.update({
            "method": spec["method"],
            "base": spec["base"],
            "parameters": {m: copy.deepcopy(p) for m, p in spec["models"]},
            "global_parameters": copy.deepcopy(spec["global_parameters"]),
            **_merge_truth(spec),
        })
    meta["build_seconds"] = seconds  # mean wall time per merge in this batch
    return _finish(root / "models" / name, tmp, meta)


if __name__ == "__main__":  # python tests/corpus.py ROOT [N_INDEPENDENT]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t = time.perf_counter()
    c = build_corpus(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:3]))
    print(f"{len(c.models)} models in {c.root} ({time.perf_counter() - t:.1f}s)")
