"""Evidence bundle and `modeltrace verify`: re-check a saved report against its sources and explain every difference
(changed files, moved weights, gone sources, remote bytes that differ), locally and over hf:// Range reads."""

from __future__ import annotations

import hashlib
import json
import struct

from report_helpers import NEX_CARD, QWEN_CARD, RIO_CARD, carded_copy, cli

from modeltrace.report.evidence import describe_file_change, local_file_evidence
from tests.sources.test_hub import hub_env, hub_server  # noqa: F401 - fixtures

try:
    from hubserver import commit_sha
except ImportError:
    from tests.hubserver import commit_sha


def _flip_data_byte(path, frac: float = 0.5) -> None:
    """Change one byte inside the tensor data (past the safetensors header)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    pos = 8 + n + int((len(data) - 8 - n) * frac)
    data[pos] ^= 0x40
    path.write_bytes(data)


def _save(report, tmp_path, name="r.json"):
    p = tmp_path / name
    p.write_text(report.to_json())
    return p


def test_evidence_records_hashes_and_verify_passes(rio_report, rio_models, tmp_path):
    ev = rio_report.subjects[0].evidence
    assert ev.parameters["candidates"] == [str(rio_models["nex"]), str(rio_models["qwen"])]
    assert ev.seeds and "SHA-256" in ev.hashing
    rio = ev.sources[0]
    assert rio.role == "suspect" and rio.label == "rio"
    weights = next(f for f in rio.files if f.name == "model.safetensors")
    assert weights.sha256 == hashlib.sha256((rio_models["rio"] / "model.safetensors").read_bytes()).hexdigest()
    assert weights.header_sha256 and any(f.name == "README.md" and f.sha256 for f in rio.files)
    r = cli("verify", _save(rio_report, tmp_path))
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "verified" in r.stdout and "relation merge/linear reproduced" in r.stdout


def test_verify_explains_changed_conclusions(rio_report, tmp_path):
    doc = json.loads(rio_report.to_json())
    doc["subjects"][0]["audit"]["parents"][0]["weight"] += 0.1
    doc["subjects"][0]["audit"]["relation"] = "finetune"
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(doc))
    r = cli("verify", p, "--json")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["status"] == "mismatch"
    msgs = {c["what"]: c["message"] for c in out["checks"] if not c["ok"]}
    assert "relation changed: recorded finetune/linear, now merge/linear" in msgs["relation"]
    assert "nex 0.7000 -> 0.6000" in msgs["weights"] and "tolerance 0.02" in msgs["weights"]
    assert cli("verify", p, "--tolerance", "0.2").exit_code == 1  # the relation still differs


def test_verify_explains_changed_and_missing_sources(corpus, tmp_path):
    from report_helpers import build_audit_report

    root = tmp_path / "models"
    rio = carded_copy(corpus, "m_linear_rio", root / "rio", RIO_CARD)
    nex = carded_copy(corpus, "ft_a1", root / "nex", NEX_CARD)
    qwen = carded_copy(corpus, "ft_a2", root / "qwen", QWEN_CARD)
    saved = _save(build_audit_report(rio, [nex, qwen]), tmp_path)
    _flip_data_byte(qwen / "model.safetensors")
    r = cli("verify", saved)
    assert r.exit_code == 1
    assert "DIFF rio: files: qwen: model.safetensors changed: SHA-256" in r.stdout
    assert "relation merge/linear reproduced" in r.stdout  # one byte does not change the conclusion
    (nex / "README.md").write_text("---\nlicense: mit\n---\n")
    import shutil

    shutil.rmtree(qwen)
    r = cli("verify", saved)
    assert r.exit_code == 1 and "Traceback" not in r.stdout + r.stderr
    assert "nex: README.md changed" in r.stdout and "qwen: " in r.stdout and "no longer exists" in r.stdout
    assert "could not re-run the check" in r.stdout


def test_verify_bad_report_is_one_line(rio_report, tmp_path):
    doc = json.loads(rio_report.to_json())
    doc["schema_version"] = "0.9"
    p = tmp_path / "old.json"
    p.write_text(json.dumps(doc))
    r = cli("verify", p)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "older than" in r.stderr


def test_sampled_fingerprint_of_large_files(tmp_path):
    """Files above 1 MiB that are not the suspect's get size + header + 16 sampled blocks: re-saves are caught."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [768, 1024], "data_offsets": [0, 768 * 1024 * 4]}}).encode()
    body = bytearray(hashlib.sha256(b"x").digest() * (768 * 1024 * 4 // 32))
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    old = local_file_evidence(path, path.name, full=False)
    assert old.sha256 is None and old.sample_sha256 and old.header_sha256
    assert describe_file_change(old, local_file_evidence(path, path.name, full=False)) is None
    data = bytearray(path.read_bytes())
    data[-10] ^= 1  # inside the last sampled block
    path.write_bytes(data)
    msg = describe_file_change(old, local_file_evidence(path, path.name, full=False))
    assert msg and "sampled blocks" in msg


def test_remote_evidence_ranges_and_verify(corpus, tmp_path, hub_server):  # noqa: F811
    root = tmp_path / "served"
    folders = {"org/rio": carded_copy(corpus, "m_linear_rio", root / "rio", RIO_CARD),
               "org/nex": carded_copy(corpus, "ft_a1", root / "nex", NEX_CARD),
               "org/qwen": carded_copy(corpus, "ft_a2", root / "qwen", QWEN_CARD)}
    hub_server(folders)
    out = tmp_path / "remote.json"
    r = cli("audit", "hf://org/rio", "-c", "hf://org/nex", "-c", "hf://org/qwen", "-o", out)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(out.read_text())
    s = doc["subjects"][0]
    assert s["audit"]["relation"] == "merge"
    assert {f["code"] for f in doc["findings"]} >= {"undisclosed-merge", "license-changed"}
    srcs = {x["label"]: x for x in s["evidence"]["sources"]}
    nex = srcs["org/nex"]
    assert nex["commit"] == commit_sha("org/nex", "main")
    local = (folders["org/nex"] / "model.safetensors").read_bytes()
    weights = next(f for f in nex["files"] if f["name"] == "model.safetensors")
    assert weights["lfs_sha256"] == hashlib.sha256(local).hexdigest()
    ranges = [x for x in nex["ranges"] if x["file"] == "model.safetensors"]
    assert ranges and sum(x["length"] for x in ranges) >= len(local) * 0.9
    for rg in ranges[:20]:
        assert rg["sha256"] == hashlib.sha256(local[rg["offset"]:rg["offset"] + rg["length"]]).hexdigest()
    # the ML-BOM gets a purl pinned to the commit
    bom = json.loads(cli("render", out, "-f", "cyclonedx").stdout)
    assert bom["metadata"]["component"]["purl"] == f"pkg:huggingface/org/rio@{commit_sha('org/rio', 'main')}"
    r = cli("verify", out)
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "byte ranges re-read with identical SHA-256" in r.stdout
    # the server now sends different bytes for the same commit: verify names the file and the byte range
    _flip_data_byte(folders["org/nex"] / "model.safetensors", 0.3)
    r = cli("verify", out)
    assert r.exit_code == 1
    assert "DIFF org/rio: remote: org/nex: bytes [" in r.stdout and "of model.safetensors differ" in r.stdout


def test_many_remote_ranges_are_grouped_into_blocks_and_still_localised():
    from modeltrace.report.evidence import compact_ranges, match_ranges

    digests = [("model.safetensors", i * 100, 100, f"{i:064x}") for i in range(10_000)]
    digests += [("config.json", 0, 50, "c" * 64), ("model.safetensors", 0, 100, f"{0:064x}")]  # a repeat
    listed = compact_ranges(digests, max_entries=1000)
    assert len(listed) <= 1001 and sum(e.count for e in listed) == 10_001
    assert all(m is not None and m == e.sha256 for e, m in match_ranges(listed, digests))
    changed = list(digests)
    changed[4321] = ("model.safetensors", 432_100, 100, "f" * 64)
    bad = [e for e, m in match_ranges(listed, changed) if m != e.sha256]
    assert len(bad) == 1 and bad[0].offset <= 432_100 < bad[0].offset + bad[0].length and bad[0].length <= 1100
    assert all(e.count == 1 for e in compact_ranges(digests[:50]))  # few ranges: listed one by one
