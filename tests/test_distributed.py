"""Work split across processes and Ray (a real local instance, num_cpus=2) gives the single-process results: per-shard
fingerprints byte for byte (local and hf://), `scan` with a task per shard, the audit's streaming pass as work items
grouped by suspect shard (verdict and report), and a failing shard as one error line for its model only."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from modeltrace import engine
from modeltrace.audit import _work_groups, run_audit
from modeltrace.errors import InputError
from modeltrace.fingerprint import Fingerprint, make_fingerprint
from modeltrace.fingerprint.shards import (
    ShardedFingerprint,
    assemble,
    make_fingerprint_sharded,
    plan_fingerprint,
    read_shard,
)
from modeltrace.index import Index
from modeltrace.scan import scan
from modeltrace.verdict import decide
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures (isolated env, local Hub server)

INDEXED = ["base_a", "base_b", "ft_a1", "ft_a2", "ft_b1", "moe_base", "moe_ft1", "moe_ft2"]
TIMINGS = {"created", "argv", "elapsed_s", "hash_seconds"}


def reshard(src: Path, dest: Path, n: int = 3) -> Path:
    """`src`'s model.safetensors re-written as `n` shards (tensors dealt round-robin by name) plus the index json;
    the same tensors, bytes for bytes."""
    raw = (src / "model.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    header.pop("__metadata__", None)
    names = sorted(header)
    wmap = {}
    dest.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        head, data, off = {"__metadata__": {"format": "pt"}}, [], 0
        for name in names[k::n]:
            e = header[name]
            b, end = e["data_offsets"]
            head[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [off, off + end - b]}
            data.append(raw[8 + hlen + b:8 + hlen + end])
            off += end - b
            wmap[name] = fname
        hb = json.dumps(head).encode()
        hb += b" " * (-len(hb) % 8)
        (dest / fname).write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(data))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "corpus_meta.json":
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.fixture(scope="module")
def sharded(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    return {"rio": reshard(corpus.path("m_linear_rio"), root / "rio_sharded"),
            "moe": reshard(corpus.path("moe_linear"), root / "moe_sharded")}


@pytest.fixture(scope="module")
def index_path(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ix") / "ix.sqlite"
    with Index(path, create=True) as ix:
        for n in INDEXED:
            ix.add(make_fingerprint(str(corpus.path(n))))
    return path


def _stable(doc: dict) -> dict:
    """A verdict or report without what legitimately differs between runs (timings, the command line)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMINGS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(json.loads(json.dumps(doc, default=str)))


# ---- per-shard fingerprints --------------------------------------------------------------------------------------
def test_per_shard_fingerprints_are_byte_identical(corpus, sharded):
    for name, path in sharded.items():
        ref = make_fingerprint(str(path))
        plan = pickle.loads(pickle.dumps(plan_fingerprint(str(path))))  # as it travels from a worker
        assert isinstance(plan, ShardedFingerprint) and len(plan.works) == 3
        blocks = [pickle.loads(pickle.dumps(read_shard(w))) for w in reversed(plan.works)]  # any order
        fp = assemble(plan, blocks)
        assert fp.to_bytes() == ref.to_bytes() and fp.content_hash == ref.content_hash, name
        assert (fp.bytes_read, fp.requests) == (ref.bytes_read, ref.requests)
        assert make_fingerprint_sharded(str(path), workers=2).to_bytes() == ref.to_bytes()  # local processes
        # sharding changes files, not content: the same content hash as the one-file original
        original = corpus.path("m_linear_rio" if name == "rio" else "moe_linear")
        assert ref.content_hash == make_fingerprint(str(original)).content_hash
    one = plan_fingerprint(str(corpus.path("ft_a1")))  # one file: finished in one task
    assert isinstance(one, Fingerprint) and one.to_bytes() == make_fingerprint(str(corpus.path("ft_a1"))).to_bytes()


def test_per_shard_fingerprint_of_a_hub_model(sharded, hub_server):  # noqa: F811
    hub_server({"org/rio-sharded": sharded["rio"]})
    make_fingerprint("hf://org/rio-sharded")  # headers now in the on-disk cache, as for every later open
    ref = make_fingerprint("hf://org/rio-sharded")
    plan = plan_fingerprint("hf://org/rio-sharded")
    assert isinstance(plan, ShardedFingerprint)
    assert all(w.spec.startswith("hf://org/rio-sharded@") for w in plan.works)  # pinned to the commit planned
    fp = assemble(plan, [read_shard(w) for w in plan.works])
    assert fp.to_bytes() == ref.to_bytes()


def test_a_shard_changed_after_planning_is_one_error_line(sharded, tmp_path, ray_local):
    path = tmp_path / "rio_changing"
    shutil.copytree(sharded["rio"], path)
    plan = plan_fingerprint(str(path))
    shard = path / plan.works[1].shard
    shard.write_bytes(shard.read_bytes()[:-64])  # changed after planning (a re-upload, a truncated copy)
    out = list(engine.run(read_shard, plan.works, ray=True))
    assert [o.ok for o in out] == [True, False, True]
    assert "\n" not in out[1].error and plan.works[1].shard in out[1].error


def test_sharded_fingerprint_on_ray(sharded, ray_local):
    path = sharded["moe"]
    assert make_fingerprint_sharded(str(path), ray=True).to_bytes() == make_fingerprint(str(path)).to_bytes()


