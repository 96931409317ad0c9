"""Sanity checks of the test corpus: complete manifest, loadable files, and recipes that match the manifest."""

from __future__ import annotations

import functools
import json
import re
import struct
from pathlib import Path

import ml_dtypes  # noqa: F401  (lets safetensors' numpy framework return bfloat16)
import numpy as np
import pytest
import yaml
from safetensors import safe_open

try:
    import corpus as corpus_lib
except ImportError:  # tests/ imported as a package
    from tests import corpus as corpus_lib

BF16_U = 2.0**-8  # bf16 unit roundoff: round-to-nearest error <= u * |x|
COMMON_KEYS = {"name", "path", "relpath", "kind", "family", "model_type", "num_layers", "parents", "tensors",
               "expert_layout", "build_seconds"}
KIND_KEYS = {
    "base": {"seed", "train"},
    "independent": {"seed", "train"},
    "finetune": {"parent", "steps", "train", "delta_rel_norm"},
    "merge": {"method", "base", "parameters", "global_parameters", "mergekit_yaml", "config_path", "random_seed",
              "layer_values", "coefficients", "coefficients_by_layer"},
    "stack": {"layer_map", "other_tensors", "mergekit_yaml", "config_path"},
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@functools.cache
def _load(path: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with safe_open(path, framework="np") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k).astype(np.float64)
    return out


def tensors(c, name: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for fn in c.weights(name):
        out.update(_load(str(fn)))
    return out


def fused(ts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert MoE keys (qwen3_moe `mlp.experts.N.gate_proj`, mixtral `block_sparse_moe.experts.N.w1`) in
    mergekit's fused layout: `mlp.experts.gate_up_proj[E, 2I, H]` = concat(gate, up) on dim 1, `down_proj[E, H, I]`."""
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    pat = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
    role = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
    for k, v in ts.items():
        m = pat.match(k)
        if m:
            experts.setdefault((m[1], role[m[3]]), {})[int(m[2])] = v
        else:
            out[k.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = v
    for prefix in sorted({p for p, _ in experts}):
        n = len(experts[(prefix, "gate")])
        gate, up, down = (experts[(prefix, r)] for r in ("gate", "up", "down"))
        out[f"{prefix}.mlp.experts.gate_up_proj"] = np.stack([np.concatenate([gate[e], up[e]], 0) for e in range(n)])
        out[f"{prefix}.mlp.experts.down_proj"] = np.stack([down[e] for e in range(n)])
    return out


def comparable(c, name: str, layout: str | None) -> dict[str, np.ndarray]:
    ts = tensors(c, name)
    return fused(ts) if layout == "fused" and c[name]["expert_layout"] == "per_expert" else ts


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def assert_bf16_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """`got` is `want` rounded to bf16 (up to fp32 arithmetic)."""
    bound = BF16_U * np.abs(want) * 1.01 + 1e-7
    bad = np.abs(got - want) > bound
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} elements off by more than bf16 rounding " \
                          f"(max {np.abs(got - want).max():.3g}, rel norm {rel_err(got, want):.3g})"


def _coeffs_for(entry: dict, tensor: str) -> dict[str, float]:
    m = _LAYER.search(tensor)
    if m and entry["coefficients_by_layer"]:
        return entry["coefficients_by_layer"][int(m[1])]
    return entry["coefficients"]


def _slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = float(np.clip(np.vdot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


# ---------------------------------------------------------------------------------------------------------- tests


def test_manifest_complete(corpus):
    assert list(corpus.models) == corpus_lib.model_names()
    on_disk = json.loads((corpus.root / "manifest.json").read_text())
    assert on_disk["fingerprint"] == corpus.manifest["fingerprint"]
    for name, e in corpus.models.items():
        missing = (COMMON_KEYS | KIND_KEYS[e["kind"]]) - set(e)
        assert not missing, f"{name} lacks {missing}"
        assert corpus.path(name).is_dir() and str(corpus.path(name)) == e["path"]
        assert (corpus.path(name) / "config.json").is_file() and corpus.weights(name)
        assert all(p in corpus.models for p in e["parents"]), name
        assert e["num_layers"] == json.loads((corpus.path(name) / "config.json").read_text())["num_hidden_layers"]
        if e["kind"] in ("merge", "stack"):
            assert (corpus.root / "configs" / f"{name}.yml").read_text() == e["mergekit_yaml"]
            doc = yaml.safe_load(e["mergekit_yaml"])
            refs = [m["model"] for m in doc.get("models", [])] + [doc.get("base_model")]
            refs += [src["model"] for sl in doc.get("slices", []) for src in sl["sources"]]
            assert {str(corpus.path(p)) for p in e["parents"]} == set(refs) - {None}, name
    kinds = {e["kind"] for e in corpus.models.values()}
    assert kinds == {"base", "independent", "finetune", "merge", "stack"}
    methods = {e["method"] for e in corpus.models.values() if e["kind"] == "merge"}
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "della",
            "model_stock"} <= methods


def test_files_load_as_bf16_with_recorded_names(corpus):
    for name, e in corpus.models.items():
        names = []
        for fn in corpus.weights(name):
            with open(fn, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            assert {v["dtype"] for v in header.values()} == {"BF16"}, name
            with safe_open(str(fn), framework="np") as f:
                names += list(f.keys())
        assert sorted(names) == e["tensors"], name
        assert e["expert_layout"] == corpus_lib.expert_layout(names)
        if e["family"] == "dense":
            assert e["expert_layout"] is None
        else:
            assert e["expert_layout"] == ("fused" if e["kind"] == "merge" else "per_expert"), name


def test_merges_have_their_parents_tensor_names(corpus):
    for name in corpus.names(kind="merge"):
        e = corpus[name]
        for p in e["parents"]:
            assert set(comparable(corpus, p, e["expert_layout"])) == set(e["tensors"]), (name, p)


def test_stacks_copy_the_mapped_layers(corpus):
    for name in corpus.names(kind="stack"):
        e = corpus[name]
        assert e["num_layers"] == len(e["layer_map"]) == 1 + max(int(_LAYER.search(t)[1])
                                                                 for t in e["tensors"] if _LAYER.search(t))
        got = tensors(corpus, name)
        for row in e["layer_map"]:
            src = tensors(corpus, row["parent"])
            for k, v in got.items():
                if f".layers.{row['layer']}." in k:
                    want = src[k.replace(f".layers.{row['layer']}.", f".layers.{row['parent_layer']}.")]
                    assert np.array_equal(v, want), (name, k, row)
        for k, parent in e["other_tensors"].items():
            assert np.array_equal(got[k], tensors(corpus, parent)[k]), (name, k, parent)
    assert corpus["s_stack_deep"]["num_layers"] == 6  # llama's depth can change (unlike qwen2/qwen3)


def test_linear_recipes_match_manifest(corpus):
    checked = 0
    for name in corpus.names(kind="merge"):
        e = corpus[name]
        if e["coefficients"] is None:
            continue
        got = tensors(corpus, name)
        parents = {p: comparable(corpus, p, e["expert_layout"]) for p in e["coefficients"]}
        for k, v in got.items():
            want = sum(c * parents[p][k] for p, c in _coeffs_for(e, k).items())
            assert_bf16_close(v, want, f"{name}/{k}")
        checked += 1
    assert checked >= 7


def test_rio_merge_is_0_6_a_plus_0_4_b_and_not_the_swap(corpus):
    """The headline case, computed with numpy on a few tensors, plus a negative control."""
    e = corpus["m_linear_rio"]
    assert e["parameters"] == {"ft_a1": {"weight": 0.6}, "ft_a2": {"weight": 0.4}}
    m, a, b = (tensors(corpus, n) for n in ("m_linear_rio", "ft_a1", "ft_a2"))
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight"):
        assert_bf16_close(m[k], 0.6 * a[k] + 0.4 * b[k], k)
        assert rel_err(m[k], 0.6 * a[k] + 0.4 * b[k]) < 0.003
        assert rel_err(m[k], 0.4 * a[k] + 0.6 * b[k]) > 0.01


def test_moe_fused_layout_is_concat_gate_up(corpus):
    for merge, (p1, p2) in {"moe_linear": ("moe_ft1", "moe_ft2"), "mix_linear": ("mix_ft1", "mix_ft2")}.items():
        m, a, b = tensors(corpus, merge), tensors(corpus, p1), tensors(corpus, p2)
        gate, up, down = (("mlp.experts.2.gate_proj", "mlp.experts.2.up_proj", "mlp.experts.2.down_proj")
                          if merge.startswith("moe") else
                          ("block_sparse_moe.experts.2.w1", "block_sparse_moe.experts.2.w3",
                           "block_sparse_moe.experts.2.w2"))
        pre = "model.layers.1."
        want_gu = np.concatenate([0.6 * a[pre + gate + ".weight"] + 0.4 * b[pre + gate + ".weight"],
                                  0.6 * a[pre + up + ".weight"] + 0.4 * b[pre + up + ".weight"]], 0)
        assert_bf16_close(m[pre + "mlp.experts.gate_up_proj"][2], want_gu, merge)
        assert_bf16_close(m[pre + "mlp.experts.down_proj"][2],
                          0.6 * a[pre + down + ".weight"] + 0.4 * b[pre + down + ".weight"], merge)


def test_slerp_recipes_match_manifest(corpus):
    for name in ("m_slerp_t03", "m_slerp_grad", "m_slerp_indep"):
        e = corpus[name]
        other = next(p for p in e["parents"] if p != e["base"])
        got, a, b = tensors(corpus, name), tensors(corpus, e["base"]), tensors(corpus, other)
        t_spec = e["global_parameters"]["t"]
        for k, v in got.items():
            t = t_spec
            if e["layer_values"]:
                lm = _LAYER.search(k)
                t = e["layer_values"]["t"]["layers"][int(lm[1])] if lm else e["layer_values"]["t"]["non_layer"]
            assert_bf16_close(v, _slerp(t, a[k], b[k]), f"{name}/{k}")
    grad = corpus["m_slerp_grad"]["layer_values"]["t"]
    assert grad["layers"] == pytest.approx([0, 1 / 3, 2 / 3, 1]) and grad["non_layer"] == 0


def test_sparse_merges_leave_base_entries_untouched(corpus):
    """TIES/DARE trim deltas: many entries equal the base exactly; plain task arithmetic leaves almost none."""
    base = tensors(corpus, "base_a")

    def untouched(name: str) -> float:
        got = tensors(corpus, name)
        same = [np.mean(got[k] == base[k]) for k in got if got[k].ndim == 2]
        return float(np.mean(same))

    assert untouched("m_task_arith") < 0.05
    assert untouched("m_ties_d03") > 0.3
    assert untouched("m_dare_ties") > 0.15
    assert untouched("m_dare_linear") > 0.05


def test_finetunes_are_real_training(corpus):
    for name in corpus.names(kind="finetune"):
        e = corpus[name]
        assert e["train"]["loss_after"] < e["train"]["loss_before"] - 0.5, name
        d = e["delta_rel_norm"]
        assert d["median"] > 0.01 and d["min"] > 0, (name, d)
        child, parent = tensors(corpus, name), tensors(corpus, e["parent"])
        k = "model.layers.0.self_attn.q_proj.weight"
        assert rel_err(child[k], parent[k]) == pytest.approx(d["per_tensor"][k], rel=1e-3)
    for name in corpus.names(kind="base") + corpus.names(kind="independent"):
        e = corpus[name]
        assert e["train"] is None or e["train"]["loss_after"] < e["train"]["loss_before"], name
    assert sum(corpus[n]["train"] is not None for n in corpus.names(kind="independent")) >= 3


def _cos(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.vdot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_siblings_close_and_independents_unrelated(corpus):
    a1, a2, ba, bb = (tensors(corpus, n) for n in ("ft_a1", "ft_a2", "base_a", "base_b"))
    mats = [k for k in a1 if a1[k].ndim == 2]
    assert min(_cos(a1[k], a2[k]) for k in mats) > 0.9
    assert max(abs(_cos(ba[k], bb[k])) for k in mats) < 0.1


def test_rebuild_is_a_noop(corpus):
    files = {p: p.stat().st_mtime_ns for p in Path(corpus.root).rglob("*") if p.is_file()}
    again = corpus_lib.build_corpus(corpus.root)
    assert again.manifest["fingerprint"] == corpus.manifest["fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rebuilt or rewritten
