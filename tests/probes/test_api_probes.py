"""The probe entry points of the public API (docs/api.md): the same persona models as the command's tests, called as
a library, with typed frozen results and the same report."""

from __future__ import annotations

import pydantic
import pytest

import modeltrace


def test_probe_identity_as_a_library(probe_models):
    p = probe_models["models"]
    who = modeltrace.probe_identity(p["qwen"]["path"], questions=4, expect=["Qwen"],
                                    options=modeltrace.ProbeOptions(device="cpu", max_tokens=32))
    assert isinstance(who, modeltrace.IdentityProbe)
    qwen = next(n for n in who.names if n.name == "Qwen")
    assert qwen.expected and qwen.interval[0] <= qwen.share <= qwen.interval[1] and qwen.share > 0.5
    assert who.data["counts"]["asked"] == 16 and who.report.command == "probe identity"
    with pytest.raises(pydantic.ValidationError):
        who.names[0].share = 0.0  # type: ignore[misc]
    with pytest.raises(modeltrace.InputError):
        modeltrace.probe_identity(p["qwen"]["path"], system_prompt="x", no_system_prompt=True)


def test_probe_compare_as_a_library(probe_models):
    p = {k: v["path"] for k, v in probe_models["models"].items()}
    like = modeltrace.probe_compare(p["nex"], [p["base"], p["other"]], [p["ref1"], p["ref2"]], prompts=16,
                                    options=modeltrace.ProbeOptions(device="cpu"))
    by = {m.model: m for m in like.models}
    assert by[p["base"]].related and not by[p["other"]].related
    assert [f.code for f in like.report.findings] == ["behaves-like"]
