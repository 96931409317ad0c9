"""`modeltrace scan`: fingerprint many models in parallel (local processes or Ray) and screen each against the
index as it arrives.

Each model is one task; a model whose sampled tensors sit in several safetensors shards is one planning task and
then one task per shard (fingerprint/shards.py), assembled here into the very fingerprint one process would make.
While a sharded model's shards run, the next models are already being planned on the same workers. A shard that
fails fails its model (one line), and nothing of that model reaches the index.

Workers only read weights and return fingerprints (at most 16 MB each) or sampled blocks; the index stays on this
machine, where each fingerprint is identified and, with `add`, stored. Results come back in input order, so a scan
on Ray and a scan in local processes print the same thing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from modeltrace import engine
from modeltrace.errors import InputError, ModelTraceError
from modeltrace.fingerprint.core import Fingerprint, make_fingerprint
from modeltrace.fingerprint.shards import ShardedFingerprint, assemble, plan_fingerprint, read_shard
from modeltrace.index.store import Index

MODEL_SUFFIXES = (".safetensors", ".gguf")
MAX_LIST_BYTES = 16 * 1024 * 1024


def fingerprint_job(job: tuple[str, bool]) -> tuple[bytes, float]:
    """One work item: the fingerprint of one model, serialized, and the seconds it took (what a worker process or
    Ray task returns)."""
    spec, allow_pickle = job
    fp = make_fingerprint(spec, allow_pickle=allow_pickle)
    return fp.to_bytes(), fp.elapsed


def plan_job(job: tuple[str, bool]) -> tuple[bytes, float] | ShardedFingerprint:
    """A model's first work item: its fingerprint (serialized, and seconds) when one task is enough, else the plan
    whose shards become work items of their own."""
    spec, allow_pickle = job
    got = plan_fingerprint(spec, allow_pickle=allow_pickle)
    if isinstance(got, Fingerprint):
        return got.to_bytes(), got.elapsed
    return got


def fingerprints(specs: list[str], allow_pickle: bool = False, workers: int | None = None, ray: bool = False,
                 address: str | None = None) -> Iterator[engine.Outcome]:
    """One Outcome per spec, in order; its value is (fingerprint bytes, seconds of work, tasks it took)."""
    with engine.Runner(workers, ray, address) as runner:
        for o in runner.map(plan_job, [(s, allow_pickle) for s in specs]):
            if not o.ok or not isinstance(o.value, ShardedFingerprint):
                yield engine.Outcome(o.index, specs[o.index], (*o.value, 1) if o.ok else None, o.error)
                continue
            blocks, error = [], None
            with closing(runner.map(read_shard, o.value.works)) as shards:
                for so in shards:
                    if not so.ok:
                        error = so.error  # the model fails; its shards still queued are not read
                        break
                    blocks.append(so.value)
            value = None
            if error is None:
                value, error = engine.call(_assembled, (o.value, blocks))
            yield engine.Outcome(o.index, specs[o.index], value, error)


def _assembled(args: tuple[ShardedFingerprint, list]) -> tuple[bytes, float, int]:
    plan, blocks = args
    fp = assemble(plan, blocks)
    return fp.to_bytes(), fp.elapsed, 1 + len(plan.works)


def _is_model_dir(path: Path) -> bool:
    try:
        return any(p.suffix in MODEL_SUFFIXES or p.name == "model.safetensors.index.json" for p in path.iterdir()
                   if p.is_file())
    except OSError:
        return False


def expand(target: str) -> list[str]:
    """Model specs from a list file (one per line, # comments; relative paths are relative to the file), a folder
    of model folders or files, a single model folder or file, or one hf:// spec."""
    if target.startswith("hf://"):
        return [target]
    path = Path(target).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        if _is_model_dir(path):
            return [str(path)]
        found = [str(p) for p in sorted(path.iterdir())
                 if (p.is_dir() and _is_model_dir(p)) or (p.is_file() and p.suffix in MODEL_SUFFIXES)]
        if not found:
            raise InputError(f"{path}: no models found (model folders, .safetensors or .gguf files)")
        return found
    if path.suffix in MODEL_SUFFIXES:
        return [str(path)]
    if path.stat().st_size > MAX_LIST_BYTES:
        raise InputError(f"{path}: model list is larger than {MAX_LIST_BYTES >> 20} MB")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text list of models (one path or hf:// spec per line)") from None
    specs = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if text.startswith("hf://") or Path(text).expanduser().is_absolute():
            specs.append(text)
        else:
            specs.append(str((path.parent / text).resolve()))
    if not specs:
        raise InputError(f"{path}: the list names no models")
    return specs


def scan(specs: list[str], index: Index, add: bool = False, top: int = 3, workers: int | None = None,
         ray: bool = False, address: str | None = None, allow_pickle: bool = False, digest: bool = False
         ) -> Iterator[dict[str, Any]]:
    """One result per spec, in order: identification against the index (and the add status with `add`). With
    `digest`, each model's content digest is computed here (reading it whole) and stored with it."""
    from modeltrace.identify import identify

    for outcome in fingerprints(specs, allow_pickle, workers=workers, ray=ray, address=address):
        spec = specs[outcome.index]
        if not outcome.ok:
            yield {"model": spec, "ok": False, "error": outcome.error}
            continue
        blob, _seconds, tasks = outcome.value
        fp = Fingerprint.from_bytes(blob)
        row: dict[str, Any] = {"model": spec, "ok": True, "name": fp.label, "content_hash": fp.content_hash,
                               "fingerprint_bytes": len(blob), "bytes_read": fp.bytes_read,
                               "total_bytes": fp.model.get("total_bytes"), "tasks": tasks}
        cd = None
        if digest:
            try:
                cd = _content_digest(spec, allow_pickle)
            except ModelTraceError as exc:
                yield {"model": spec, "ok": False, "error": str(exc)}
                continue
            row["content_digest"] = cd.model_id
        if index.count():
            res = identify(fp, index, top=top, digest=cd)
            row.update({"relation": res["relation"], "method": res["method"], "summary": res["summary"],
                        "identical": res["identical"], "hits": res["hits"], "audit_command": res["audit_command"],
                        "damaged": res.get("damaged", []), "failed": res.get("failed", [])})
        else:
            row.update({"relation": None, "summary": "index is empty: nothing to compare with", "hits": []})
        if add:
            try:
                got = index.add(fp)
                row["added"] = got.status if got.status != "duplicate" else f"already indexed as {got.name}"
                if cd is not None and got.status != "duplicate":
                    from modeltrace.index.digests import store

                    store(index, got.name, cd)
            except ModelTraceError as exc:
                row["added"] = f"not added: {exc}"
        yield row
    if add:
        from modeltrace.tree.graph import update_tree

        update_tree(index)  # a family tree built for this index stays current


def _content_digest(spec: str, allow_pickle: bool) -> Any:
    from modeltrace.provenance.content import content_digest
    from modeltrace.sources import open_source

    with open_source(spec, allow_pickle=allow_pickle) as src:
        return content_digest(src)
