"""Conversations for supervised fine-tuning, from any source: split, tokenised with a loss mask.

Loss is on assistant tokens only: the chat template marks them ({% generation %}), and
every other position gets label -100.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import PreTrainedTokenizerBase

from lmpipe.data.batches import IGNORE_INDEX, ShuffledBatches, ordered_examples, shuffled_examples

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: Messages
    # The final answer a program can check the reply against (verifiable tasks); None: none.
    answer: str | None = None
    # What the example was drawn from along with others, so that they are not independent
    # (a problem template): intervals resample whole clusters; None: independent.
    cluster: str | None = None
    # Loss on the last assistant turn alone (a revision after words back: the first attempt
    # before it may be wrong); false: on every assistant turn.
    last_turn_only: bool = False

    @property
    def prompt(self) -> str:
        return self.messages[0]["content"]


def split_of(conversation: Conversation, val_fraction: float, test_fraction: float) -> str:
    """train/val/test by a hash of the opening prompt, so a question never straddles splits."""
    key = conversation.prompt.strip().lower().encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + val_fraction:
        return "val"
    return "train"


def split_conversations(
    conversations: Sequence[Conversation], val_fraction: float, test_fraction: float
) -> dict[str, list[Conversation]]:
    splits: dict[str, list[Conversation]] = {"train": [], "val": [], "test": []}
    for conversation in conversations:
        splits[split_of(conversation, val_fraction, test_fraction)].append(conversation)
    return splits


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, max_len: int,
    last_turn_only: bool = False,
) -> dict[str, list[int]] | None:  # fmt: skip
    """input_ids and labels (-100 outside assistant turns, or outside the last one) cut to
    max_len; None if no target."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = list(encoded["assistant_masks"])
    if last_turn_only and any(mask):
        last_start = max(i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
        mask = [m if i >= last_start else 0 for i, m in enumerate(mask)]
    ids = list(encoded["input_ids"])[:max_len]
    mask = mask[:max_len]
    labels = [tok if m else IGNORE_INDEX for tok, m in zip(ids, mask, strict=True)]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def responses_alone(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, example: dict[str, list[int]]
) -> dict[str, list[int]]:
    """The assistant turns of `messages` without the user turns, labelled on the same
    response tokens as `example` (the first as many as it labels, when max_len cut it)."""
    alone = encode_conversation(
        tokenizer, [m for m in messages if m["role"] == "assistant"], max_len=1 << 30
    )
    assert alone is not None, "an example with a labelled token has an assistant turn"
    wanted = sum(label != IGNORE_INDEX for label in example["labels"])
    ids, labels, seen = [], [], 0
    for token, label in zip(alone["input_ids"], alone["labels"], strict=True):
        if seen == wanted:
            break
        ids.append(token)
        labels.append(label)
        seen += label != IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def encode_all(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation], max_len: int
) -> list[dict[str, list[int]]]:
    examples = [encode_conversation(tokenizer, c.messages, max_len, c.last_turn_only)
                for c in conversations]  # fmt: skip
    kept = [e for e in examples if e is not None]
    if len(kept) < len(examples):
        log.info(
            "sft: %d conversations had no response token within max_len", len(examples) - len(kept)
        )
    return kept


def fixed_width(rows: Iterable[dict[str, list[int]]], multiple: int = 8) -> int:
    """One width for every micro-batch of these rows (training, validation and a frozen
    reference's pass alike: `collate(..., width=)`): the longest, rounded up to `multiple`.

    With equal shapes a row's log-prob does not depend on the rows it is batched with: in
    bf16 a different padding alone moves a reply's summed log-prob by up to ~0.07, far more
    than a tie (lmpipe.training.pair_losses.TIE_MARGIN), so a policy at step 0 would not equal
    its reference. Equal shapes also keep compiled graphs static."""
    longest = max((len(row["input_ids"]) for row in rows), default=1)
    return -(-longest // multiple) * multiple


def collate(
    examples: Sequence[dict[str, list[int]]], pad_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, or to a fixed `width`; padding is masked out of
    attention and loss."""
    longest = max(len(e["input_ids"]) for e in examples)
    if width is not None and width < longest:
        raise ValueError(f"an example of {longest} tokens does not fit the width {width}")
    width = width or longest
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def pack(examples: Sequence[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """First-fit-decreasing packing of whole examples into rows of at most `max_len` tokens.

    Each row carries `position_ids` that restart at 0 for every example: transformers reads
    that as packed sequences and masks attention between them (no attention_mask is sent),
    so a packed row trains exactly like its examples padded one per row.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[dict[str, list[int]]] = []
    for index in order:
        example = examples[index]
        size = len(example["input_ids"])
        row = next((r for r in rows if len(r["input_ids"]) + size <= max_len), None)
        if row is None:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += example["input_ids"]
        # The first token of an example is never a target of the one before it.
        row["labels"] += [IGNORE_INDEX, *example["labels"][1:]]
        row["position_ids"] += list(range(size))
    return rows


def collate_packed(rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows padded to the longest; the padding is one more (unlabelled) sequence."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1)
    for index, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[index, :n] = torch.tensor(row["input_ids"])
        labels[index, :n] = torch.tensor(row["labels"])
        positions[index, :n] = torch.tensor(row["position_ids"])
        positions[index, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def shuffled_batches(
    examples: Sequence[dict[str, list[int]]],
    batch_size: int,
    pad_id: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    packing_len: int | None = None,
) -> ShuffledBatches:
    """Endless, resumable epochs of batches, each epoch a fresh seeded permutation.

    Padded (one example per row) by default; with `packing_len`, rows are examples packed
    up to that many tokens and a batch holds `batch_size` such rows.
    """
    if packing_len and examples:
        rows = pack(examples, packing_len)
        log.info("sft: %d examples packed into %d rows of <= %d tokens",
                 len(examples), len(rows), packing_len)  # fmt: skip
        return shuffled_examples(rows, batch_size, partial(collate_packed, pad_id=pad_id), seed,
                                 rank, world_size)  # fmt: skip
    return shuffled_examples(examples, batch_size, partial(collate, pad_id=pad_id), seed, rank,
                             world_size)  # fmt: skip


def ordered_batches(
    examples: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    return ordered_examples(examples, batch_size, partial(collate, pad_id=pad_id))
