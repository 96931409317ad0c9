"""A family-tree test collection: the test corpus (tests/corpus.py, unchanged) plus ~110 models made here with the
same real tools at tiny scale, with the true tree recorded.

`build_collection(corpus)` writes under `corpus.root / "tree"` (its own lock, manifest and `models/`; the corpus's
models are reached through symlinks in `models/`, never rewritten):

- new roots per architecture (llama-shaped dense: `t_base_c` .. `t_base_j`; qwen3_moe `t_moe2_base`; mixtral
  `t_mix2_base`) pretrained briefly as corpus.py does, and independent inits `t_ind_NN`;
- fine-tunes by a few AdamW steps on CPU: siblings, chains of depth 3 and 4 (`t_c1 -> t_c1a -> t_c1a1 -> t_c1a1x`),
  fine-tunes of corpus models (`t_a1_1`, `t_moe_ft1a`) and of merges (`t_mc_lin_ft`, a merge then fine-tuned, and
  its own child);
- mergekit merges in two waves: merges of fine-tunes (linear, task arithmetic, TIES, SLERP, DARE), then merges of
  merges (`t_mm_c`, `t_mm_rio_b1`, `t_mm_cd` across families) and a passthrough stack;
- re-encoded copies (bf16 -> fp16 / fp32 safetensors with numpy and ml_dtypes) and GGUF copies (Q8_0, F16; written
  with `gguf` as llama.cpp's converter would, tests/disguise.py).

Manifest (`manifest.json`): {"version", "fingerprint", "models": {name: entry}} where every model of the corpus and
of the extension has `name`, `path` (a folder, or a .gguf file), `kind` (base | independent | finetune | merge |
stack | recast | quantized), `arch` (dense | qwen3_moe | mixtral), `parents` (direct parents; a merge's base
included), and for merges `method`, `base`, `parameters`, `coefficients` / `coefficients_by_layer` /
`layer_values` as in the corpus manifest; copies have `dtype` ("F16", "F32", "GGUF Q8_0", "GGUF F16").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

try:
    import corpus as C
except ImportError:  # tests/ imported as a package
    from tests import corpus as C

log = logging.getLogger("modeltrace.tests.tree_collection")

VERSION = 1
FT = {"steps": 20, "lr": 3e-4}
MOE_FT = {"steps": 15, "lr": 4e-4}
PRE = {"steps": 40, "lr": 3e-3}


def _ft(name: str, parent: str, data: int, arch: str = "dense") -> dict[str, Any]:
    t = FT if arch == "dense" else MOE_FT
    return {"name": name, "kind": "finetune", "family": arch, "parent": parent, "train": {**t, "data_seed": data}}


def _root(name: str, seed: int, arch: str = "dense", train: bool = True) -> dict[str, Any]:
    kind = "base" if train else "independent"
    return {"name": name, "kind": kind, "family": arch, "seed": seed,
            "train": {**PRE, "data_seed": seed} if train else None}


def _merge(name: str, method: str, models: list, base: str | None = None, params: dict | None = None,
           arch: str = "dense") -> dict[str, Any]:
    return {"name": name, "kind": "merge", "family": arch, "method": method, "base": base, "models": models,
            "global_parameters": params or {}, "random_seed": C.MERGE_SEED}


def _copy(name: str, source: str, dtype: str) -> dict[str, Any]:
    return {"name": name, "kind": "quantized" if dtype.startswith("GGUF Q") else "recast", "source": source,
            "dtype": dtype}


def stages() -> list[list[dict[str, Any]]]:
    """Build stages in order: trained models, merges, trained children of merges, merges of merges, copies."""
    s1: list[dict[str, Any]] = []
    # family C: siblings, a chain of depth 4, a sibling inside the chain
    s1 += [_root("t_base_c", 3), _ft("t_c1", "t_base_c", 31), _ft("t_c2", "t_base_c", 32),
           _ft("t_c3", "t_base_c", 33), _ft("t_c1a", "t_c1", 311), _ft("t_c1b", "t_c1", 312),
           _ft("t_c1a1", "t_c1a", 3111), _ft("t_c1a1x", "t_c1a1", 31111), _ft("t_c2a", "t_c2", 321)]
    # family D
    s1 += [_root("t_base_d", 4), _ft("t_d1", "t_base_d", 41), _ft("t_d2", "t_base_d", 42),
           _ft("t_d3", "t_base_d", 43), _ft("t_d1a", "t_d1", 411), _ft("t_d1a1", "t_d1a", 4111),
           _ft("t_d1a1a", "t_d1a1", 41111), _ft("t_d2a", "t_d2", 421), _ft("t_d2b", "t_d2", 422)]
    # small families E..H: a root and two children; I, J: a chain of depth 3 and a sibling
    for i, f in enumerate("efgh"):
        s1 += [_root(f"t_base_{f}", 5 + i), _ft(f"t_{f}1", f"t_base_{f}", 50 + 10 * i),
               _ft(f"t_{f}2", f"t_base_{f}", 51 + 10 * i)]
    for i, f in enumerate("ij"):
        s1 += [_root(f"t_base_{f}", 9 + i), _ft(f"t_{f}1", f"t_base_{f}", 90 + 10 * i),
               _ft(f"t_{f}1a", f"t_{f}1", 91 + 10 * i), _ft(f"t_{f}1a1", f"t_{f}1a", 92 + 10 * i),
               _ft(f"t_{f}2", f"t_base_{f}", 93 + 10 * i)]
    # corpus family A: deeper chains
    s1 += [_ft("t_a1_1", "ft_a1", 111), _ft("t_a1_1_1", "t_a1_1", 1111), _ft("t_a2_1", "ft_a2", 121)]
    # independents (every third trained a little)
    s1 += [_root(f"t_ind_{i:02d}", 200 + i, train=i % 3 == 2) for i in range(12)]
    # MoE: chains on the corpus roots, and a second root per architecture
    s1 += [_ft("t_moe_ft1a", "moe_ft1", 711, "qwen3_moe"), _ft("t_moe_ft1a1", "t_moe_ft1a", 7111, "qwen3_moe"),
           _ft("t_moe_ft3", "moe_base", 73, "qwen3_moe"), _root("t_moe2_base", 17, "qwen3_moe"),
           _ft("t_moe2_ft1", "t_moe2_base", 171, "qwen3_moe"), _ft("t_moe2_ft2", "t_moe2_base", 172, "qwen3_moe"),
           _ft("t_mix_ft1a", "mix_ft1", 811, "mixtral"), _root("t_mix2_base", 18, "mixtral"),
           _ft("t_mix2_ft1", "t_mix2_base", 181, "mixtral"), _ft("t_mix2_ft2", "t_mix2_base", 182, "mixtral")]
    m1 = [
        _merge("t_mc_lin", "linear", [("t_c2", {"weight": 0.6}), ("t_c3", {"weight": 0.4})]),
        _merge("t_mc_ta", "task_arithmetic", [("t_c1b", {"weight": 0.5}), ("t_c2a", {"weight": 0.7})],
               base="t_base_c"),
        _merge("t_mc_ties", "ties", [("t_c1a", {"weight": 0.5, "density": 0.5}),
                                     ("t_c3", {"weight": 0.5, "density": 0.5})], base="t_base_c"),
        _merge("t_md_slerp", "slerp", [("t_d2a", {}), ("t_d2b", {})], base="t_d2a", params={"t": 0.4}),
        _merge("t_md_dare", "dare_linear", [("t_d1", {"weight": 0.6, "density": 0.7}),
                                            ("t_d3", {"weight": 0.4, "density": 0.7})], base="t_base_d"),
        _merge("t_me_lin", "linear", [("t_e1", {"weight": 0.3}), ("t_e2", {"weight": 0.7})]),
        {"name": "t_s_cd", "kind": "stack", "family": "dense", "slices": [("t_c1", 0, 2), ("t_d1", 2, 4)],
         "random_seed": C.MERGE_SEED},
    ]
    s2 = [_ft("t_mc_lin_ft", "t_mc_lin", 3001), _ft("t_mc_lin_ft2", "t_mc_lin_ft", 3002),
          _ft("t_rio_ft", "m_linear_rio", 1001), _ft("t_md_dare_ft", "t_md_dare", 4001)]
    m2 = [
        _merge("t_mm_c", "linear", [("t_mc_lin", {"weight": 0.5}), ("t_c1a", {"weight": 0.5})]),
        _merge("t_mm_rio_b1", "linear", [("m_linear_rio", {"weight": 0.7}), ("ft_b1", {"weight": 0.3})]),
        _merge("t_mm_cd", "linear", [("t_mc_lin_ft", {"weight": 0.4}), ("t_md_slerp", {"weight": 0.6})]),
    ]
    copies = [_copy("t_base_a_f16", "base_a", "F16"), _copy("t_base_a_q8", "base_a", "GGUF Q8_0"),
              _copy("t_ft_a1_q8", "ft_a1", "GGUF Q8_0"), _copy("t_rio_f16", "m_linear_rio", "F16"),
              _copy("t_ft_b1_f32", "ft_b1", "F32"), _copy("t_ta_q8", "m_task_arith", "GGUF Q8_0"),
              _copy("t_c1_f16", "t_c1", "F16"), _copy("t_c1a_q8", "t_c1a", "GGUF Q8_0"),
              _copy("t_base_c_f32", "t_base_c", "F32"), _copy("t_mc_lin_q8", "t_mc_lin", "GGUF Q8_0"),
              _copy("t_c2_gf16", "t_c2", "GGUF F16"), _copy("t_c1a1_f16", "t_c1a1", "F16"),
              _copy("t_d1_f16", "t_d1", "F16"), _copy("t_d1a1_q8", "t_d1a1", "GGUF Q8_0"),
              _copy("t_md_slerp_f16", "t_md_slerp", "F16"), _copy("t_base_d_q8", "t_base_d", "GGUF Q8_0"),
              _copy("t_d2_f32", "t_d2", "F32"), _copy("t_mm_c_f16", "t_mm_c", "F16"),
              _copy("t_moe_ft1_f16", "moe_ft1", "F16"), _copy("t_mix2_ft1_f16", "t_mix2_ft1", "F16"),
              _copy("t_moe2_base_f32", "t_moe2_base", "F32")]
    copies += [_copy(f"t_{f}1_f16", f"t_{f}1", "F16") for f in "efghij"]
    copies += [_copy(f"t_{f}2_q8", f"t_{f}2", "GGUF Q8_0") for f in "efgh"]
    return [s1, m1, s2, m2, copies]


def _parents(spec: dict[str, Any]) -> list[str]:
    if spec["kind"] in ("recast", "quantized"):
        return [spec["source"]]
    return C._parents(spec)


def _fingerprint(corpus: C.Corpus) -> str:
    payload = {"version": VERSION, "corpus": corpus.manifest["fingerprint"], "stages": stages()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def build_collection(corpus: C.Corpus) -> dict[str, Any]:
    """Build (or reuse) the extension under corpus.root / "tree"; return the combined manifest (corpus + extension)."""
    root = corpus.root / "tree"
    root.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(corpus)
    got = _load(root, fp)
    if got is not None:
        return got
    with C._locked(root / ".build.lock"):
        got = _load(root, fp)
        if got is not None:
            return got
        _build(root, corpus, fp)
        got = _load(root, fp)
        assert got is not None
        return got


def _load(root: Path, fp: str) -> dict[str, Any] | None:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if m.get("fingerprint") != fp or not all(Path(e["path"]).exists() for e in m["models"].values()):
        return None
    return m


def _build(root: Path, corpus: C.Corpus, fp: str) -> None:
    t0 = time.perf_counter()
    models = root / "models"
    if models.exists():
        shutil.rmtree(models)
    for sub in ("models", "configs", "logs"):
        (root / sub).mkdir(exist_ok=True)
    for name in corpus.names():  # the corpus's models, reached by name from mergekit configs and training
        os.symlink(corpus.path(name), models / name)
    s1, m1, s2, m2, copies = stages()
    metas: dict[str, dict[str, Any]] = {}
    workers = C._start_merge_workers(root, 1)  # imports mergekit while we train
    try:
        with C._torch_session():
            for spec in s1:
                metas[spec["name"]] = C._build_trained(root, spec, "tree")
        metas.update(C._run_merges(root, m1, {s["name"]: "tree" for s in m1}, workers))
        workers = C._start_merge_workers(root, 1)
        with C._torch_session():
            for spec in s2:
                metas[spec["name"]] = C._build_trained(root, spec, "tree")
        metas.update(C._run_merges(root, m2, {s["name"]: "tree" for s in m2}, workers))
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for spec in copies:
        metas[spec["name"]] = _make_copy(models, spec)
    out: dict[str, dict[str, Any]] = {}
    for name, e in corpus.models.items():
        out[name] = {**_truth(e), "path": str(corpus.path(name)), "source": "corpus"}
    for spec in [*s1, *m1, *s2, *m2, *copies]:
        e = metas[spec["name"]]
        e.setdefault("kind", spec["kind"])
        e["parents"] = _parents(spec)
        e["family"] = spec.get("family") or out.get(spec.get("source", ""), {}).get("arch") \
            or metas.get(spec.get("source", ""), {}).get("family")
        out[spec["name"]] = {**_truth(e), "path": e.get("path") or str(models / spec["name"]), "source": "tree"}
    manifest = {"version": VERSION, "fingerprint": fp, "build_seconds": round(time.perf_counter() - t0, 1),
                "models": out}
    tmp = root / f"manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / "manifest.json")
    log.info("tree collection: %d models (%d new) in %.1fs", len(out), len(out) - len(corpus.models),
             time.perf_counter() - t0)


def _truth(e: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "kind", "parents", "method", "base", "parameters", "global_parameters", "coefficients",
            "coefficients_by_layer", "layer_values", "layer_map", "dtype")
    out = {k: e[k] for k in keep if k in e}
    out["arch"] = e.get("family")
    return out


def _make_copy(models: Path, spec: dict[str, Any]) -> dict[str, Any]:
    try:
        import disguise as D
    except ImportError:
        from tests import disguise as D

    src = D.load(models / spec["source"])
    out = models / spec["name"]
    if spec["dtype"].startswith("GGUF"):
        out.mkdir(parents=True, exist_ok=True)
        path = D.write_gguf(src, out / "model.gguf", spec["dtype"].split()[1])
    else:
        path = D.save(src, out, spec["dtype"])
    return {"name": spec["name"], "kind": spec["kind"], "dtype": spec["dtype"], "path": str(path)}


if __name__ == "__main__":  # python tests/tree_collection.py CORPUS_ROOT
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    m = build_collection(C.build_corpus(Path(sys.argv[1])))
    print(f"{len(m['models'])} models")
