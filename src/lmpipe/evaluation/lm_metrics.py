"""Language-model measures used while training (periodic validation) and by evaluate:
token-weighted loss, perplexity, and the unigram baseline a trained model must beat.

A module of its own because pretrain depends on it: DVC reruns pretrain when it changes,
and the evaluate stage's scoring code (lmpipe.evaluation.scoring) must not have that reach.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data.batches import IGNORE_INDEX


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def token_losses(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy (nats, fp32) at each position of a batch, 0 where the label
    is ignored, and the mask of labelled positions; both [rows, length - 1]."""
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),  # packed rows
        use_cache=False,  # with a KV cache, transformers ignores packed positions
    ).logits
    return next_token_losses(logits, batch["labels"])


def next_token_losses(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy of logits [rows, length, vocab] against the next token of
    labels [rows, length] (fp32, 0 where ignored), and the mask of labelled positions."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view_as(targets), targets != IGNORE_INDEX


@torch.no_grad()
def mean_loss(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    max_batches: int | None = None,
) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy (nats) over labelled positions."""
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in itertools.islice(batches, max_batches):
            losses, labelled = token_losses(model, batch, device)
            total += losses.sum().item()
            count += int(labelled.sum())
    if count == 0:
        raise ValueError("no labelled tokens to evaluate")
    return total / count, count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the tokens' own unigram distribution: the loss of the best model
    that ignores context. A trained LM must land far below it."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


@torch.no_grad()
def bits_per_byte(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    window: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Bits per UTF-8 byte of `text` under `model`: its summed next-token loss (nats) over
    every token of the text, / ln 2, / the text's bytes. Unlike perplexity it does not
    depend on the tokenizer, so models with different vocabularies compare.

    The text is tokenized whole, after one start token (BOS, else EOS) so that its first
    token is predicted too, and scored in consecutive windows of `window` targets; each
    window sees only its own tokens as context (no sliding overlap), a slight handicap
    that is the same for every model at the same window.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if not ids or start is None:
        raise ValueError("bits per byte needs a non-empty text and a tokenizer with BOS or EOS")
    stream = torch.tensor([start, *ids])
    # Window k holds stream[k*window : k*window + window + 1]: inputs predict the next token.
    rows = [stream[i : i + window + 1] for i in range(0, len(ids), window)]
    total = 0.0
    with eval_mode(model):
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            width = max(len(r) for r in chunk)
            ids_batch = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, tokens in enumerate(chunk):
                ids_batch[row, : len(tokens)] = tokens
                labels[row, : len(tokens)] = tokens
                attention[row, : len(tokens)] = 1
            batch = {"input_ids": ids_batch, "labels": labels, "attention_mask": attention}
            losses, _ = token_losses(model, batch, device)
            total += float(losses.double().sum())
    n_bytes = len(text.encode("utf-8"))
    return {"bpb": total / math.log(2) / n_bytes, "tokens": float(len(ids)),
            "bytes": float(n_bytes), "loss": total / len(ids)}  # fmt: skip
