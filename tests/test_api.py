"""The public API (modeltrace/api.py, docs/api.md): the package facade, frozen typed results, options, one schema
version, and merge methods as registered objects (a toy method from one module is summarised, exported and replayed).
The examples in docs/api.md run in tests/test_api_docs.py."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pydantic
import pytest

import modeltrace
from modeltrace.errors import InputError


def test_all_lists_exactly_the_public_names():
    from modeltrace import _EXPORTS

    assert sorted(modeltrace.__all__) == sorted(_EXPORTS)
    for name in modeltrace.__all__:
        assert getattr(modeltrace, name) is not None
    with pytest.raises(AttributeError):
        modeltrace.run_audit  # noqa: B018 - internal names are not reachable from the package


def test_import_modeltrace_imports_nothing_else():
    code = ("import sys, modeltrace; mods = [m for m in sys.modules if m.startswith('modeltrace')]; "
            "heavy = [m for m in ('numpy', 'scipy', 'pydantic', 'typer', 'rich') if m in sys.modules]; "
            "print(sorted(mods), heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['modeltrace'] []"


def test_functions_survive_their_namesake_submodules():
    """modeltrace/audit.py and identify.py are modules; the package keeps the functions of those names."""
    importlib.import_module("modeltrace.audit")
    importlib.import_module("modeltrace.identify")
    from modeltrace.api import audit, identify

    assert modeltrace.audit is audit and modeltrace.identify is identify
    from modeltrace.audit import run_audit  # the module is still reachable by its full name

    assert callable(run_audit)


def test_options_are_frozen_and_checked():
    from modeltrace.audit import DEFAULT_AUDIT_CHUNK
    from modeltrace.options import DEFAULT_AUDIT_CHUNK as OPTIONS_CHUNK

    assert OPTIONS_CHUNK == DEFAULT_AUDIT_CHUNK
    o = modeltrace.AuditOptions(sample=0.1, budget="4G")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.sample = 0.2  # type: ignore[misc]
    assert o.budget_bytes() == 4 * 10**9 and modeltrace.AuditOptions(budget=123).budget_bytes() == 123
    with pytest.raises(InputError):
        modeltrace.AuditOptions(workers=0)
    with pytest.raises(InputError):
        modeltrace.AuditOptions(address="auto")  # an address without ray
    with pytest.raises(InputError):
        modeltrace.AuditOptions(budget="lots").budget_bytes()


def test_remote_limits_hold_for_one_call(monkeypatch: pytest.MonkeyPatch):
    import os

    from modeltrace.options import remote_limits

    monkeypatch.delenv("MODELTRACE_TIMEOUT", raising=False)
    with remote_limits(modeltrace.ReadOptions(timeout=5, connections=3)):
        assert os.environ["MODELTRACE_TIMEOUT"] == "5.0" and os.environ["MODELTRACE_CONNECTIONS"] == "3"
    assert "MODELTRACE_TIMEOUT" not in os.environ


def test_audit_result_is_typed_and_frozen(corpus):
    m = corpus.root / "models"
    r = modeltrace.audit(m / "m_linear_rio", [m / "ft_a1", m / "ft_a2"], options=modeltrace.AuditOptions(verify=True))
    assert isinstance(r, modeltrace.AuditResult) and isinstance(r.verdict, modeltrace.Verdict)
    assert r.relation in modeltrace.RELATIONS and r.relation == "merge"
    weights = {p.model: p.weight for p in r.parents}
    assert weights == pytest.approx({"ft_a1": 0.6, "ft_a2": 0.4}, abs=0.01)
    assert all(p.interval[0] <= p.weight <= p.interval[1] for p in r.parents)
    assert r.recipe is not None and "merge_method: linear" in r.recipe.yaml
    assert r.replay is not None and r.replay.replayed and r.replay.max_rel_error < 0.01
    assert r.layers and all(isinstance(row, modeltrace.LayerRow) for row in r.layers)
    with pytest.raises(pydantic.ValidationError):
        r.verdict.relation = "independent"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        r.parents[0].weight = 1.0  # type: ignore[misc]
    doc = r.document()
    assert doc["schema_version"] == modeltrace.SCHEMA_VERSION and doc["mergekit_yaml"] == r.recipe.yaml
    assert doc["verify"]["replayed"] is True
    assert r.report.subjects[0].audit is r.verdict


def test_bad_input_is_one_input_error(corpus, tmp_path):
    m = corpus.root / "models"
    with pytest.raises(InputError, match="at least one --candidate"):
        modeltrace.audit(m / "m_linear_rio", [])
    with pytest.raises(InputError):
        modeltrace.inspect(tmp_path / "missing")
    with pytest.raises(InputError, match="sample"):
        modeltrace.audit(m / "m_linear_rio", [m / "ft_a1"], options=modeltrace.AuditOptions(sample=2.0))


def test_one_schema_version_and_old_ones_read():
    from modeltrace.describe import SCHEMA_VERSION as DESCRIBE
    from modeltrace.identify import SCHEMA_VERSION as IDENTIFY
    from modeltrace.report.model import SCHEMA_VERSION as REPORT
    from modeltrace.schema import readable
    from modeltrace.verdict import SCHEMA_VERSION as VERDICT

    assert DESCRIBE == IDENTIFY == REPORT == VERDICT == modeltrace.SCHEMA_VERSION == "1.0"
    assert readable("1") and readable("1.0") and readable("1.7")
    assert not readable("2.0") and not readable("x")


def test_relation_is_a_closed_set():
    with pytest.raises(pydantic.ValidationError):
        modeltrace.Verdict(suspect="s", relation="cousin")


# ---- merge methods as objects ---------------------------------------------------------------------------------
def test_builtin_methods_know_their_papers():
    methods = modeltrace.merge_methods()
    assert {"linear", "task_arithmetic", "slerp", "model_stock", "ties", "dare_linear", "dare_ties", "breadcrumbs",
            "della", "passthrough"} <= set(methods)
    assert "2306.01708" in methods["ties"].paper and methods["slerp"].family == "spherical"
    assert methods["ties"].needs_base and not methods["linear"].needs_base
    from modeltrace.detectors.registry import METHODS

    assert METHODS["linear"] is methods["linear"] and "2502.12292" in METHODS["match_test"].paper


@pytest.fixture
def toy():
    from modeltrace.methods import unregister_method

    sys.modules.pop("tests.toy_method", None)
    module = importlib.import_module("tests.toy_method")
    yield module.TOY
    unregister_method("toy_mean")


def _toy_verdict(corpus) -> dict:
    m = corpus.root / "models"
    return {"suspect": "m_linear_cross", "relation": "merge", "method": "toy_mean", "base": None,
            "suspect_dtype": "BF16", "layers": [],
            "parents": [{"model": "ft_a1", "weight": 0.5, "interval": [0.49, 0.51]},
                        {"model": "ft_b1", "weight": 0.5, "interval": [0.49, 0.51]}],
            "parameters": {"r2_min": 0.99}, "sources": {n: str(m / n) for n in ("m_linear_cross", "ft_a1", "ft_b1")}}


def test_a_toy_method_from_one_module_is_summarised_exported_and_replayed(toy, corpus):
    from modeltrace.recipe import replay, to_mergekit, to_yaml
    from modeltrace.verdict import _info, _merge_summary

    assert modeltrace.merge_methods()["toy_mean"] is toy
    v = _toy_verdict(corpus)
    text = _merge_summary(v, "m_linear_cross", [], 4, {1: -400.0, 2: -300.0}, {0: "m_linear_cross", 1: "ft_a1",
                                                                                2: "ft_b1"})
    assert text.startswith("m_linear_cross is the plain mean of ft_a1 and ft_b1")
    assert _info("toy_mean") == {"description": toy.description, "paper": toy.paper}
    cfg = to_mergekit(v, v["sources"])
    assert cfg is not None and cfg["merge_method"] == "toy_mean" and cfg["parameters"] == {"toy_scale": 1.0}
    assert [x["model"] for x in cfg["models"]] == [v["sources"]["ft_a1"], v["sources"]["ft_b1"]]
    assert "merge_method: toy_mean" in to_yaml(cfg) and "weight" not in to_yaml(cfg)
    got = replay(v, v["sources"], cfg)  # m_linear_cross is 0.5 ft_a1 + 0.5 ft_b1, stored in bf16
    assert got["replayed"] and got["tensors"] > 10 and got["max_rel_error"] < 0.01


def test_a_toy_method_from_one_module_is_fitted_by_the_audit(toy, corpus):
    """Registered from one module, the method is asked by fit_slot, named by the verdict, exported and replayed."""
    m = corpus.root / "models"
    res = modeltrace.audit(m / "m_linear_cross", [m / "ft_a1", m / "ft_b1"],
                           options=modeltrace.AuditOptions(verify=True))
    assert res.relation == "merge" and res.verdict.method == "toy_mean"
    assert res.verdict.summary.startswith("m_linear_cross is the plain mean of ft_a1 and ft_b1")
    assert res.recipe is not None and "merge_method: toy_mean" in res.recipe.yaml
    assert res.replay is not None and res.replay.replayed and res.replay.max_rel_error < 0.01
    a, b = (p.weight for p in res.verdict.parents)
    assert a == b == 0.5
    # a 0.6/0.4 merge is not its recipe: the linear method still names it
    other = modeltrace.audit(m / "m_linear_rio", [m / "ft_a1", m / "ft_a2"])
    assert other.relation == "merge" and other.verdict.method == "linear"


def test_a_wrong_recipe_replays_badly(toy, corpus):
    """The replay measures: the toy mean of the wrong parents does not reproduce the suspect."""
    from modeltrace.recipe import replay, to_mergekit

    v = _toy_verdict(corpus)
    m = corpus.root / "models"
    v["sources"]["ft_b1"] = str(m / "base_b")
    got = replay(v, v["sources"], to_mergekit(v, v["sources"]))
    assert got["replayed"] and got["median_rel_error"] > 0.05


def test_register_method_checks_its_object():
    class Nameless(modeltrace.MergeMethod):
        description = "x"
        paper = "y"

    with pytest.raises(TypeError, match="name"):
        modeltrace.register_method(Nameless())
