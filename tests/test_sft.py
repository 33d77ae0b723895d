"""Chatterbot conversations: loading, leak-free split, masking, batching."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmpipe.taskdata.chatterbot import load_chatterbot
from lmpipe.taskdata.conversations import (
    IGNORE_INDEX,
    collate,
    collate_packed,
    encode_all,
    ordered_batches,
    pack,
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


def test_packing_fills_rows_with_whole_examples_and_restarts_positions(tiny_tokenizer) -> None:
    examples = encode_all(tiny_tokenizer, load_chatterbot("english")[:40], max_len=64)
    rows = pack(examples, 64)
    assert len(rows) < len(examples)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    for row in rows:
        assert len(row["input_ids"]) <= 64
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)  # no cross-example target
    batch = collate_packed(rows[:3], pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].shape == batch["input_ids"].shape


def test_packed_rows_score_exactly_like_padded_examples(tiny_model, tiny_tokenizer) -> None:
    """Attention never crosses an example boundary inside a packed row: the summed loss over
    packed rows equals the summed loss over the same examples padded one per row."""
    from lmpipe.evaluation.scoring import example_losses

    examples = encode_all(tiny_tokenizer, load_chatterbot("english")[:12], max_len=64)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # large weights: a fresh model's output barely depends on context
        for param in tiny_model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.5)
    padded, padded_counts = example_losses(tiny_model, ordered_batches(examples, 4, 0), cpu)
    rows = pack(examples, 64)
    packed, packed_counts = example_losses(tiny_model, [collate_packed(rows, 0)], cpu)
    assert sum(packed_counts) == sum(padded_counts)
    assert sum(packed) == pytest.approx(sum(padded), rel=1e-5)
    # Without the restarting positions the examples would see each other: not the same loss.
    joined = {k: v for k, v in collate_packed(rows, 0).items() if k != "position_ids"}
    leaked, _ = example_losses(tiny_model, [joined], cpu)
    assert sum(leaked) != pytest.approx(sum(padded), rel=1e-3)


def test_the_training_loss_keeps_packed_examples_apart(tiny_model, tiny_tokenizer) -> None:
    """The loss the training loop minimises, on packed rows, is the loss of the same examples
    padded one per row (with a KV cache transformers would ignore the restarting positions
    and let packed examples attend to each other)."""
    from lmpipe.tasks.sft import SFT

    examples = encode_all(tiny_tokenizer, load_chatterbot("english")[:12], max_len=64)
    torch.manual_seed(0)
    with torch.no_grad():  # large weights: a fresh model's output barely depends on context
        for param in tiny_model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.5)
    task = SFT()
    with torch.no_grad():
        padded = sum(float(task.loss_sum(tiny_model, b)) for b in ordered_batches(examples, 4, 0))
        packed = float(task.loss_sum(tiny_model, collate_packed(pack(examples, 64), 0)))
    assert packed == pytest.approx(padded, rel=1e-5)


# --- reply quality: generation, chrF / ROUGE-L, the retrieval baseline ------------------------


def test_batched_greedy_replies_equal_one_at_a_time(tiny_model, tiny_tokenizer) -> None:
    from lmpipe.feedback.rollouts import generate_replies

    prompts = ["hi", "What is AI? Tell me more about thinking machines.", "fine", "Who?"]
    alone = generate_replies(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6)
    batched = generate_replies(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6,
                               batch_size=4)  # fmt: skip
    assert batched == alone


def test_reply_scores_are_sacrebleus_chrf_and_rouge_scores_rouge_l() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    from lmpipe.evaluation.scoring import reply_scores

    replies = ["I am a bot.", "Hello there", ""]
    references = ["I am a chat bot.", "Hello there, friend", "Nothing"]
    scores = reply_scores(replies, references)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(replies, [references]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [
        scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(replies, references, strict=True)
    ]
    assert scores["rougeL"] == pytest.approx(sum(expected) / 3)
    assert reply_scores(references, references) == {"chrf": pytest.approx(100.0),
                                                    "rougeL": pytest.approx(1.0)}  # fmt: skip
    with pytest.raises(ValueError, match="no generated replies"):
        reply_scores([], [])


def test_several_references_score_each_reply_against_its_best_match() -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    from lmpipe.evaluation.scoring import reply_scores

    replies = ["I am a bot.", "Hello there"]
    references = [["I am a chat bot.", "No."], ["Hello there, friend"]]
    scores = reply_scores(replies, references)
    streams = [["I am a chat bot.", "Hello there, friend"], ["No.", None]]
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(replies, streams).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = [max(scorer.score(r, h)["rougeL"].fmeasure for r in refs)
            for h, refs in zip(replies, references, strict=True)]  # fmt: skip
    assert scores["rougeL"] == pytest.approx(sum(best) / 2)
    # a second, better reference can only raise the score
    assert reply_scores(["No."], [["I am a chat bot.", "No."]])["rougeL"] == pytest.approx(1.0)


def test_distinct_prompt_scores_count_a_repeated_prompt_once() -> None:
    import pandas as pd

    from lmpipe.tasks.sft import SFT

    frame = pd.DataFrame({
        "prompt": ["My printer?"] * 3 + ["Hi"],
        "reference": ["Turn it on.", "Turn it off.", "Turn it on.", "Hello"],
        "generated": [True] * 4,
        "target_tokens": [3, 3, 3, 1],
        "tuned_loss": [3.0, 3.0, 3.0, 1.0],
        "tuned_reply": ["Turn it on."] * 3 + ["Bye"],
        "retrieval_reply": ["Hello"] * 4,
    })  # fmt: skip
    metrics = SFT().score(frame, ["tuned"], {})
    assert metrics["sft_test_distinct_prompts"] == 2
    # every row: 1, 2/3 ("turn it" of "turn it off"), 1, 0; distinct: best match 1, then 0
    assert metrics["tuned_rougeL"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert metrics["tuned_rougeL_distinct"] == pytest.approx(0.5)
    assert metrics["retrieval_rougeL_distinct"] == pytest.approx(0.5)


def test_retrieval_baseline_answers_with_the_nearest_training_prompts_reply() -> None:
    from lmpipe.evaluation.baselines import retrieval_replies

    prompts = ["What is AI?", "Do you like music?", "Where do you live?"]
    replies = ["Thinking machines.", "I love jazz.", "In a computer."]
    asked = ["what is ai", "Which music do you like?", "Where do you live?", "zzz"]
    assert retrieval_replies(prompts, replies, asked) == [
        "Thinking machines.",
        "I love jazz.",
        "In a computer.",
        "Thinking machines.",
    ]  # fmt: skip  (no overlap at all: the first training example)
