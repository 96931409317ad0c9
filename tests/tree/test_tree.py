"""`modeltrace tree` on the family-tree collection (tests/tree_collection.py: the corpus plus ~110 models made with
the same real tools, 154 in all, true tree in its manifest): accuracy floors the solver meets today (the issue's
targets and what is missed are in the README), the incremental update, the formats and the command's errors."""

from __future__ import annotations

import json

import pytest

from modeltrace.fingerprint import make_fingerprint
from modeltrace.index import Index
from modeltrace.tree import build_tree
from modeltrace.tree.formats import render, tree_document
from tests.report.report_helpers import cli
from tests.tree_collection import build_collection
from tests.tree_eval import score


@pytest.fixture(scope="module")
def collection(corpus):
    return build_collection(corpus)["models"]


@pytest.fixture(scope="module")
def fps(collection):
    return {n: make_fingerprint(e["path"]) for n, e in collection.items()}


@pytest.fixture(scope="module")
def index_path(fps, tmp_path_factory):
    path = tmp_path_factory.mktemp("tree") / "all.sqlite"
    with Index(path, create=True) as ix:
        for n in fps:
            ix.add(fps[n], n)
    return path


@pytest.fixture(scope="module")
def tree(index_path):
    with Index(index_path) as ix:
        return build_tree(ix)


def test_collection_has_the_cases(collection):
    kinds = {e["kind"] for e in collection.values()}
    assert len(collection) >= 150 and {"base", "independent", "finetune", "merge", "stack", "recast",
                                       "quantized"} <= kinds
    depth = {n: 0 for n in collection}
    for n in collection:  # manifest order is build order: parents first
        depth[n] = 1 + max((depth[p] for p in collection[n]["parents"]), default=-1)
    assert max(depth.values()) >= 4  # chains of depth >= 3 below a root
    merged = {n for n, e in collection.items() if e["kind"] == "merge"}
    assert any(set(collection[n]["parents"]) & merged for n in merged)  # merges of merges
    assert any(collection[n]["kind"] == "finetune" and set(collection[n]["parents"]) & merged for n in collection)


def test_accuracy_floors(tree, collection):
    s = score(tree, collection)
    # measured: precision 0.994, recall 0.981 (the targets 0.97 / 0.95; breadcrumbs is not placed)
    assert s.precision >= 0.97 and s.recall >= 0.95, (s.precision, s.recall, s.wrong[:10])
    assert s.cross_family == []  # no edge between independent families
    assert s.by_kind["recast"][0] == s.by_kind["recast"][1] and s.by_kind["quantized"][0] == s.by_kind["quantized"][1]
    assert s.by_kind["stack"][0] == s.by_kind["stack"][1]
    assert s.max_weight_error <= 0.01, s.weight_errors
    assert s.merges_parents_right >= 27
    assert s.by_kind["finetune"][0] >= s.by_kind["finetune"][1] - 1
    wrong_merges = {c for p, c, r in s.wrong if r == "merge"}  # a model that is no merge is never made one
    assert all(collection[c]["kind"] == "merge" for c in wrong_merges), wrong_merges
    assert s.roots_right == s.roots_total


def test_chains_and_directions_are_named(tree):
    assert tree.nodes["t_mc_lin_ft"]["summary"].startswith("fine-tune of t_mc_lin (merge: 0.60 × t_c2 + 0.40 × t_c3")
    assert tree.nodes["t_c1a1x"]["depth"] == 4 and tree.ancestors("t_c1a1x")[:4] == ["t_c1a1", "t_c1a", "t_c1",
                                                                                     "t_base_c"]
    e = next(e for e in tree.edges if e["child"] == "t_c1a")
    assert e["parent"] == "t_c1" and e["direction"] in ("weights", "implied") and "r = +" in e["note"]
    assert tree.nodes["t_base_a_q8"]["summary"].startswith("quantized copy of base_a")
    assert tree.nodes["s_stack_deep"]["role"] == "stack" and len(tree.nodes["s_stack_deep"]["layer_map"]) == 6
    assert tree.nodes["indep_03"]["role"] == "independent"


