"""Rollouts: the model's replies to prompts, greedy or sampled, k per prompt.

One path for every method that learns from the model's own outputs (verifier pairs, KTO
examples, rejection sampling, GRPO, self-correction) and for evaluation's greedy replies:
- a prompt is a user turn (a string) or a conversation so far (messages), rendered with the
  tokenizer's chat template and a generation prompt;
- prompts are left-padded into batches of `batch_size` rows and completed by transformers'
  `generate` with its KV cache;
- a completion keeps its token ids up to and including the end-of-sequence token, and
  whether it reached it (`finished`) or was cut at `max_new_tokens` (GRPO's clipped ratio);
- `sample` draws k replies per prompt, its batches shared by the processes
  (`distributed.map_batches`) and each seeded by its index under a forked random state, so
  the replies are the same for one seed however many processes share the work, and the
  caller's random stream is left as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.training import distributed

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, str]]
Prompt = str | Messages


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn: greedy at temperature 0, else sampled at `temperature` from
    the top-p nucleus and, with `top_k`, the k likeliest tokens (None: the model's generation
    config, transformers' 50 by default). `min_new_tokens` > 0 forbids an early end (an empty
    reply is no reply to prefer another to)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got "
                             f"{self.temperature} and {self.top_p}")  # fmt: skip

    def generate_kwargs(self) -> dict[str, object]:
        if self.temperature == 0:
            return {"do_sample": False}
        kwargs: dict[str, object] = {"do_sample": True, "temperature": self.temperature,
                                     "top_p": self.top_p}  # fmt: skip
        if self.top_k is not None:
            kwargs["top_k"] = self.top_k
        return kwargs


@dataclass(frozen=True)
class Completion:
    """One reply: its text (special tokens dropped, stripped), its token ids (through the
    end-of-sequence token when it has one) and whether it ended before the length limit."""

    text: str
    token_ids: tuple[int, ...]
    finished: bool


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The prompt's tokens through the chat template, ready for the assistant's reply."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    encoded = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                            tokenize=True)  # fmt: skip
    return list(encoded["input_ids"]) if isinstance(encoded, Mapping) else list(encoded)


def _end_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    sampling: Sampling,
    device: torch.device | None = None,
    batch_size: int = 1,
) -> list[Completion]:
    """One completion per prompt, `batch_size` prompts at a time, drawn from the caller's
    random stream."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ends = _end_ids(model, tokenizer)
    completions: list[Completion] = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=device)
            attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded],
                                     device=device)  # fmt: skip
            out = model.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=sampling.max_new_tokens,
                min_new_tokens=sampling.min_new_tokens,
                pad_token_id=pad_id,
                use_cache=True,
                **sampling.generate_kwargs(),
            )
            rows, finished = [], []
            for row in out[:, width:].tolist():
                end = next((i for i, token in enumerate(row) if token in ends), None)
                rows.append(row if end is None else row[: end + 1])
                finished.append(end is not None)
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)  # one call per batch
            for text, row, done in zip(texts, rows, finished, strict=True):
                completions.append(Completion(text.strip(), tuple(row), done))
    finally:
        model.train(was_training)
    return completions


def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    device: torch.device | None = None,
    min_new_tokens: int = 0,
    batch_size: int = 1,
) -> list[str]:
    """The reply texts of `complete` (greedy unless `do_sample`)."""
    sampling = Sampling(max_new_tokens, temperature if do_sample else 0.0, top_p,
                        min_new_tokens)  # fmt: skip
    return [c.text for c in complete(model, tokenizer, prompts, sampling, device, batch_size)]


def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    k: int,
    sampling: Sampling,
    seed: int,
    batch_size: int,
    device: torch.device,
    what: str = "sampling replies",
) -> list[list[Completion]]:
    """`k` completions of each prompt (a group), the same ones for the same seed, batch size
    and any number of processes: each batch of `batch_size` rows is seeded by `seed` and its
    index, and every process returns every group."""
    if k < 1:
        raise ValueError(f"k (replies per prompt) must be >= 1, got {k}")
    rows = [prompt for prompt in prompts for _ in range(k)]
    devices = [device] if device.type == "cuda" else []

    def draw(index: int, batch: Sequence[Prompt]) -> list[Completion]:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + index)
            return complete(model, tokenizer, batch, sampling, device, len(batch))

    drawn = distributed.map_batches(draw, rows, batch_size, what)
    return [drawn[i : i + k] for i in range(0, len(drawn), k)]