# ---- scan --------------------------------------------------------------------------------------------------------
def test_scan_makes_a_task_per_shard_on_ray_as_locally(corpus, sharded, index_path, ray_local, tmp_path):
    specs = [str(sharded["rio"]), str(corpus.path("ft_b1")), str(sharded["moe"]), str(tmp_path / "missing")]
    with Index(index_path) as ix:
        local = [_stable(r) for r in scan(specs, ix, workers=2)]
        inline = [_stable(r) for r in scan(specs, ix, workers=1)]
        on_ray = [_stable(r) for r in scan(specs, ix, ray=True)]
    assert local == inline == on_ray
    rio, ft, moe, missing = local
    assert rio["tasks"] == 4 and moe["tasks"] == 4 and ft["tasks"] == 1  # plan + 3 shards; one file: one task
    assert rio["summary"].startswith("0.60 × ft_a1 + 0.40 × ft_a2, linear")
    assert moe["relation"] == "merge"
    assert rio["content_hash"] == make_fingerprint(str(corpus.path("m_linear_rio"))).content_hash
    assert not missing["ok"] and "no such file" in missing["error"]


def test_a_failing_shard_fails_its_model_only(corpus, sharded, index_path, tmp_path, monkeypatch):
    """One bad shard: that model's one error line and nothing of it in the index; the other models go on."""
    import modeltrace.scan as scan_module

    def flaky(work):
        if work.shard.startswith("model-00002") and "rio" in work.spec:
            raise InputError(f"{work.spec}: {work.shard}: cannot reach the storage")
        return read_shard(work)

    monkeypatch.setattr(scan_module, "read_shard", flaky)
    copy = tmp_path / "ix.sqlite"
    copy.write_bytes(index_path.read_bytes())
    specs = [str(sharded["rio"]), str(sharded["moe"]), str(corpus.path("indep_07"))]
    with Index(copy) as ix:
        rows = list(scan(specs, ix, add=True, workers=1))
        names = {e.name for e in ix.entries()}
    assert [r["ok"] for r in rows] == [False, True, True]
    assert rows[0]["error"].endswith("model-00002-of-00003.safetensors: cannot reach the storage")
    assert "\n" not in rows[0]["error"]
    assert "rio_sharded" not in names and {"moe_sharded", "indep_07"} <= names


def test_ray_address_may_come_before_or_after_the_target():
    assert engine.split_address(["auto", "x.txt"], True, "u") == ("auto", "x.txt")
    assert engine.split_address(["x.txt", "ray://head:10001"], True, "u") == ("ray://head:10001", "x.txt")
    assert engine.split_address(["x.txt"], True, "u") == (None, "x.txt")
    with pytest.raises(InputError, match="usage"):
        engine.split_address(["a", "b"], False, "usage")


# ---- audit -------------------------------------------------------------------------------------------------------
def test_audit_work_items_follow_the_suspects_shards(corpus, sharded):
    from modeltrace.align.transform import SlotTransform
    from modeltrace.align.view import open_view
    from modeltrace.audit import _plan_item

    for path, want, least in ((sharded["rio"], 2, 3), (corpus.path("m_linear_rio"), 4, 4)):
        views = [open_view(str(path)), open_view(str(corpus.path("ft_a1")))]
        plan = [_plan_item(views, s, {1: SlotTransform(s)}) for s in sorted(views[0].parts)
                if s.role != "buffer"]
        groups = _work_groups(views, plan, want)
        files = views[0].source.tensors()
        assert len(groups) >= least and sorted(i for g in groups for i in g) == list(range(len(plan)))
        assert all(len({files[views[0].parts[plan[i].slot].name].file for i in g}) == 1 for g in groups)
        for v in views:
            v.close()


def _disguised(corpus, dest: Path) -> Path:
    from tests import disguise as D

    rng = np.random.default_rng(5)
    return D.save(D.permute_mlp(D.load(corpus.path("m_linear_rio")), rng), dest)


def test_audit_on_ray_equals_the_threaded_audit(corpus, sharded, ray_local, tmp_path):
    p = corpus.path
    cases = [(str(sharded["rio"]), [str(p("ft_a1")), str(p("ft_a2"))], None),  # a merge, 3 suspect shards
             (str(p("indep_07")), [str(p("base_a"))], None),  # an independent pair
             (str(p("m_ties_d05")), [str(p("ft_a1")), str(p("ft_a2"))], str(p("base_a"))),  # sparse, with a base
             (str(_disguised(corpus, tmp_path / "rio_perm")), [str(p("ft_a1")), str(p("ft_a2"))], None)]
    relations = []
    for suspect, cands, base in cases:
        threaded = decide(run_audit(suspect, cands, base=base))
        on_ray = decide(run_audit(suspect, cands, base=base, ray=True))
        assert _stable(on_ray) == _stable(threaded), suspect
        relations.append(threaded["relation"])
    assert relations == ["merge", "independent", "merge", "merge"]
    procs = decide(run_audit(cases[0][0], cases[0][1], workers=2))
    assert _stable(procs) == _stable(decide(run_audit(cases[0][0], cases[0][1])))


def test_audit_cli_report_on_ray_equals_the_threaded_one(corpus, sharded, ray_local):
    from tests.report.report_helpers import cli

    args = ["audit", str(sharded["rio"]), "-c", str(corpus.path("ft_a1")), "-c", str(corpus.path("ft_a2")),
            "--format", "json"]
    plain = cli(*args)
    on_ray = cli(*args, "--ray")
    assert plain.exit_code == 0 and on_ray.exit_code == 0, on_ray.stdout
    a, b = json.loads(plain.stdout), json.loads(on_ray.stdout)
    assert _stable(a) == _stable(b)
    assert a["subjects"][0]["audit"]["relation"] == "merge"
