"""Chatterbot conversations: loading, leak-free split, masking, batching."""

from __future__ import annotations

import itertools

import torch

from lmpipe.data.sft import (
    IGNORE_INDEX,
    collate,
    encode_all,
    load_chatterbot,
    split_conversations,
)


def test_chatterbot_english_loads_alternating_turns() -> None:
    conversations = load_chatterbot("english")
    assert len(conversations) > 500
    for conv in conversations:
        roles = [m["role"] for m in conv.messages]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in itertools.pairwise(roles))


def test_split_never_shares_a_prompt_between_train_and_test() -> None:
    splits = split_conversations(load_chatterbot("english"), val_fraction=0.05, test_fraction=0.1)
    assert all(splits.values())
    train_prompts = {c.prompt.strip().lower() for c in splits["train"]}
    assert not train_prompts & {c.prompt.strip().lower() for c in splits["test"]}


def test_encoded_examples_mask_the_prompt(tiny_tokenizer) -> None:
    conv = load_chatterbot("english")[:5]
    examples = encode_all(tiny_tokenizer, conv, max_len=128)
    for example in examples:
        labels = example["labels"]
        assert labels[0] == IGNORE_INDEX
        targets = [t for t in labels if t != IGNORE_INDEX]
        assert targets and targets[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_truncation_that_removes_every_target_drops_the_example(tiny_tokenizer) -> None:
    conv = load_chatterbot("english")[:3]
    assert encode_all(tiny_tokenizer, conv, max_len=2) == []


def test_collate_pads_and_masks() -> None:
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_id=1,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
