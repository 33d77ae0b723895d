"""Batches for causal-LM training and evaluation from a flat token array."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def random_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of random `seq_len` windows; the generator makes them reproducible."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"{len(tokens)} training tokens: fewer than one window of {seq_len}")
    high = len(tokens) - seq_len
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=generator).tolist()
        window = np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts])
        ids = torch.from_numpy(window)
        yield {"input_ids": ids, "labels": ids}


def sequential_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
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
