"""Content digests in the index: identify and scan say "identical" only from a full digest, at once; lookup."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "report"))

from report_helpers import cli  # noqa: E402
from weights import write_safetensors, write_sharded  # noqa: E402


def _one_changed_but_same_samples(src: dict[str, np.ndarray], root: Path) -> Path:
    """A copy with one element changed by ~1e-3 where the fingerprint does not sample it (its samples all agree)."""
    from modeltrace.fingerprint import make_fingerprint

    ref = make_fingerprint(str(root / "resharded")).content_hash
    for name in sorted(n for n, v in src.items() if v.ndim == 2):
        rows, cols = src[name].shape
        for r, c in ((rows - 1, cols - 1), (rows // 2 + 1, 1), (1, cols // 2)):
            w = {k: v.copy() for k, v in src.items()}
            x = w[name].astype(np.float32)
            x[r, c] += 1e-3 if abs(x[r, c]) < 0.1 else 0.01 * abs(x[r, c])
            w[name] = x.astype(ml_dtypes.bfloat16)
            if (w[name].view(np.uint16) == src[name].view(np.uint16)).all():
                continue
            folder = root / "changed"
            write_safetensors(folder / "model.safetensors", list(w.items()))
            if make_fingerprint(str(folder)).content_hash == ref:
                return folder
    pytest.skip("every candidate element is sampled by the fingerprint")


@pytest.fixture(scope="module")
def lib(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digest-index")
    index = root / "ix.sqlite"
    r = cli("index", "add", corpus.path("ft_a1"), corpus.path("ft_a2"), "--digest", "--index", index)
    assert r.exit_code == 0, r.output
    src = load_file(str(corpus.path("ft_a1") / "model.safetensors"))
    write_sharded(root / "resharded", dict(sorted(src.items())[::-1]), 2, prefix="weights")
    wide = {k: v.astype(np.float32) for k, v in src.items()}
    write_safetensors(root / "f32" / "model.safetensors", list(wide.items()))
    changed = _one_changed_but_same_samples(src, root)
    return {"index": index, "resharded": root / "resharded", "f32": root / "f32", "changed": changed}


def _identify(lib, model: Path, *extra) -> dict:
    r = cli("identify", model, "--index", lib["index"], "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_identical_from_the_content_digest_at_once(lib):
    res = _identify(lib, lib["resharded"], "--digest")
    assert res["identical"] == "ft_a1" and res["identical_by"] == "content digest"
    assert res["relation"] == "copy" and res["hits"][0]["role"] == "identical"
    assert res["index"]["compared"] == 0  # answered from the digest, no fingerprint comparisons
    assert res["summary"].startswith("identical to indexed ft_a1 (same content digest")


def test_sampled_agreement_is_not_called_identical(lib):
    res = _identify(lib, lib["changed"])
    assert res["identical"] == "ft_a1" and res["identical_by"] == "sampled values"
    assert "identical in every sampled value to indexed ft_a1" in res["summary"]
    assert "identical to indexed" not in res["summary"]
    res = _identify(lib, lib["changed"], "--digest")
    assert res.get("identical_by") != "content digest" and "identical to indexed" not in res["summary"]
    assert res["content_digest"].startswith("mtc1:")


def test_recast_copy_is_same_values(lib):
    res = _identify(lib, lib["f32"], "--digest")
    assert res["same_values"] == ["ft_a1"] and res.get("identical_by") != "content digest"
    assert res["summary"].startswith("same values as indexed ft_a1 in another dtype")


def test_lookup_and_removal(lib, tmp_path):
    r = cli("inspect", lib["resharded"], "--hashes", "--json")
    content = json.loads(r.stdout)["subjects"][0]["description"]["content"]
    for digest, kind in ((content["model_digest"], "model"), (content["values_digest"], "values"),
                         (content["model_digest"].split(":")[1], "model")):
        r = cli("lookup", digest, "--index", lib["index"], "--json")
        assert r.exit_code == 0, r.output
        assert [(m["name"], m["kind"]) for m in json.loads(r.stdout)] == [("ft_a1", kind)]
    r = cli("lookup", "mtc1:" + "0" * 64, "--index", lib["index"])
    assert r.exit_code == 1
    r = cli("lookup", "nonsense", "--index", lib["index"])
    assert r.exit_code == 2 and "not a digest" in r.output
    # a removed model takes its digests with it
    import shutil

    copy = tmp_path / "ix.sqlite"
    shutil.copy(lib["index"], copy)
    assert cli("index", "remove", "ft_a1", "--index", copy).exit_code == 0
    assert cli("lookup", content["model_digest"], "--index", copy).exit_code == 1


def test_scan_with_digests(lib, tmp_path):
    listing = tmp_path / "models.txt"
    listing.write_text(f"{lib['resharded']}\n{lib['changed']}\n")
    r = cli("scan", listing, "--index", lib["index"], "--digest", "--json", "--workers", "1")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert rows[0]["content_digest"].startswith("mtc1:") and rows[0]["summary"].startswith("identical to indexed")
    assert "identical to indexed" not in rows[1]["summary"]


def test_add_refuses_to_confuse_sampled_twins(lib, tmp_path):
    import shutil

    copy = tmp_path / "ix.sqlite"
    shutil.copy(lib["index"], copy)
    r = cli("index", "add", lib["changed"], "--digest", "--index", copy, "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)[0]
    assert row["status"] == "not-added" and row["name"] == "ft_a1"
    assert "other content" in " ".join(r.stderr.split())
