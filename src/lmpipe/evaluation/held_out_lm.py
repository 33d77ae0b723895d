"""Held-out language-modelling benchmarks of causal models beyond our own corpus: WikiText-2
raw test in bits per byte, for our models and for reference models scored in the same run
(a real pretrained model such as SmolLM2-135M), each with its own tokenizer.

Two forms (`evaluate.wikitext.form`):
- `articles` (the default): lm-evaluation-harness's definition of its `wikitext` task. The
  whole test split, article by article, each detokenized and scored in rolling windows of
  the model's own context length (`rolling_windows`, the harness's windows with one token
  of context), over the bytes and words of the article as published. Figures compare with
  published harness figures, and tests/test_harness.py checks ours against the harness's.
- `prefix`: the fast option. The first `max_bytes` of the raw (tokenized-spacing) text as
  one stream, in consecutive windows of the training sequence length. Only comparable
  within one run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.evaluation.lm_metrics import bits_per_byte, eval_mode
from lmpipe.runs.config import WikitextConfig
from lmpipe.taskdata import wikitext


def wikitext_scores(
    w: WikitextConfig,
    models: Mapping[str, PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    references: Iterable[tuple[str, PreTrainedModel, PreTrainedTokenizerBase]] = (),
) -> dict[str, float]:
    """`<model>_wikitext_bpb` on WikiText-2's test text for each of `models`, and for each
    (name, model, its own tokenizer) of `references` (loaded one at a time if an iterator):
    by article at each model's context length, or (form `prefix`) the first `max_bytes` in
    windows of `seq_len`."""
    if not w.enabled:
        return {}
    if w.form == "articles":
        pages = wikitext.articles("test")[: w.max_articles]
        scores = {"wikitext_test_bytes": float(sum(len(p.encode("utf-8")) for p in pages)),
                  "wikitext_test_articles": float(len(pages))}  # fmt: skip
        scored = [(label, model, tokenizer) for label, model in models.items()]
        scored += [(reference_label(spec), model.to(device), own)
                   for spec, model, own in references]  # fmt: skip
        for label, model, own in scored:
            result = article_scores(model, own, pages, context_length(model), batch_size, device)
            scores[f"{label}_wikitext_bpb"] = result.bits_per_byte
            scores[f"{label}_wikitext_word_perplexity"] = result.word_perplexity
        return scores
    text = wikitext.head(wikitext.wikitext_text("test"), w.max_bytes)
    scores = {"wikitext_test_bytes": float(len(text.encode("utf-8")))}
    window = seq_len - 1
    for label, model in models.items():
        scores[f"{label}_wikitext_bpb"] = bits_per_byte(model, tokenizer, text, window,
                                                        batch_size, device)["bpb"]  # fmt: skip
    for spec, reference, reference_tokenizer in references:
        scores[f"{reference_label(spec)}_wikitext_bpb"] = bits_per_byte(
            reference.to(device), reference_tokenizer, text, window, batch_size, device
        )["bpb"]
    return scores


def reference_label(spec: str) -> str:
    """A metric-name-safe label for a reference model (`smollm2-135m` -> `smollm2_135m`)."""
    return "ref_" + re.sub(r"[^0-9A-Za-z]+", "_", Path(spec).stem).strip("_").lower()


def context_length(model: PreTrainedModel) -> int:
    """The model's own context, as the harness reads it from the config."""
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(model.config, attribute, None), int):
            return getattr(model.config, attribute)
    return 2048


def rolling_windows(
    tokens: Sequence[int], prefix: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs scoring every token once in windows of `max_length`
    inputs: the first predicts the first `max_length` tokens after `prefix`; each next one
    the following `max_length` tokens after the token before them; the last, shorter one
    keeps a full window of inputs, its extra context sliding back over scored tokens. The
    harness's windows (get_rolling_token_windows, context 1, then make_disjoint_window)."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix], list(tokens[:first]))]
    done = first
    while done < len(tokens):
        size = min(len(tokens) - done, max_length)
        end = done + size
        inputs = list(tokens[end - max_length - 1 : end - 1])
        windows.append((inputs[: len(inputs) - size + 1], list(tokens[done:end])))
        done = end
    return windows


@dataclass(frozen=True)
class ArticleScores:
    loglikelihood: float  # nats, summed over every token of every article
    tokens: int
    bytes: int  # of the articles as published (before detokenizing), as the harness counts
    words: int

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)


@torch.no_grad()
def window_loglikelihoods(
    model: PreTrainedModel,
    windows: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    device: torch.device,
) -> list[float]:
    """Each window's summed log-probability of its continuation given its context."""
    totals = []
    with eval_mode(model):
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            rows = [(context + continuation)[:-1] for context, continuation in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            attention = torch.zeros_like(ids)
            for index, row in enumerate(rows):
                ids[index, : len(row)] = torch.tensor(row)
                attention[index, : len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device),
                           use_cache=False).logits.float()  # fmt: skip
            for index, (_, continuation) in enumerate(chunk):
                end = len(rows[index])
                scored = F.log_softmax(logits[index, end - len(continuation) : end], dim=-1)
                target = torch.tensor(continuation, device=scored.device)[:, None]
                totals.append(float(scored.gather(1, target).double().sum()))
    return totals


def article_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pages: Sequence[str],
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> ArticleScores:
    """The articles' log-likelihood under `model`, each detokenized and scored in rolling
    windows of `max_length` after one start token (BOS, else EOS, as the harness's)."""
    prefix = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    if prefix is None:
        raise ValueError("rolling windows need a tokenizer with BOS or EOS")
    total, tokens = 0.0, 0
    for page in tqdm(pages, desc="wikitext articles", unit="article", leave=False):
        ids = tokenizer(wikitext.detokenize(page), add_special_tokens=False)["input_ids"]
        tokens += len(ids)
        total += sum(window_loglikelihoods(model, rolling_windows(ids, prefix, max_length),
                                           batch_size, device))  # fmt: skip
    return ArticleScores(total, tokens, sum(len(p.encode("utf-8")) for p in pages),
                         sum(len(re.split(r"\s+", p)) for p in pages))  # fmt: skip
