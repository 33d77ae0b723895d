"""Labelled text for sequence classification, from any source: split, tokenised, batched.

Splits are stratified and stable: within each class, texts are ordered by a hash of their
content, so a text's split never depends on what else was loaded.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import PreTrainedTokenizerBase

from lmpipe.data.batches import ShuffledBatches, ordered_examples, shuffled_examples
from lmpipe.data.tokenizer import frames_with_cls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledText:
    id: str
    text: str
    label: str


def hash_order(item: LabelledText) -> bytes:
    return hashlib.blake2b(item.text.encode(), digest_size=8).digest()


def stratified_split(
    items: Sequence[LabelledText], val_fraction: float, test_fraction: float
) -> dict[str, list[LabelledText]]:
    """train/val/test with each class split in the same proportions (at least one val and
    one test text per class with three or more texts, unless the fraction is 0)."""
    by_label: dict[str, list[LabelledText]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    splits: dict[str, list[LabelledText]] = {"train": [], "val": [], "test": []}
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=hash_order)
        n = len(ranked)
        n_test = max(round(n * test_fraction), 1) if n >= 3 and test_fraction > 0 else 0
        n_val = max(round(n * val_fraction), 1) if n >= 3 and val_fraction > 0 else 0
        splits["test"] += ranked[:n_test]
        splits["val"] += ranked[n_test : n_test + n_val]
        splits["train"] += ranked[n_test + n_val :]
    return splits


def label_names(items: Sequence[LabelledText]) -> list[str]:
    """Class names in a fixed (sorted) order: index i is class id i."""
    return sorted({item.label for item in items})


def majority_label(items: Sequence[LabelledText]) -> str:
    counts = Counter(item.label for item in items)
    return min(counts, key=lambda label: (-counts[label], label))


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[LabelledText],
    labels: Sequence[str],
    max_len: int,
) -> list[dict[str, list[int] | int]]:
    """Token ids (cut to max_len) and the class id of each text with any tokens. An encoder's
    tokenizer frames the text as [CLS] text [SEP] (its head reads [CLS]); a decoder's
    classifier reads the last token, so its texts get no special tokens."""
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({item.label for item in items} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's classes {list(labels)}")
    encoded = tokenizer([item.text for item in items], add_special_tokens=False)["input_ids"]
    if frames_with_cls(tokenizer):
        encoded = [
            [tokenizer.cls_token_id, *ids[: max_len - 2], tokenizer.sep_token_id] if ids else []
            for ids in encoded
        ]
    return [
        {"input_ids": list(ids)[:max_len], "label": index[item.label]}
        for ids, item in zip(encoded, items, strict=True)
        if ids
    ]


def has_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether `text` gives any tokens of its own (texts without are not classified)."""
    return bool(tokenizer(text, add_special_tokens=False)["input_ids"])


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids; the classifier reads the last non-padding token of each row."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        attention[row, :n] = 1
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def shuffled_batches(
    examples: Sequence[dict],
    batch_size: int,
    pad_id: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> ShuffledBatches:
    return shuffled_examples(examples, batch_size, partial(collate, pad_id=pad_id), seed, rank,
                             world_size)  # fmt: skip


def ordered_batches(
    examples: Sequence[dict], batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    return ordered_examples(examples, batch_size, partial(collate, pad_id=pad_id))
