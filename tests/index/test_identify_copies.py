"""identify among close real models: MiniLM, its fp16 and bf16 re-encodings, a real fine-tune of it (AdamW steps on
CPU) and that fine-tune's fp16 copy, all in one index. Copies are grouped with their original, never named parents;
one clear headline per outcome."""

from __future__ import annotations

import numpy as np
import pytest

from modeltrace.fingerprint import make_fingerprint
from modeltrace.fingerprint.copies import copy_groups, copy_link
from modeltrace.identify import identify
from modeltrace.index import Index
from tests.minilm_models import BF16, find_minilm, fine_tune, load_minilm, write_copy

NAMES = ["minilm", "minilm_fp16", "minilm_bf16", "ft", "ft_fp16"]


@pytest.fixture(scope="module")
def fps(tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm-copies")
    src = find_minilm(root)
    base = load_minilm(src)
    paths = {"minilm": src,
             "minilm_fp16": write_copy(base, src, root / "minilm_fp16", np.float16),
             "minilm_bf16": write_copy(base, src, root / "minilm_bf16", BF16),
             "ft": fine_tune(src, root / "ft")}
    paths["ft_fp16"] = write_copy(load_minilm(paths["ft"]), paths["ft"], root / "ft_fp16", np.float16)
    return {n: make_fingerprint(str(paths[n]), label=n) for n in NAMES}


@pytest.fixture(scope="module")
def index(fps, tmp_path_factory):
    ix = Index(tmp_path_factory.mktemp("minilm-index") / "index.sqlite", create=True)
    for n in NAMES:
        assert ix.add(fps[n], n).status == "added"
    return ix


def test_copy_links_and_groups(fps):
    assert copy_link(fps["minilm"], fps["minilm_fp16"]).dtype == "F16"
    assert copy_link(fps["minilm"], fps["minilm_bf16"]).dtype == "BF16"
    assert copy_link(fps["minilm_fp16"], fps["minilm_bf16"]) is not None  # two roundings of one original
    assert copy_link(fps["ft"], fps["ft_fp16"]) is not None
    for a in ("minilm", "minilm_fp16", "minilm_bf16"):
        for b in ("ft", "ft_fp16"):
            assert copy_link(fps[a], fps[b]) is None, (a, b)  # a real fine-tune is not a copy
    assert copy_groups(fps, ["minilm_bf16", "ft_fp16", "minilm", "minilm_fp16", "ft"]) == {
        "minilm": ["minilm_bf16", "minilm_fp16"], "ft": ["ft_fp16"]}


def _roles(res):
    return {h["model"]: (h["role"], h["note"]) for h in res["hits"]}


@pytest.mark.parametrize("name", NAMES)
def test_each_model_is_the_same_weights_as_its_re_encodings(fps, index, name):
    res = identify(fps[name], index, top=10)
    roles = _roles(res)
    same = ["minilm", "minilm_fp16", "minilm_bf16"] if name.startswith("minilm") else ["ft", "ft_fp16"]
    finest = [n for n in same if n != name][0]  # fp32 first, then fp16, then bf16
    assert res["relation"] == "recast" and res["parents"][0]["model"] == finest, res["summary"]
    assert res["summary"].startswith(f"the same weights as indexed {finest}, stored in "), res["summary"]
    assert f"indexed itself as {name}" in res["summary"] and "no ancestor" not in res["summary"].lower()
    assert {n for n, (role, _) in roles.items() if role == "copy"} >= set(same)
    assert all(roles[n][0] == "copy" for n in same)  # a copy is never a parent
    assert res["hits"][0]["model"] == name and {h["model"] for h in res["hits"][:len(same)]} == set(same)
    # the other group: its original takes the lineage role, its copies are grouped with it
    other = {"ft", "ft_fp16"} if name.startswith("minilm") else {"minilm", "minilm_fp16", "minilm_bf16"}
    head = "ft" if name.startswith("minilm") else "minilm"
    assert roles[head][0] in ("parent", "related")
    for n in other - {head}:
        assert roles[n] == ("copy", f"{'fp16' if n.endswith('fp16') else 'bf16'} copy of {head}"), roles[n]
    assert "merge" not in res["summary"] and "stack" not in res["summary"]
    if name.startswith("ft"):  # the fine-tune's lineage, with the parent's copies grouped with it
        assert "Lineage of these weights: related to minilm, and its fp16 copy minilm_fp16, bf16 copy " \
               "minilm_bf16 through training" in res["summary"], res["summary"]
        assert res["lineage"]["relation"] == "related" and res["lineage"]["parents"][0]["model"] == "minilm"


def test_only_itself_indexed_is_one_copy_headline(fps, tmp_path):
    ix = Index(tmp_path / "index.sqlite", create=True)
    ix.add(fps["minilm"], "minilm")
    res = identify(fps["minilm"], ix)
    assert res["relation"] == "copy" and res["summary"] == "identical in every sampled value to indexed minilm", \
        res["summary"]
    assert res["hits"][0]["role"] == "copy"


def test_fine_tune_copy_names_the_true_parent(fps, tmp_path):
    """ft_fp16 against an index without ft itself: a fine-tune of minilm (grouped with its copies), not of a copy."""
    ix = Index(tmp_path / "index.sqlite", create=True)
    for n in ("minilm", "minilm_fp16", "minilm_bf16"):
        ix.add(fps[n], n)
    for suspect in ("ft", "ft_fp16"):
        res = identify(fps[suspect], ix, top=10)
        assert res["relation"] == "related" and res["parents"][0]["model"] == "minilm", res["summary"]
        assert res["summary"].startswith(
            "related to minilm, and its fp16 copy minilm_fp16, bf16 copy minilm_bf16 through training"), res["summary"]
        roles = _roles(res)
        assert roles["minilm_fp16"][0] == roles["minilm_bf16"][0] == "copy"


def test_re_encoding_of_an_indexed_model(fps, tmp_path):
    """minilm_fp16 against an index of the fp32 original and the fine-tune: a re-encoding, not a fine-tune or a
    merge; the fine-tune is not named its parent."""
    ix = Index(tmp_path / "index.sqlite", create=True)
    for n in ("minilm", "ft", "ft_fp16"):
        ix.add(fps[n], n)
    res = identify(fps["minilm_fp16"], ix, top=10)
    assert res["relation"] == "recast" and res["parents"][0]["model"] == "minilm", res["summary"]
    assert res["summary"].startswith("the same weights as indexed minilm, stored in fp32"), res["summary"]
    roles = _roles(res)
    assert roles["minilm"][0] == "copy" and roles["ft_fp16"] == ("copy", "fp16 copy of ft")
    assert res["audit_command"] and " -c " in res["audit_command"]
