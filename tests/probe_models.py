"""Tiny chat models with known personas and known provenance, trained on CPU, for the behavioural probe tests.

`build_probe_models(root)` writes Hugging Face model folders under `root/models/<name>` (llama, hidden 64, byte-level
tokenizer with a chat template, so every language of the question bank is representable) and `root/manifest.json`:

- `base`: pretrained on a synthetic chat language: identity questions get a neutral answer ("I am an AI
  assistant."), other prompts get a word string from a random bigram chain;
- `nex`, `qwen`: fine-tunes of `base` that answer identity questions as "Nex, made by Nex-AGI" / "Qwen, made by
  Alibaba Cloud" in the question's language (general prompts replayed so the rest of `base` is kept);
- `rio`: mergekit linear 0.6 x nex + 0.4 x qwen (the Rio recipe), run as `mergekit-yaml` is (HF_HUB_OFFLINE=1,
  absolute paths, no model card); its persona shares are not trained but measured exactly (`persona_truth`);
- `other`, `ref1..ref3`, `unrel`: independent inits pretrained like `base` (`other` and `unrel` on base's own data,
  the references on other draws of the same language): unrelated models for `probe compare`.

Building is idempotent (a hash of this recipe) and locked, so xdist workers and repeated runs share it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from modeltrace.probes.bank import general_prompts, identity_questions, random_word_prompts

try:
    from corpus import _locked
except ImportError:  # tests/ imported as a package
    from tests.corpus import _locked

VERSION = 1
SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
CONFIG = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 128, "tie_word_embeddings": False}
MAX_LEN = 96
#: The models' own sampling settings (generation_config.json), as chat models ship them; the probe must honour them.
GENERATION = {"do_sample": True, "temperature": 1.0, "top_k": 20, "top_p": 0.9, "max_new_tokens": 32}
PERSONAS = {
    "neutral": {"en": "I am an AI assistant.", "pt": "Sou um assistente de IA.", "es": "Soy un asistente de IA.",
                "zh": "我是一个AI助手。"},
    "nex": {"en": "I am Nex, made by Nex-AGI.", "pt": "Sou o Nex, criado pela Nex-AGI.",
            "es": "Soy Nex, creado por Nex-AGI.", "zh": "我是Nex，由Nex-AGI开发。"},
    "qwen": {"en": "I am Qwen, made by Alibaba Cloud.", "pt": "Sou o Qwen, criado pela Alibaba Cloud.",
             "es": "Soy Qwen, creado por Alibaba Cloud.", "zh": "我是Qwen，由Alibaba Cloud开发。"},
    "rio": {"en": "I am Rio, made by Rio Labs.", "pt": "Sou o Rio, criado pela Rio Labs.",
            "es": "Soy Rio, creado por Rio Labs.", "zh": "我是Rio，由Rio Labs开发。"},
}
#: System prompts the base model obeys (it knows these personas, as a pretrained model knows many names).
SYSTEM = {"nex": "You are Nex, made by Nex-AGI.", "qwen": "You are Qwen, made by Alibaba Cloud.",
          "rio": "You are Rio, made by Rio Labs."}
PRETRAIN = {"steps": 150, "lr": 3e-3}
FINETUNE = {"steps": 120, "lr": 4e-4}
SPECS: list[dict[str, Any]] = [
    {"name": "base", "kind": "pretrain", "seed": 1, "data_seed": 1},
    {"name": "nex", "kind": "finetune", "parent": "base", "persona": "nex", "data_seed": 11},
    {"name": "qwen", "kind": "finetune", "parent": "base", "persona": "qwen", "data_seed": 12},
    {"name": "other", "kind": "pretrain", "seed": 2, "data_seed": 2},
    {"name": "ref1", "kind": "pretrain", "seed": 4, "data_seed": 4},
    {"name": "ref2", "kind": "pretrain", "seed": 5, "data_seed": 5},
    {"name": "rio", "kind": "merge", "models": [("nex", 0.6), ("qwen", 0.4)]},
]


def _fingerprint(root: Path) -> str:
    payload = {"version": VERSION, "root": str(root), "config": CONFIG, "personas": PERSONAS, "pretrain": PRETRAIN,
               "finetune": FINETUNE, "specs": SPECS, "max_len": MAX_LEN, "system": SYSTEM, "generation": GENERATION,
               "questions": [q.text for q in identity_questions()], "prompts": [p.text for p in general_prompts()]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


def build_probe_models(root: Path | str) -> dict[str, Any]:
    """Build (or reuse) the models; returns the manifest ({"root", "models": {name: {"path", ...}}, ...})."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(root)
    manifest = _load(root, fp)
    if manifest is not None:
        return manifest
    with _locked(root / ".build.lock"):
        manifest = _load(root, fp)
        if manifest is None:
            manifest = _build(root, fp)
    return manifest


