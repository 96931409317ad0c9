"""The evidence bundle: enough about every source, as it was when read, for `modeltrace verify` to re-check a report.

Hashing policy (measured: SHA-256 runs at ~1.2 GB/s on one core here, the audit reads at ~1.9 GB/s for three
models, so hashing every byte of every model would add ~60% to an audit):

- the suspect's local weight files get a full SHA-256: it is the identity of the thing reported on (the SBOM needs it)
  and only 1/(candidates+1) of the bytes the audit streamed, still in the page cache;
- candidates' and the base's local weight files get a *sampled* fingerprint: size, SHA-256 of the safetensors header
  (names, dtypes, shapes, offsets) and SHA-256 over 16 blocks of 64 KiB spread over the file (1 MiB read per file).
  Any re-save, re-quantisation or shard change alters the header or the blocks; `--hashes` hashes them in full too;
- small metadata files (config, tokenizer, card, shard index) are always hashed in full;
- hf:// sources cost no extra reads: the Hub's own LFS SHA-256 from the listing, the commit the reads were pinned to,
  and every byte range read with its SHA-256 (hashed as it arrived; network time dwarfs hashing). Up to 4096 ranges
  per source are listed one by one; more are grouped into blocks of consecutive ranges with one digest each.
"""

from __future__ import annotations

import hashlib
import struct
import time
from pathlib import Path

from modeltrace.report.model import Evidence, FileEvidence, RangeEvidence, SourceEvidence
from modeltrace.sources.base import Source

SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 64 * 1024
#: remote ranges listed one by one up to this many per source; beyond, blocks of consecutive ranges
MAX_RANGE_ENTRIES = 4096
METADATA_FILES = ("config.json", "generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.txt", "merges.txt", "vocab.json",
                  "model.safetensors.index.json", "pytorch_model.bin.index.json")
HASHING = ("suspect weight files: full SHA-256 (local); other local weight files: size, SHA-256 of the safetensors "
           f"header and of {SAMPLE_BLOCKS} blocks of {SAMPLE_BLOCK_BYTES // 1024} KiB spread over the file "
           "(full with --hashes); metadata files: full SHA-256; hf:// sources: the Hub's LFS SHA-256, the pinned "
           "commit and the SHA-256 of every byte range read")
