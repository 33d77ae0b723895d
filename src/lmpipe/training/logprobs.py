"""Log-probs of replies under a model: the policy's in training, the frozen reference's
computed once before it (cached with the data they belong to, so LoRA needs no second model
and no adapter switching). fp32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from lmpipe.evaluation.lm_metrics import eval_mode, next_token_losses
from lmpipe.taskdata import pairs as pref
from lmpipe.training import distributed


def reply_logps(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-prob of its labelled tokens (fp32), and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits  # fmt: skip
    losses, labelled = next_token_losses(logits, batch["labels"])  # fp32, 0 where unlabelled
    return -losses.sum(dim=1), labelled.sum(dim=1)


def token_logps(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each labelled token's log-prob given the tokens before it (rows x length-1, fp32, 0
    where unlabelled) and the mask of labelled tokens. `temperature` divides the logits
    first: the distribution sampled replies came from, as TRL's GRPO scores them."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits  # fmt: skip
    if temperature != 1.0:
        logits = logits / temperature
    losses, labelled = next_token_losses(logits, batch["labels"])
    return -losses, labelled


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    examples: Sequence[pref.PairExample],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    width: int | None = None,
) -> list[pref.Pair]:
    """The pairs with the (frozen, starting) model's log-probs of each reply filled in,
    computed in micro-batches of `batch_size` rows padded to `width` (the shapes training
    gives the policy: `pref.fixed_width`), their batches shared by the processes."""

    def fill(_: int, chunk: Sequence[pref.PairExample]) -> list[pref.Pair]:
        batch = pref.collate_pairs(chunk, pad_id, with_reference=False, width=width)
        logps, _ = reply_logps(model, {k: v.to(device) for k, v in batch.items()})
        values = logps.tolist()
        return [replace(e.pair, ref_chosen=c, ref_rejected=r)
                for e, c, r in zip(chunk, values[: len(chunk)], values[len(chunk) :],
                                   strict=True)]  # fmt: skip

    with eval_mode(model):
        return distributed.map_batches(fill, examples, batch_size,
                                       "preference: the reference's log-probs")  # fmt: skip