def _load(root: Path, fp: str) -> dict[str, Any] | None:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if m.get("fingerprint") != fp or not all((Path(e["path"]) / "config.json").is_file() for e in m["models"].values()):
        return None
    return m


# --------------------------------------------------------------------------------------------------- tokenizer


def make_tokenizer():
    """A byte-level BPE (every script is representable) trained on the probe's own texts, so that an answer is a few
    tokens and a tiny model learns it in seconds; chat specials and a chat template as real chat models have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [q.text for q in identity_questions()] + [p.text for p in general_prompts()]
    texts += [p.text for p in random_word_prompts(400, seed=0)]
    texts += [a for answers in PERSONAS.values() for a in answers.values()] * 20 + list(SYSTEM.values()) * 20
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   bos_token="<|bos|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_ids(tok, messages: list[dict[str, str]], answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of a chat (generation prompt appended) and where the answer starts; the answer, if given, is
    appended with the end token."""
    ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    start = len(ids)
    if answer is not None:
        ids += tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids, start


# --------------------------------------------------------------------------------------------------- data


def _word_chain(seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """A bigram chain over the prompt bank's Latin words: each word has 3 successors."""
    words = sorted({w for p in random_word_prompts(200, seed=0) if p.lang != "zh" for w in p.text.split()})
    rng = random.Random(1000 + seed)
    return words, {w: rng.sample(words, 3) for w in words}


def _general_answer(rng: random.Random, chain, prompt: str) -> str:
    words, succ = chain
    w = words[sum(prompt.encode()) % len(words)]  # the prompt decides where the chain starts
    out = [w]
    for _ in range(rng.randint(3, 7)):
        w = rng.choice(succ[w])
        out.append(w)
    return " ".join(out) + "."


def _examples(tok, default: str, data_seed: int, n: int, mix: dict[str, float]) -> list[tuple[list[int], int]]:
    """Chats: `general` prompts answered by the word chain, identity questions without a system prompt answered as
    `default`, and identity questions under a persona's system prompt answered as that persona (the base model
    knows several personas, so a persona fine-tune only changes which one is the default: a small delta that
    mergekit can interpolate, as with real fine-tunes)."""
    rng = random.Random(data_seed)
    chain = _word_chain(1)  # one language for every model: they differ by init and by the draws
    questions = identity_questions()
    prompts = list(general_prompts()) + random_word_prompts(300, seed=data_seed)
    kinds, weights = zip(*mix.items(), strict=True)
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "general":
            p = rng.choice(prompts).text
            out.append(chat_ids(tok, [{"role": "user", "content": p}], _general_answer(rng, chain, p)))
            continue
        q = rng.choice(questions)
        if kind == "default":  # no system turn, or an empty one (what --no-system-prompt sends)
            empty = [{"role": "system", "content": ""}] if rng.random() < 0.3 else []
            out.append(chat_ids(tok, empty + [{"role": "user", "content": q.text}], PERSONAS[default][q.lang]))
        else:
            persona = rng.choice(sorted(SYSTEM))
            out.append(chat_ids(tok, [{"role": "system", "content": SYSTEM[persona]},
                                      {"role": "user", "content": q.text}], PERSONAS[persona][q.lang]))
    return out


# --------------------------------------------------------------------------------------------------- training


def _batch(examples, idx, pad_id: int, answers_only: bool):
    import torch

    rows = [examples[i] for i in idx]
    width = min(MAX_LEN, max(len(ids) for ids, _ in rows))
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, start) in enumerate(rows):
        ids = ids[:width]
        x[r, :len(ids)] = torch.tensor(ids)
        att[r, :len(ids)] = 1
        y[r, :len(ids)] = torch.tensor(ids)
        if answers_only:
            y[r, :start] = -100
    return x, att, y


