"""Language-model measures used while training (periodic validation) and by evaluate:
token-weighted loss, perplexity, and the unigram baseline a trained model must beat.

A module of its own because pretrain depends on it: DVC reruns pretrain when it changes,
and the evaluate stage's scoring code (lmpipe.evaluate) must not have that reach.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

# Label of a position the loss skips (the PyTorch and transformers convention): prompt
# tokens and padding.
IGNORE_INDEX = -100


@torch.no_grad()
def mean_loss(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    max_batches: int | None = None,
) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy (nats) over labelled positions."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),  # packed rows
            use_cache=False,  # with a KV cache, transformers ignores packed positions
        ).logits
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += loss.item()
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
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