def test_incremental_update_equals_a_fresh_build(fps, tmp_path):
    names = [n for n in fps if n.startswith(("t_base_c", "t_c", "t_mc_lin"))][:14]
    last = "t_c1a1x"
    names = [n for n in names if n != last]
    inc, fresh = tmp_path / "inc.sqlite", tmp_path / "fresh.sqlite"
    with Index(inc, create=True) as ix:
        for n in names:
            ix.add(fps[n], n)
        build_tree(ix)
        ix.add(fps[last], last)
        t1 = build_tree(ix)
    assert t1.stats["families_solved"] == 1 and t1.stats["fingerprints_decoded"] <= len(names) + 1
    with Index(fresh, create=True) as ix:
        for n in [*names, last]:
            ix.add(fps[n], n)
        t2 = build_tree(ix)
    strip = lambda t: sorted((e["parent"], e["child"], e["relation"], e["direction"]) for e in t.edges)  # noqa: E731
    assert strip(t1) == strip(t2)
    assert t1.parents(last)[0]["parent"] == "t_c1a1"


def test_formats(tree, tmp_path):
    doc = json.loads(render(tree, "json"))
    assert doc["schema"] == "modeltrace-tree" and len(doc["nodes"]) == len(tree.nodes)
    assert {"name", "role", "summary", "family", "depth", "content_hash"} <= set(doc["nodes"][0])
    assert {"parent", "child", "relation", "direction", "log10_p", "note"} <= set(doc["edges"][0])
    dot = render(tree, "dot")
    assert dot.startswith("digraph") and '"t_c1" -> "t_c1a"' in dot
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    cdx = render(tree, "cyclonedx")
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(cdx) is None
    comp = next(c for c in json.loads(cdx)["components"] if c["name"] == "t_c1a1x")
    assert {"t_c1a1", "t_c1a", "t_c1", "t_base_c"} <= {a["name"] for a in comp["pedigree"]["ancestors"]}
    sub = tree.subtree("t_mc_lin")
    assert {"t_c2", "t_c3", "t_mc_lin_ft", "t_base_c"} <= set(sub.nodes) and "base_a" not in sub.nodes
    assert tree_document(sub)["focus"] == "t_mc_lin"


def test_command_and_bad_input(index_path, tmp_path):
    r = cli("tree", "--index", str(index_path), "--model", "t_mm_c")
    assert r.exit_code == 0 and "t_mm_c  [merge]" in r.stdout, r.output
    out = tmp_path / "t.html"
    r = cli("tree", "--index", str(index_path), "-o", str(out))
    assert r.exit_code == 0 and out.read_text().startswith("<!DOCTYPE html>")
    for args, msg in [(["--format", "pdf"], "unknown format"), (["--model", "nope"], "not in the index"),
                      (["-o", str(tmp_path / "x.txt")], "cannot tell the format")]:
        r = cli("tree", "--index", str(index_path), *args)
        assert r.exit_code == 2 and msg in r.stderr and "Traceback" not in r.output, r.output
    empty = tmp_path / "empty.sqlite"
    with Index(empty, create=True):
        pass
    r = cli("tree", "--index", str(empty))
    assert r.exit_code == 2 and "empty" in r.stderr
    r = cli("tree", "--index", str(tmp_path / "missing.sqlite"))
    assert r.exit_code == 2 and "no index here" in r.stderr


def test_html_in_chromium(tree, tmp_path):
    from tests.chromium import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine")
    page = tmp_path / "tree.html"
    page.write_text(render(tree, "html"))
    b = Chromium(binary)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            b.send(f"{domain}.enable", {}, s)
        b.send("Page.navigate", {"url": page.as_uri()}, s)
        b.wait_event("Page.loadEventFired", s)

        def ev(js: str):
            return b.send("Runtime.evaluate", {"expression": js, "returnByValue": True}, s)["result"].get("value")

        assert ev("document.querySelectorAll('.node').length") == len(tree.nodes)
        assert ev("document.querySelectorAll('path.edge').length") == len(tree.edges)
        ev("tree.show('t_mc_lin_ft')")
        side = ev("document.getElementById('side').innerText")
        assert "fine-tune of t_mc_lin" in side and "t_mc_lin_ft2" in side
        ev("const q=document.getElementById('q'); q.value='t_c1a'; q.dispatchEvent(new Event('input'))")
        assert ev("document.querySelectorAll('.node.hit').length") >= 4
        before = ev("tree.viewBox()[2]")
        ev("document.getElementById('zin').click()")
        assert ev("tree.viewBox()[2]") < before
        ev("document.querySelector('.node[data-name=\"t_mm_c\"]').dispatchEvent(new MouseEvent('click',"
           "{bubbles:true}))")
        assert "merge: 0.50" in ev("document.getElementById('side').innerText")
        errors = [e for e in b.events if e.get("sessionId") == s and e.get("method") == "Runtime.exceptionThrown"]
        requests = [e["params"]["request"]["url"] for e in b.events if e.get("sessionId") == s and
                    e.get("method") == "Network.requestWillBeSent"
                    and not e["params"]["request"]["url"].startswith(("file:", "data:", "about:"))]
        assert errors == [] and requests == []
    finally:
        b.close()


