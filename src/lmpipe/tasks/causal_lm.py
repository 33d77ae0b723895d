"""Causal language modelling: next-token prediction on the token stream (decoders)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data.batches import IGNORE_INDEX, Batch, sequential_windows, window_batches
from lmpipe.evaluation.lm_metrics import mean_loss, unigram_entropy
from lmpipe.runs.config import PretrainConfig
from lmpipe.tasks.base import Objective, PretrainingTask, TrainingSetup
from lmpipe.training.model import load_model


class NextTokenLoss(Objective):
    """Cross-entropy of each labelled token given the ones before it."""

    name = "causal_lm"

    def target_count(self, batch: Batch) -> int:
        # The model shifts labels by one: the first position is never a target.
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # transformers' own loss (labels shifted, logits in fp32); with num_items_in_batch it
        # sums, and 1 leaves the sum as it is. No KV cache in training: it costs memory, and
        # with one transformers ignores the restarting position_ids of packed examples.
        return model(**batch, num_items_in_batch=1, use_cache=False).loss


class CausalLM(NextTokenLoss, PretrainingTask):
    family: ClassVar[str] = "decoder"

    def setup(
        self,
        p: PretrainConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> TrainingSetup:
        span = self.val_span(p)

        def val_loss(m: torch.nn.Module) -> float:
            return mean_loss(m, sequential_windows(val_tokens, p.batch_size, p.seq_len, span),
                             device)[0]  # fmt: skip

        batches = window_batches(train_tokens, p.seq_len, p.batch_size, seed, rank, world_size)
        return TrainingSetup(model, batches, self, val_loss)

    def baseline(
        self, p: PretrainConfig, tokenizer: PreTrainedTokenizerBase, train_tokens: np.ndarray,
        val_tokens: np.ndarray,
    ) -> dict[str, float]:  # fmt: skip
        span = self.val_span(p)
        return {"unigram_entropy": unigram_entropy(val_tokens[: span // p.seq_len * p.seq_len],
                                                   len(tokenizer))}  # fmt: skip

    def load(self, path: Path) -> PreTrainedModel:
        return load_model(path)

    def corpus_loss(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        max_tokens: int,
        device: torch.device,
    ) -> tuple[float, int]:
        return mean_loss(model, sequential_windows(tokens, batch_size, seq_len, max_tokens), device)
