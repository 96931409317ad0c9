"""Open a checkpoint wherever it lives: `open_source(spec)` picks the reader for a path or `hf://` address.

Readers (one module each): safetensors files/folders/shards on any byte store, GGUF files, `hf://` Hub
repositories read by HTTP Range, and PyTorch pickles (refused unless explicitly allowed, then read without
running code).
"""

from __future__ import annotations

from pathlib import Path

from modeltrace.errors import InputError, RefusedError
from modeltrace.sources.base import DEFAULT_CHUNK_BYTES, FileInfo, ReadStats, Source, TensorInfo

__all__ = ["open_source", "Source", "TensorInfo", "FileInfo", "ReadStats", "DEFAULT_CHUNK_BYTES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle(path: Path) -> None:
    raise RefusedError(
        f"{path}: PyTorch pickle checkpoints can run arbitrary code when loaded; refusing. Convert to safetensors, "
        "or pass --allow-pickle to read it with modeltrace's restricted loader (it never executes code)"
    )


def open_source(spec: str | Path, allow_pickle: bool = False) -> Source:
    """Open `spec` (a folder, a .safetensors/.gguf/.bin file, or hf://owner/name[@rev]) for lazy reading."""
    text = str(spec)
    if text.startswith("hf://"):
        from modeltrace.sources.hub import open_hub

        return open_hub(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file():
        return _open_file(path, allow_pickle)
    if not path.is_dir():
        raise InputError(f"{path}: not a regular file or directory")
    return _open_dir(path, allow_pickle)


def _open_file(path: Path, allow_pickle: bool) -> Source:
    from modeltrace.sources.bytestore import LocalStore
    from modeltrace.sources.safetensors_source import SafetensorsSource

    name = path.name.lower()
    if name.endswith(".safetensors"):
        return SafetensorsSource(LocalStore(path.parent, ReadStats(), only=path.name), single_file=path.name)
    if name.endswith(".gguf"):
        from modeltrace.sources.gguf_remote import SPLIT_RE

        if SPLIT_RE.match(path.name):  # one part of a split set: the whole set
            return _open_gguf_set(path.parent, path.name)
        from modeltrace.sources.gguf_source import GGUFSource

        return GGUFSource(path)
    if name.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            _refuse_pickle(path)
        from modeltrace.sources.pickle_source import PickleSource

        return PickleSource(path)
    raise InputError(f"{path}: unknown checkpoint format (expected .safetensors, .gguf, or a model folder)")


def _open_dir(path: Path, allow_pickle: bool) -> Source:
    from modeltrace.sources.bytestore import LocalStore
    from modeltrace.sources.safetensors_source import INDEX_NAME, SafetensorsSource

    entries = [p.name for p in path.iterdir() if p.is_file()]
    if INDEX_NAME in entries or any(e.endswith(".safetensors") for e in entries):
        return SafetensorsSource(LocalStore(path, ReadStats()))
    ggufs = sorted(e for e in entries if e.endswith(".gguf"))
    if ggufs:
        from modeltrace.sources.gguf_remote import gguf_choices

        choices = gguf_choices(ggufs)
        if len(choices) == 1 and len(ggufs) == 1:
            from modeltrace.sources.gguf_source import GGUFSource

            return GGUFSource(path / ggufs[0])
        if len(choices) == 1:  # a split set
            return _open_gguf_set(path, None)
        raise InputError(f"{path}: holds {len(choices)} GGUF models ({', '.join(list(choices)[:8])}); name the one "
                         "to read (any part of a split set opens the whole set)")
    pickles = sorted(e for e in entries if e.endswith(PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            _refuse_pickle(path / pickles[0])
        from modeltrace.sources.pickle_source import PickleSource

        # the model's weights, not optimizer.pt / adapter_model.bin that may sort before them
        main = "pytorch_model.bin" if "pytorch_model.bin" in pickles else pickles[0]
        return PickleSource(path / main, folder=path)
    raise InputError(f"{path}: no model weights found (no .safetensors, .gguf or .bin files)")


def _open_gguf_set(folder: Path, file: str | None) -> Source:
    """A split GGUF set (`-00001-of-0000N.gguf` parts) in a local folder, read as one model through the reader hf://
    sets use (headers of every part, ranged reads); a missing part is a one-line error."""
    from modeltrace.sources.bytestore import LocalStore
    from modeltrace.sources.gguf_remote import open_gguf_repo

    names = [p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(".gguf")]
    return open_gguf_repo(LocalStore(folder, ReadStats()), names, file)
