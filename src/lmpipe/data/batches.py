"""Batches for causal-LM training and evaluation.

Training order is a pure function of (seed, batch index): epoch `e` is a permutation drawn
from a generator seeded with (seed, e), and global batch `i` is a fixed slice of it. So the
data position of a run is one integer, a resumed run reads exactly the batches the
uninterrupted run would have read, and with several processes each takes its own rows of
the same global batch (2 processes x batch B see what 1 process x batch 2B sees).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

Batch = dict[str, torch.Tensor]

# The label of a position that is no prediction target (PyTorch's and transformers' default).
IGNORE_INDEX = -100


class ShuffledBatches:
    """Endless, resumable batches of `batch_size` items per process, reshuffled every epoch.

    `make_batch` turns item indices into a batch. `position` counts the micro-batches
    handed out; setting it (from a checkpoint) continues from there.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        make_batch: Callable[[Sequence[int]], Batch],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        global_batch = batch_size * world_size
        if num_items < global_batch:
            raise ValueError(
                f"{num_items} training items: fewer than one global batch of {global_batch} "
                f"({batch_size} per process x {world_size} processes)"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.make_batch = make_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # The incomplete last global batch of an epoch is skipped: every step sees full batches.
        self.batches_per_epoch = num_items // global_batch
        self.position = 0
        self._epoch = -1
        self._order: list[int] = []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_items, generator=generator).tolist()
            self._epoch = epoch
        return self._order

    def indices(self, position: int) -> list[int]:
        """This process's item indices for micro-batch `position`."""
        epoch, index = divmod(position, self.batches_per_epoch)
        global_batch = self.batch_size * self.world_size
        first = index * global_batch + self.rank * self.batch_size
        return self._order_of(epoch)[first : first + self.batch_size]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.make_batch(self.indices(self.position))
        self.position += 1
        return batch


def shuffled_examples(
    examples: Sequence[Any],
    batch_size: int,
    collate: Callable[[Sequence[Any]], Batch],
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> ShuffledBatches:
    """Endless, resumable, reshuffled batches of `examples`, each batch made by `collate`."""
    if not examples:
        raise ValueError("no training examples")
    return ShuffledBatches(
        len(examples), batch_size, lambda rows: collate([examples[i] for i in rows]), seed,
        rank, world_size,
    )  # fmt: skip


def ordered_examples(
    examples: Sequence[Any], batch_size: int, collate: Callable[[Sequence[Any]], Batch]
) -> Iterator[Batch]:
    """Every example once, in order, in batches of `batch_size` (the last may be smaller)."""
    for first in range(0, len(examples), batch_size):
        yield collate(examples[first : first + batch_size])


def window_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> ShuffledBatches:
    """Pretraining batches: the token stream cut into non-overlapping `seq_len` windows."""
    num_windows = len(tokens) // seq_len
    if num_windows == 0:
        raise ValueError(f"{len(tokens)} training tokens: fewer than one window of {seq_len}")

    def make_batch(rows: Sequence[int]) -> Batch:
        window = np.stack(
            [np.asarray(tokens[r * seq_len : (r + 1) * seq_len], dtype=np.int64) for r in rows]
        )
        ids = torch.from_numpy(window)
        return {"input_ids": ids, "labels": ids}

    return ShuffledBatches(num_windows, batch_size, make_batch, seed, rank, world_size)


def sequential_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[Batch]:
    """Non-overlapping windows from the start: a fixed, comparable evaluation set."""
    usable = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    n_windows = usable // seq_len
    if n_windows == 0:
        raise ValueError(f"{len(tokens)} tokens: fewer than one window of {seq_len}")
    for first in range(0, n_windows, batch_size):
        rows = range(first, min(first + batch_size, n_windows))
        window = np.stack(
            [np.asarray(tokens[r * seq_len : (r + 1) * seq_len], dtype=np.int64) for r in rows]
        )
        ids = torch.from_numpy(window)
        yield {"input_ids": ids, "labels": ids}
