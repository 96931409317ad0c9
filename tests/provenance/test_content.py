"""Content identity: the same weights stored any way have one model digest; one changed element gives another."""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weights import weights, write_safetensors, write_sharded  # noqa: E402

from modeltrace.errors import InputError  # noqa: E402
from modeltrace.provenance.content import (  # noqa: E402
    ContentDigest,
    compare,
    content_digest,
    loads_digest,
    parse_digest,
)
from modeltrace.sources import open_source  # noqa: E402


def digest_of(path: Path, **kw) -> ContentDigest:
    with open_source(path) as src:
        return content_digest(src, **kw)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    w = weights()
    items = list(w.items())
    out = {
        "single": write_safetensors(root / "single" / "model.safetensors", items),
        "reordered": write_safetensors(root / "reordered" / "weights.safetensors", items[::-1],
                                       metadata={"format": "pt", "note": "other metadata"}),
        "sharded3": write_sharded(root / "sharded3", w, 3),
        "sharded2_renamed": write_sharded(root / "sharded2", dict(items[::-1]), 2, prefix="pytorch_weights"),
    }
    # exactly widened to float32, and back to bf16 from there
    wide = {k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in w.items()}
    out["f32"] = write_safetensors(root / "f32" / "model.safetensors", list(wide.items()))
    back = {k: (v.astype(ml_dtypes.bfloat16) if k in w and w[k].dtype == ml_dtypes.bfloat16 else v)
            for k, v in wide.items()}
    out["roundtrip"] = write_safetensors(root / "roundtrip" / "model.safetensors", list(back.items()))
    # the f32 norm widened to f64 (exact)
    f64 = dict(w)
    f64["model.norm.weight"] = w["model.norm.weight"].astype(np.float64)
    out["norm_f64"] = write_safetensors(root / "norm_f64" / "model.safetensors", list(f64.items()))
    # one element changed by one bf16 ulp
    one = {k: v.copy() for k, v in w.items()}
    u = one["model.layers.1.mlp.up_proj.weight"].view(np.uint16)
    u[7, 3] ^= 1
    out["one_ulp"] = write_safetensors(root / "one_ulp" / "model.safetensors", list(one.items()))
    # the same element changed in the f32 copy: values no longer fit bf16
    wide_one = dict(wide)
    x = wide_one["model.layers.1.mlp.up_proj.weight"].copy()
    x[7, 3] += 1e-3
    wide_one["model.layers.1.mlp.up_proj.weight"] = x
    out["f32_changed"] = write_safetensors(root / "f32_changed" / "model.safetensors", list(wide_one.items()))
    return out


@pytest.fixture(scope="module")
def digests(layouts) -> dict[str, ContentDigest]:
    return {k: digest_of(p) for k, p in layouts.items()}


def test_storage_layout_does_not_change_identity(digests):
    ref = digests["single"]
    for k in ("reordered", "sharded3", "sharded2_renamed", "roundtrip"):
        assert digests[k].model == ref.model, k
        assert digests[k].values == ref.values, k
        assert compare(digests[k], ref).relation == "identical"
    assert len(ref.tensors) == len(weights())
    assert ref.bytes_hashed == sum(v.nbytes for v in weights().values())


def test_exact_recast_is_same_values_other_dtype(digests):
    ref = digests["single"]
    for k in ("f32", "norm_f64"):
        d = digests[k]
        assert d.model != ref.model, k
        assert d.values == ref.values, k
        c = compare(d, ref)
        assert c.relation == "same-values" and "same values, other dtype" in c.text
    c = compare(digests["f32"], ref)
    assert set(c.recast) == {n for n, v in weights().items() if v.dtype == ml_dtypes.bfloat16}
    assert "F32->BF16" in c.text
    f32 = {t.name: t for t in digests["f32"].tensors}
    assert f32["model.embed_tokens.weight"].value_dtype == "BF16"
    assert f32["model.norm.weight"].value_dtype == "F32"  # genuinely f32 values


def test_one_changed_element_is_another_identity(digests):
    ref = digests["single"]
    for k in ("one_ulp", "f32_changed"):
        d = digests[k]
        assert d.model != ref.model and d.values != ref.values, k
        c = compare(d, ref)
        assert c.relation == "different"
        assert c.differing == ("model.layers.1.mlp.up_proj.weight",)
    c = compare(digests["f32_changed"], digests["f32"])
    assert c.differing == ("model.layers.1.mlp.up_proj.weight",) and not c.recast


def test_bounded_windows_give_the_same_digest(layouts, digests, monkeypatch):
    from modeltrace.provenance import content

    monkeypatch.setattr(content, "WINDOW", 64)  # many windows per tensor, one thread and several
    for workers in (1, 3):
        assert digest_of(layouts["sharded3"], workers=workers).model == digests["single"].model
        assert digest_of(layouts["f32"], workers=workers).values == digests["single"].values


def test_round_trip_and_parse(digests):
    d = digests["sharded3"]
    again = loads_digest(__import__("json").dumps(d.to_dict()))
    assert again.model == d.model and again.tensors == d.tensors
    bad = d.to_dict()
    bad["manifest"][0]["digest"] = "0" * 64
    with pytest.raises(InputError, match="does not match its manifest"):
        ContentDigest.from_dict(bad)
    assert parse_digest(d.model_id) == ("model", d.model)
    assert parse_digest(d.values_id) == ("values", d.values)
    assert parse_digest("SHA256:" + "A" * 64) == ("sha256", "a" * 64)
    with pytest.raises(InputError, match="not a digest"):
        parse_digest("mtc1:1234")


def test_hub_source_has_the_local_identity(layouts, digests, monkeypatch, tmp_path):
    from hubserver import serve
    from huggingface_hub import constants

    from modeltrace.sources import remote

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("MODELTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(remote, "BACKOFF_BASE", 0.01)
    with serve({"org/sharded": layouts["sharded3"]}) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        d = digest_of("hf://org/sharded")  # type: ignore[arg-type]
    assert d.model == digests["single"].model
    assert len(d.files) == 3 and all(len(v) == 64 for v in d.files.values())  # the Hub's LFS SHA-256, free


def test_value_form_found_when_a_late_window_does_not_fit(tmp_path, monkeypatch):
    """Early windows fit bf16, a later value only f16: the canonical form is F16 (re-read), equal to an F16 copy."""
    from modeltrace.provenance import content

    monkeypatch.setattr(content, "WINDOW", 64)
    x = np.round(np.random.default_rng(1).standard_normal((32, 8)) * 8) / 8  # exact in bf16 and f16
    x[-1, -1] = 1 + 2 ** -10  # exact in f16, not in bf16
    a = write_safetensors(tmp_path / "a" / "m.safetensors", [("w", x.astype(np.float32))])
    b = write_safetensors(tmp_path / "b" / "m.safetensors", [("w", x.astype(np.float16))])
    c = write_safetensors(tmp_path / "c" / "m.safetensors", [("w", x.astype(np.float64))])
    da, db, dc = digest_of(a), digest_of(b), digest_of(c)
    assert da.tensors[0].value_dtype == db.tensors[0].value_dtype == dc.tensors[0].value_dtype == "F16"
    assert da.values == db.values == dc.values and len({da.model, db.model, dc.model}) == 3
    x[0, 0] = 1 / 3  # fits f32 only
    d32 = digest_of(write_safetensors(tmp_path / "d" / "m.safetensors", [("w", x.astype(np.float32))]))
    assert d32.tensors[0].value_dtype == "F32" and d32.tensors[0].value_digest == d32.tensors[0].digest
