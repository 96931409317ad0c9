"""Where a Hugging Face Hub model is: `hf://` addresses, the endpoint and offline switch, and the on-disk cache.

Data flow: `parse_spec_file(spec)` turns `hf://owner/name[@revision][/FILE.gguf]` into (repo id, revision, GGUF
file), refusing anything else with one InputError; `HubStore` and `open_hub` (hub.py) then read the endpoint
(`_endpoint`: `HF_ENDPOINT` at call time, else huggingface_hub's), the offline switch (`_offline`: `HF_HUB_OFFLINE` /
`TRANSFORMERS_OFFLINE` at call time) and the client version for their headers, and cache header reads under
`cache_root()` (`MODELTRACE_CACHE`, default ~/.cache/modeltrace) with `_write_atomic`, best effort.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import constants

from modeltrace.errors import InputError

__all__ = ["DEFAULT_REVISION", "cache_root", "parse_spec", "parse_spec_file"]


DEFAULT_REVISION = "main"


_SEGMENT = r"[A-Za-z0-9_.\-]{1,96}"
_REPO_RE = re.compile(rf"^(?:{_SEGMENT}/)?{_SEGMENT}$")


def parse_spec(spec: str) -> tuple[str, str]:
    """`hf://owner/name[@revision]` -> (repo_id, revision); InputError on anything else. A GGUF file selector
    (`hf://owner/name/FILE.gguf`, see `parse_spec_file`) is accepted and left out."""
    repo_id, revision, _ = parse_spec_file(spec)
    return repo_id, revision


def parse_spec_file(spec: str) -> tuple[str, str, str | None]:
    """`hf://owner/name[@revision][/path/FILE.gguf]` or `hf://owner/name/path/FILE.gguf[@revision]` ->
    (repo_id, revision, the GGUF file or None). With `@`, the revision is one path segment (`refs/pr/N` and
    `refs/convert/X`: three) and what follows it, ending in `.gguf`, is the file."""
    usage = f"{spec}: expected hf://owner/name, hf://owner/name@revision or hf://owner/name/FILE.gguf"
    if not spec.startswith("hf://"):
        raise InputError(usage)
    body = spec[len("hf://"):].strip().rstrip("/")
    repo_id, sep, revision = body.partition("@")
    file = None
    parts = repo_id.split("/")
    if len(parts) > 2 and parts[-1].lower().endswith(".gguf"):
        repo_id, file = "/".join(parts[:2]), "/".join(parts[2:])
    elif sep and revision.lower().endswith(".gguf") and "/" in revision:
        segs = revision.split("/")
        k = 3 if segs[0] == "refs" and len(segs) > 3 else 1
        revision, file = "/".join(segs[:k]), "/".join(segs[k:])
    if sep and not revision:
        raise InputError(f"{spec}: empty revision after '@'")
    revision = revision or DEFAULT_REVISION
    if not _REPO_RE.match(repo_id) or any(
        p.startswith(("-", ".")) or p.endswith(("-", ".")) or "--" in p or ".." in p for p in repo_id.split("/")
    ):
        raise InputError(usage)
    if any(c.isspace() or ord(c) < 32 for c in revision) or ".." in revision or revision.startswith("/"):
        raise InputError(f"{spec}: invalid revision {revision!r}")
    if file is not None and (any(p in ("", ".", "..") for p in file.split("/")) or "\\" in file
                             or any(c.isspace() or ord(c) < 32 for c in file)):
        raise InputError(f"{spec}: invalid file name {file!r}")
    return repo_id, revision, file


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return constants.is_offline_mode()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("modeltrace")
    except Exception:
        return "unknown"


def cache_root() -> Path:
    raw = os.environ.get("MODELTRACE_CACHE")
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "modeltrace"


def _write_atomic(path: Path, data: bytes) -> None:
    """Best effort: a cache that cannot be written only costs a refetch."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError:
        pass
