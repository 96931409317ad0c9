"""The local backend: a checkpoint folder run with transformers (CPU or GPU; the optional `modeltrace[probe]` extra).

Data flow: `LocalBackend(folder)` loads the tokenizer and model on the chosen device; `chat(requests)` turns each
request into prompt ids with the model's chat template (`prompt_ids`), generates in batches (sampling per the model's
generation_config.json unless a request overrides temperature / top_p; greedy requests greedily) and returns one
`ChatResult` per request with the generated token ids; `next_token_probs` scores next-token distributions after given
continuations (teacher forcing, for compare.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modeltrace.errors import InputError
from modeltrace.probes.chat import Backend, ChatRequest, ChatResult, Progress

__all__ = ["LocalBackend"]


class LocalBackend(Backend):
    """A checkpoint folder run with transformers. Sampling follows the model's generation_config.json (its own
    settings) unless a request overrides temperature / top_p; greedy requests decode greedily."""

    kind = "transformers"
    logits = True

    def __init__(self, path: str, device: str = "auto", batch_size: int | None = None,
                 dtype: str = "auto") -> None:
        folder = Path(path)
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise InputError(f"{path}: not a model folder (config.json missing); for an endpoint give "
                             "--endpoint URL or http(s)://HOST/v1#MODEL")
        try:
            import torch
            import transformers
        except ImportError:
            raise InputError("a local model needs torch and transformers: pip install 'modeltrace[probe]' (install "
                             "torch first, e.g. pip install torch==2.13.0 for the CPU build)") from None
        self.torch = torch
        self.label = path
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        transformers.logging.set_verbosity_error()
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any loader failure is the user's input
            raise InputError(f"{path}: cannot load its tokenizer ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)  # the checkpoint's own by default
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: cannot load it as a causal language model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.gen = self.model.generation_config
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "left"
        self.batch_size = batch_size or (32 if device.startswith("cuda") else 16)
        self.has_template = bool(getattr(self.tok, "chat_template", None))
        vocab = self.tok.get_vocab()
        self.vocab_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        g = self.gen
        return {"backend": self.kind, "model": self.label, "device": self.device,
                "chat_template": self.has_template,
                "own_sampling": {"do_sample": bool(g.do_sample), "temperature": g.temperature, "top_p": g.top_p,
                                 "top_k": g.top_k}}

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------- prompts

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.has_template:
            try:
                out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception:  # noqa: BLE001 - templates raise anything (Gemma's: "System role not supported")
                if messages[0]["role"] != "system":
                    raise
                # No system role in this template: the system text goes first in the user's turn, as such models
                # are deployed; an empty system turn (--no-system-prompt) is simply left out.
                system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
                if system and rest:
                    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
                out = self.tok.apply_chat_template(rest, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return list(ids)
        # No chat template (a base model): a plain transcript that such models continue sensibly.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return list(self.tok(text)["input_ids"])

    def _pad(self, seqs: list[list[int]]):
        torch = self.torch
        width = max(len(s) for s in seqs)
        x = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: generation continues every row at the same column
            x[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            att[i, width - len(s):] = 1
        return x.to(self.device), att.to(self.device)

    @staticmethod
    def _positions(att):
        """Position ids that start at 0 on each row's first real token (left padding), as generate() uses."""
        return (att.cumsum(-1) - 1).clamp(min=0)

    # ----------------------------------------------------------------------------------------- generation

    def _gen_kwargs(self, r: ChatRequest) -> dict[str, Any]:
        from transformers import GenerationConfig

        g = GenerationConfig.from_dict(self.gen.to_dict())
        g.max_new_tokens = r.max_tokens
        g.max_length = None
        g.pad_token_id = self.tok.pad_token_id
        if g.eos_token_id is None:
            g.eos_token_id = self.tok.eos_token_id
        if r.greedy:
            g.do_sample, g.temperature, g.top_p, g.top_k = False, None, None, None
        else:
            if r.temperature is not None:
                g.do_sample = r.temperature > 0
                g.temperature = r.temperature if r.temperature > 0 else None
            if r.top_p is not None:
                g.top_p = r.top_p
        return {"generation_config": g}

    def chat(self, requests: Sequence[ChatRequest], progress: Progress | None = None) -> list[ChatResult]:
        torch = self.torch
        results: list[ChatResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_tokens, r.greedy, r.temperature, r.top_p), []).append(i)
        for idx in groups.values():
            kwargs = self._gen_kwargs(requests[idx[0]])
            seed = requests[idx[0]].seed  # one stream per batch: rows of a batch draw independently
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                x, att = self._pad([self.prompt_ids(requests[i].messages) for i in chunk])
                if seed is not None:
                    torch.manual_seed(seed + b)
                with torch.no_grad():
                    out = self.model.generate(input_ids=x, attention_mask=att, **kwargs)
                eos = kwargs["generation_config"].eos_token_id
                eos_set = set(eos if isinstance(eos, list) else [eos])
                for row, i in enumerate(chunk):
                    ids = out[row, x.shape[1]:].tolist()
                    finish = "length"
                    for j, t in enumerate(ids):
                        if t in eos_set:
                            ids, finish = ids[:j], "stop"
                            break
                    ids = [t for t in ids if t != self.tok.pad_token_id]
                    results[i] = ChatResult(self.tok.decode(ids, skip_special_tokens=True), finish_reason=finish,
                                            token_ids=ids, attempts=1)
                if progress:
                    progress(len(chunk))
        return [r for r in results if r is not None]

    # ----------------------------------------------------------------------------------------- distributions

    def next_token_probs(self, messages_list: list[list[dict[str, str]]], continuations: list[list[int]],
                         positions: int):
        """Next-token distributions after each prompt and after each of the first `positions - 1` tokens of the
        given continuation (teacher forcing): a float32 array [positions, vocab] per prompt (fewer rows when the
        continuation is shorter)."""
        torch = self.torch
        out = []
        for b in range(0, len(messages_list), self.batch_size):
            seqs, spans = [], []
            for msgs, cont in zip(messages_list[b:b + self.batch_size], continuations[b:b + self.batch_size],
                                  strict=True):
                p = self.prompt_ids(msgs)
                k = min(positions, len(cont) + 1)
                seqs.append(p + list(cont[:k - 1]))
                spans.append(k)
            x, att = self._pad(seqs)
            keep = max(spans)  # only the last positions' logits: a 150k vocabulary over a long prompt is large
            with torch.no_grad():
                logits = self.model(input_ids=x, attention_mask=att, position_ids=self._positions(att),
                                    logits_to_keep=keep).logits
            for row, k in enumerate(spans):
                rows = logits[row, logits.shape[1] - k:].float()
                out.append(torch.softmax(rows, -1).cpu().numpy())
        return out