def test_identify_reports_ancestors_of_ancestors(tree, index_path, fps):
    from modeltrace.identify import identify

    with Index(index_path) as ix:
        res = identify(fps["t_c1a1x"], ix)
    parent = res["parents"][0]["model"]
    assert parent in ("t_c1a1", "t_c1a1_f16")  # the model itself is in the index, so its copy is a candidate too
    assert [a["model"] for a in res["ancestry"][parent]][-3:] == ["t_c1a", "t_c1", "t_base_c"]


def test_index_add_and_scan_add_keep_a_built_tree_current(collection, fps, tmp_path):
    path = tmp_path / "ix.sqlite"
    with Index(path, create=True) as ix:
        for n in ("t_base_c", "t_c1", "t_c1a"):
            ix.add(fps[n], n)
    r = cli("index", "add", collection["t_c1a1"]["path"], "--name", "t_c1a1", "--index", path, "--workers", "1")
    assert r.exit_code == 0 and "family tree" not in r.stdout, r.output  # no tree built yet: nothing to update
    assert cli("tree", "--index", path).exit_code == 0
    r = cli("index", "add", collection["t_c1a1x"]["path"], "--name", "t_c1a1x", "--index", path, "--workers", "1")
    assert r.exit_code == 0 and "family tree updated (4 pairs computed, 1 families re-solved" in r.stdout, r.output
    r = cli("scan", collection["t_c1b"]["path"], "--add", "--index", path, "--workers", "1")
    assert r.exit_code == 0, r.output
    with Index(path) as ix:
        t = build_tree(ix)  # everything was already computed by the adds
    assert t.stats["pairs_computed"] == 0 and t.stats["families_solved"] == 0 and t.stats["models"] == 6
    assert t.parents("t_c1a1x")[0]["parent"] == "t_c1a1"
    scanned, = set(t.nodes) - {"t_base_c", "t_c1", "t_c1a", "t_c1a1", "t_c1a1x"}
    assert [e["parent"] for e in t.parents(scanned)] == ["t_c1"]


def test_merges_off_the_segment_and_sparse_merges_name_their_parents(tree, collection):
    def merge_parents(n):
        return {e["parent"]: e.get("weight") for e in tree.parents(n) if e["relation"] == "merge"}

    # unnormalised linear (0.7 + 0.5: beyond both parents) and task arithmetic with its base: found in the span search
    got = merge_parents("m_linear_unnorm")
    assert set(got) == {"ft_a1", "ft_a2"} and abs(got["ft_a1"] - 0.7) <= 0.01 and abs(got["ft_a2"] - 0.5) <= 0.01
    got = merge_parents("m_task_arith")
    assert set(got) == {"base_a", "ft_a1", "ft_a2"} and abs(got["base_a"] + 0.2) <= 0.01
    # sparse merges whose parents have fine-tunes in the index name the parents, not their fine-tunes
    for n in ("m_ties_d03", "m_della", "t_mc_ties", "t_md_dare"):
        assert set(merge_parents(n)) == set(collection[n]["parents"]), (n, merge_parents(n))


def test_batched_pair_evidence_equals_one_by_one(fps):
    import itertools

    import numpy as np

    from modeltrace.tree.evidence import pair_evidence, pair_evidence_many, record

    names = ["t_base_c", "t_c1", "t_c1a", "t_c2", "t_mc_lin", "s_stack_deep", "t_base_a_q8", "base_a"]
    recs = [record(fps[n]) for n in names]
    by_hash = {fps[n].content_hash: fps[n] for n in names}
    pairs = list(itertools.combinations(recs, 2))
    for p, q in zip(pair_evidence_many(pairs, by_hash.__getitem__), (pair_evidence(a, b, by_hash.__getitem__)
                                                                        for a, b in pairs), strict=True):
        assert (p.a, p.b, p.keys, p.copies_ab, p.copies_ba, p.equal) == (q.a, q.b, q.keys, q.copies_ab, q.copies_ba,
                                                                          q.equal)
        assert np.allclose(p.gab, q.gab, rtol=1e-12) and np.allclose(p.gaa, q.gaa, rtol=1e-12)
        assert abs(p.log10_p - q.log10_p) <= 1e-9 * max(1.0, abs(q.log10_p))