SEEDS = {"layer_map_rows": "derived from each tensor's shape (sha256 of 'ROWSxCOLS'); no other randomness",
         "sample_rows": "deterministic: evenly spread contiguous blocks"}


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def header_sha256(path: Path) -> str | None:
    """SHA-256 of a safetensors file's 8-byte length and JSON header; None when it is not one."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 1024 * 1024:
            return None
        return hashlib.sha256(head + f.read(n)).hexdigest()


def sample_sha256(path: Path, size: int) -> str:
    """SHA-256 over SAMPLE_BLOCKS blocks at evenly spread offsets (offsets included, so moved data differs)."""
    h = hashlib.sha256()
    last = max(0, size - SAMPLE_BLOCK_BYTES)
    offsets = sorted({round(i * last / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)})
    with path.open("rb") as f:
        for off in offsets:
            f.seek(off)
            h.update(struct.pack("<Q", off))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def local_file_evidence(path: Path, name: str, full: bool) -> FileEvidence:
    if not path.is_file():
        return FileEvidence(name=name)
    size = path.stat().st_size
    small = size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES
    ev = FileEvidence(name=name, size=size)
    if name.endswith(".safetensors"):
        ev.header_sha256 = header_sha256(path)
    if full or small or not _is_weight(name):
        ev.sha256 = sha256_file(path)
    else:
        ev.sample_sha256 = sample_sha256(path, size)
    return ev


def _unique(digests: list[tuple[str, int, int, str]]) -> dict[str, list[tuple[int, int, str]]]:
    """Per file, each (offset, length) once (a range served twice, e.g. a header from the cache), by offset."""
    seen: dict[tuple[str, int, int], str] = {}
    for f, o, n, h in digests:
        seen.setdefault((f, o, n), h)
    out: dict[str, list[tuple[int, int, str]]] = {}
    for (f, o, n), h in sorted(seen.items()):
        out.setdefault(f, []).append((o, n, h))
    return out


def block_digest(members: list[tuple[int, int, str]]) -> str:
    return hashlib.sha256("".join(f"{o}:{n}:{h}\n" for o, n, h in members).encode()).hexdigest()


def compact_ranges(digests: list[tuple[str, int, int, str]], max_entries: int = MAX_RANGE_ENTRIES
                   ) -> list[RangeEvidence]:
    """Every range with its hash while there are at most `max_entries`; beyond that, blocks of consecutive ranges
    of one file (a full remote audit of a 400B model reads ~10^6 ranges: ~240 MB of JSON listed one by one)."""
    files = _unique(digests)
    total = sum(len(v) for v in files.values())
    group = max(1, -(-total // max_entries))
    out = []
    for f, ranges in files.items():
        for i in range(0, len(ranges), group):
            members = ranges[i:i + group]
            o0 = members[0][0]
            end = max(o + n for o, n, _ in members)
            sha = members[0][2] if len(members) == 1 else block_digest(members)
            out.append(RangeEvidence(file=f, offset=o0, length=end - o0, sha256=sha, count=len(members)))
    return out


def match_ranges(recorded: list[RangeEvidence], digests: list[tuple[str, int, int, str]]
                 ) -> list[tuple[RangeEvidence, str | None]]:
    """Pair each recorded range (or block) with the hash the same bytes have now; None when the re-run did not read
    exactly those ranges (a different read plan)."""
    files = _unique(digests)
    out = []
    for e in recorded:
        members = [m for m in files.get(e.file, []) if e.offset <= m[0] < e.offset + e.length]
        if e.count == 1:
            hit = [m for m in members if m[0] == e.offset and m[1] == e.length]
            out.append((e, hit[0][2] if hit else None))
        else:
            out.append((e, block_digest(members) if len(members) == e.count else None))
    return out


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt"))


def _local_root(spec: str) -> tuple[Path, str | None]:
    path = Path(spec).expanduser()
    return (path.parent, path.name) if path.is_file() else (path, None)


def weight_files(source: Source) -> list[str]:
    return sorted({t.file for t in source.tensors().values()})


def source_evidence(label: str, role: str, spec: str, source: Source, full: bool = False) -> SourceEvidence:
    """What `source` was when read. `source` may already be closed: only cached listings and stats are used, local
    files are hashed from disk, remote ones are never re-read."""
    ev = SourceEvidence(label=label, role=role, spec=spec, location=source.location, format=source.format,
                        bytes_read=source.stats.bytes_read)
    store = getattr(source, "store", None)
    if spec.startswith("hf://") and store is not None:
        ev.revision = getattr(store, "revision", None)
        ev.commit = getattr(store, "sha", None)
        lfs = getattr(store, "lfs_sha256", {})
        sizes = {f.name: f.size for f in source.files()}
        names = weight_files(source) + [n for n in METADATA_FILES if n in sizes]
        ev.files = [FileEvidence(name=n, size=sizes.get(n), lfs_sha256=lfs.get(n)) for n in names]
        ev.ranges = compact_ranges(source.stats.digests)
        return ev
    root, only = _local_root(spec)
    names = weight_files(source) if only is None else [only]
    if only is None:
        names += [n for n in METADATA_FILES if (root / n).is_file() and n not in names]
    ev.files = [local_file_evidence(root / n, n, full=full) for n in names]
    return ev


def collect(entries: list[tuple[str, str, str, Source, bool]], parameters: dict,
            seeds: dict | None = None) -> Evidence:
    """Evidence for (label, role, spec, source, hash weights in full) entries."""
    t0 = time.perf_counter()
    sources = [source_evidence(label, role, spec, src, full=full) for label, role, spec, src, full in entries]
    return Evidence(parameters=parameters, seeds={**SEEDS, **(seeds or {})}, hashing=HASHING,
                    hash_seconds=round(time.perf_counter() - t0, 3), sources=sources)


def describe_file_change(old: FileEvidence, new: FileEvidence) -> str | None:
    """One sentence on how a file differs from its recorded evidence, or None when nothing recorded differs."""
    if new.size is None and old.size is not None:
        return f"{old.name} is gone"
    for key, what in (("size", "size"), ("sha256", "SHA-256"), ("lfs_sha256", "Hub SHA-256"),
                      ("header_sha256", "header (names, dtypes, shapes)"), ("sample_sha256", "sampled blocks")):
        a, b = getattr(old, key), getattr(new, key)
        if a is not None and b is not None and a != b:
            shown = f"{a} -> {b}" if key == "size" else f"{str(a)[:12]}... -> {str(b)[:12]}..."
            return f"{old.name} changed: {what} {shown}"
    return None
