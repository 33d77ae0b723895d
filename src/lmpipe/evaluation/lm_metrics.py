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
from transformers import PreTrainedModel

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