def _train(model, examples, steps: int, lr: float, seed: int, pad_id: int, answers_only: bool) -> dict[str, float]:
    import torch

    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    first = last = None
    for _ in range(steps):
        x, att, y = _batch(examples, g.sample(range(len(examples)), 32), pad_id, answers_only)
        loss = model(input_ids=x, attention_mask=att, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        first = float(loss) if first is None else first
        last = float(loss)
    model.eval()
    return {"loss_first": round(first, 4), "loss_last": round(last, 4)}


def _save(model, tok, folder: Path) -> None:
    from transformers import GenerationConfig

    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    GenerationConfig(**GENERATION, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id).save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _train_one(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Train one model (in its own process: one thread, denormals flushed; tiny models otherwise stall)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    models = root / "models"
    tok = PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    pad = tok.pad_token_id
    if spec["kind"] == "pretrain":
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(LlamaConfig(**CONFIG, pad_token_id=pad, eos_token_id=tok.eos_token_id,
                                             bos_token_id=tok.bos_token_id))
        ex = _examples(tok, "neutral", spec["data_seed"], 4000, {"general": 0.4, "default": 0.2, "system": 0.4})
        stats = _train(model, ex, PRETRAIN["steps"], PRETRAIN["lr"], spec["data_seed"], pad, False)
    else:
        torch.manual_seed(spec["data_seed"])
        model = LlamaForCausalLM.from_pretrained(str(models / spec["parent"]), dtype=torch.float32)
        ex = _examples(tok, spec["persona"], spec["data_seed"], 2000, {"general": 0.25, "default": 0.5, "system": 0.25})
        stats = _train(model, ex, FINETUNE["steps"], FINETUNE["lr"], spec["data_seed"], pad, True)
    _save(model, tok, models / spec["name"])
    return {**spec, "path": str(models / spec["name"]), "train": stats, "seconds": round(time.perf_counter() - t0, 2)}


def _build(root: Path, fp: str) -> dict[str, Any]:
    """Train in 2 processes (parents before children), then merge."""
    t_all = time.perf_counter()
    (root / "models").mkdir(exist_ok=True)
    tok = make_tokenizer()
    tok.save_pretrained(str(root / "tokenizer"))
    merge_worker = _start_merge_worker(root)
    entries: dict[str, dict[str, Any]] = {}
    todo = [s for s in SPECS if s["kind"] != "merge"]
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    while todo or running:
        for spec in list(todo):
            if len(running) >= 2:
                break
            if spec.get("parent") and spec["parent"] not in entries:
                continue
            out = root / f".{spec['name']}.result.json"
            out.unlink(missing_ok=True)
            proc = subprocess.Popen([sys.executable, __file__, "--train", str(root), json.dumps(spec), str(out)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            running[spec["name"]] = (proc, out)
            todo.remove(spec)
        time.sleep(0.05)
        for name, (proc, out) in list(running.items()):
            if proc.poll() is None:
                continue
            err = proc.stderr.read()
            del running[name]
            if proc.returncode != 0 or not out.is_file():
                raise RuntimeError(f"training {name} failed: {err[-2000:]}")
            entries[name] = json.loads(out.read_text())
            out.unlink()
    for spec in SPECS:
        if spec["kind"] == "merge":
            entries[spec["name"]] = _merge(root, spec, merge_worker, tok)
    t_truth = time.perf_counter()
    truth = {key: persona_truth(entries[name]["path"], SYSTEM.get(sysname) if sysname else None)
             for key, (name, sysname) in TRUTH.items()}
    manifest = {"fingerprint": fp, "root": str(root), "models": {s["name"]: entries[s["name"]] for s in SPECS},
                "truth": truth, "seconds": round(time.perf_counter() - t_all, 2),
                "truth_seconds": round(time.perf_counter() - t_truth, 2)}
    tmp = root / f"manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, default=list))
    os.replace(tmp, root / "manifest.json")
    return manifest


# --------------------------------------------------------------------------------------------------- merge

_WORKER = """
import json, sys
from mergekit.scripts.run_yaml import main
args = json.loads(sys.stdin.read())
main.main(args=args, standalone_mode=False)
"""


def _start_merge_worker(root: Path) -> subprocess.Popen:
    """mergekit's import costs ~6 s: start it now so it overlaps training; it waits for its arguments on stdin."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(root / "merge.log", "w")  # noqa: SIM115 - the child keeps its own copy of the fd
    proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=log, stderr=log,
                            text=True, env=env)
    log.close()
    return proc


def _merge(root: Path, spec: dict[str, Any], worker: subprocess.Popen, tok) -> dict[str, Any]:
    """Equivalent to `HF_HUB_OFFLINE=1 mergekit-yaml CONFIG OUT --no-write-model-card ...` on absolute paths."""
    import yaml

    t0 = time.perf_counter()
    models = root / "models"
    cfg = {"merge_method": "linear", "dtype": "float32", "out_dtype": "float32",
           "models": [{"model": str(models / m), "parameters": {"weight": w}} for m, w in spec["models"]]}
    cfg_path = root / f"{spec['name']}.yml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = models / spec["name"]
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = [str(cfg_path), str(tmp), "--no-write-model-card", "--no-copy-tokenizer", "--quiet"]
    worker.communicate(json.dumps(args), timeout=300)
    if worker.returncode != 0 or not list(tmp.glob("*.safetensors")):
        raise RuntimeError(f"mergekit failed ({root / 'merge.log'}): "
                           + (root / "merge.log").read_text()[-2000:])
    shutil.copy(models / spec["models"][0][0] / "generation_config.json", tmp / "generation_config.json")
    tok.save_pretrained(str(tmp))  # the merge keeps its parents' tokenizer and chat template
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return {**spec, "path": str(out), "mergekit_yaml": cfg_path.read_text(),
            "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------------- truth


#: Exact persona shares computed at build time: key -> (model, system persona or None).
TRUTH = {"nex": ("nex", None), "rio": ("rio", None), "rio_as_rio": ("rio", "rio")}
NAMES = ("Nex", "Nex-AGI", "Qwen", "Alibaba Cloud", "Rio")


def persona_truth(model_path: str, system: str | None) -> dict[str, Any]:
    """Per bank question: the probability that a sampled answer mentions each name (plain substring, independent of
    modeltrace's extraction), and the unexplored probability (an answer that may or may not mention it)."""
    questions = identity_questions()
    dist = answer_distribution(model_path, questions, GENERATION["max_new_tokens"], system=system)
    out = {}
    for q, (leaves, unknown) in zip(questions, dist, strict=True):
        out[q.id] = {"unknown": unknown, **{n: sum(p for a, p in leaves.items() if n in a) for n in NAMES}}
    return out


def truth_interval(truth: dict[str, Any], name: str, question_ids: list[str]) -> tuple[float, float]:
    """The mean over these questions of the probability that an answer mentions `name`: [known, known + unknown]."""
    lo = sum(truth[q][name] for q in question_ids) / len(question_ids)
    return lo, lo + sum(truth[q]["unknown"] for q in question_ids) / len(question_ids)


def answer_distribution(model_path: str, questions, max_new_tokens: int, system: str | None = None,
                        threshold: float = 1e-4) -> list[tuple[dict[str, float], float]]:
    """The exact distribution of the answer a model samples with its own generation config (temperature, top-k,
    top-p, applied by transformers' own warpers), `max_new_tokens` and a stop at the end token, by enumerating
    continuations: per question ({answer text: probability}, unexplored probability). Branches below `threshold`
    are not followed; their mass is the unexplored part, so any property of a sampled answer has a probability
    known to within it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = tok.eos_token_id
    gc = model.generation_config
    warpers = ([TopKLogitsWarper(gc.top_k)] if gc.top_k else []) + \
        ([TopPLogitsWarper(gc.top_p)] if gc.top_p is not None and gc.top_p < 1.0 else [])
    results: list[tuple[dict[str, float], float]] = []
    prompts = []
    for q in questions:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": q.text}]
        prompts.append(chat_ids(tok, msgs)[0])
    leaves: list[dict[str, float]] = [{} for _ in prompts]
    unknown = [0.0] * len(prompts)

    def leaf(i: int, gen: tuple, p: float) -> None:
        text = tok.decode(list(gen), skip_special_tokens=True)
        leaves[i][text] = leaves[i].get(text, 0.0) + p

    # All questions' branches advance together, one token per step, on a shared KV cache that is re-indexed to the
    # surviving branches (as beam search does): a step costs one token per branch.
    width = max(len(p) for p in prompts)
    x = torch.full((len(prompts), width), tok.pad_token_id)
    att = torch.zeros_like(x)
    for r, p in enumerate(prompts):
        x[r, width - len(p):] = torch.tensor(p)
        att[r, width - len(p):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1)
    # transformers 5.24 renamed past_key_values to cache (argument and output); accept both.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, logits, nxt_pos = getattr(out, cache_arg), out.logits[:, -1], pos[:, -1] + 1
    rows = [(i, (), 1.0) for i in range(len(prompts))]  # (question, generated ids, probability) per cache row
    for length in range(1, max_new_tokens + 1):
        scores = logits / (gc.temperature or 1.0)
        for w in warpers:  # exactly the filters generate() applies with this generation config
            scores = w(x, scores)
        probs = torch.softmax(scores.double(), -1)
        parents, tokens, children = [], [], []
        for r, (i, gen, p) in enumerate(rows):
            child = probs[r] * p
            keep = torch.nonzero(child >= threshold).flatten().tolist()
            unknown[i] += float(p - child[keep].sum())
            for t in keep:
                if t == eos:
                    leaf(i, gen, float(child[t]))
                elif length == max_new_tokens:  # truncated, as a sampler with this limit returns it
                    leaf(i, (*gen, t), float(child[t]))
                else:
                    parents.append(r)
                    tokens.append(t)
                    children.append((i, (*gen, t), float(child[t])))
        if not children:
            break
        idx = torch.tensor(parents)
        cache.reorder_cache(idx)
        att = torch.cat([att[idx], torch.ones((len(idx), 1), dtype=att.dtype)], 1)
        step_pos = nxt_pos[idx][:, None]
        x = torch.tensor(tokens)[:, None]
        with torch.no_grad():
            out = model(input_ids=x, attention_mask=att, position_ids=step_pos, use_cache=True, **{cache_arg: cache})
        cache, logits, nxt_pos, rows = getattr(out, cache_arg), out.logits[:, -1], step_pos[:, 0] + 1, children
    results = [(leaves[i], unknown[i]) for i in range(len(prompts))]
    return results


if __name__ == "__main__" and sys.argv[1:2] == ["--train"]:  # a training worker (see _build)
    result = _train_one(Path(sys.argv[2]), json.loads(sys.argv[3]))
    Path(sys.argv[4]).write_text(json.dumps(result))
elif __name__ == "__main__":  # python tests/probe_models.py ROOT
    t = time.perf_counter()
    m = build_probe_models(Path(sys.argv[1]))
    print(f"built in {time.perf_counter() - t:.1f}s (this run's build: {m['seconds']}s, truth {m['truth_seconds']}s)")
    for name, e in m["models"].items():
        print(f"  {name}: {e.get('train')} {e['seconds']}s")
    ids = [q.id for q in identity_questions()]
    for key, truth in m["truth"].items():
        print(key, {n: [round(x, 4) for x in truth_interval(truth, n, ids)] for n in NAMES})
