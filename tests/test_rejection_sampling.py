"""Rejection-sampling fine-tuning (lmpipe.tasks.rejection_sampling): what a round keeps, its
figures, that it never samples a held-out problem, and the config it refuses. The rounds
through the finetune stage, resumed mid-round: tests/test_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from lmpipe.feedback.judge import judge
from lmpipe.feedback.rollouts import Completion
from lmpipe.runs.config import ConfigError, FinetuneConfig, validate
from lmpipe.runs.processes import DistEnv
from lmpipe.taskdata.conversations import Conversation
from lmpipe.tasks.finetuning import checked_task
from lmpipe.tasks.rejection_sampling import (
    RejectionSampling,
    hinted_prompt,
    judged_samples,
    round_metrics,
    samples_table,
)
from lmpipe.tasks.sft import conversation_splits, problem_splits

CPU = torch.device("cpu")


def reply(text: str) -> Completion:
    return Completion(text, (1, 2), True)


def test_only_distinct_verified_replies_are_kept() -> None:
    messages = [{"role": "user", "content": "2 + 3 ="}, {"role": "assistant", "content": "#### 5"}]
    problem = Conversation("p", messages, answer="5")
    replies = ["#### 5", " ####  5 ", "#### 6", "", "2 + 3 = 5\n#### 5", "5"]
    table = judged_samples([problem], [[reply(r) for r in replies]], None)
    assert table["correct"].tolist() == [True, True, False, False, True, True]
    assert table["distinct"].tolist() == [True, False, True, True, True, True]
    assert table["kept"].tolist() == [True, False, False, False, True, True]
    capped = judged_samples([problem], [[reply(r) for r in replies]], 2)
    assert capped["kept"].tolist() == [True, False, False, False, True, False]
    for text, kept in zip(table["reply"], table["kept"], strict=True):
        assert not kept or judge(text, "5").correct
    # With the working checked, a right answer after a wrong step is not kept.
    lucky = ["2 + 3 = 6\n#### 5", "2 + 3 = 5\n#### 5"]
    checked = judged_samples([problem], [[reply(r) for r in lucky]], None, check_steps=True)
    assert checked["kept"].tolist() == [False, True]


def test_a_rounds_figures() -> None:
    problems = [Conversation(i, [{"role": "user", "content": f"{i}?"},
                                 {"role": "assistant", "content": "#### 1"}], answer="1")
                for i in ("a", "b")]  # fmt: skip
    table = judged_samples(
        problems,
        [
            [reply("#### 1"), reply("#### 1"), reply("#### 2")],
            [reply("#### 3"), reply("#### 4"), reply("")],
        ],
        None,
    )
    hinted = judged_samples(problems[1:], [[reply("#### 1")]], None).assign(hinted=True)
    metrics = round_metrics(pd.concat([table, hinted], ignore_index=True))
    assert metrics == {
        "solve_rate": 0.5,  # hinted attempts do not count as solving
        "sample_accuracy": pytest.approx(2 / 6),
        "kept_examples": 2.0,  # a's first reply and b's hinted one
        "distinct_correct_per_problem": 0.5,
        "hint_share": 0.5,
    }


def small_problems() -> FinetuneConfig:
    f = FinetuneConfig(task="rejection_sampling", dataset="reasoning_gym")
    f.reasoning_gym.train_size, f.reasoning_gym.val_size, f.reasoning_gym.test_size = 24, 6, 6
    f.rejection_sampling.samples = 3
    f.rejection_sampling.batch_size = 4
    return f


@pytest.mark.parametrize("references", [True, False])
@pytest.mark.parametrize("hints", [False, True])
def test_a_round_samples_training_problems_only_and_keeps_verified_replies(
    monkeypatch: pytest.MonkeyPatch, saved_model: Path, tiny_tokenizer, tmp_path: Path,
    references: bool, hints: bool,
) -> None:  # fmt: skip
    """A stand-in sampler answers the first third of the problems right in its first reply
    and every hinted prompt right: what is kept is exactly that, as replies to the
    questions without their hints, after the reference solutions when asked."""
    f = small_problems()
    f.rejection_sampling.references, f.rejection_sampling.hints = references, hints
    splits = conversation_splits(f)
    answer = {c.prompt: c.answer for c in splits["train"]}
    solvable = {c.prompt for c in splits["train"][:8]}
    asked: list[str] = []

    def sample(model, tokenizer, prompts, k, sampling, seed, batch_size, device, what=""):
        asked.extend(prompts)
        groups = []
        for prompt in prompts:
            question = next((q for q in answer if prompt == hinted_prompt(q, answer[q])), None)
            if question is not None:  # a hinted attempt
                groups.append([reply(f"#### {answer[question]}")] * k)
            else:
                right = f"#### {answer[prompt]}" if prompt in solvable else "#### -1"
                groups.append([reply(right)] + [reply(f"#### -{i + 2}") for i in range(k - 1)])
        return groups

    monkeypatch.setattr("lmpipe.feedback.rollouts.sample", sample)
    task, table = RejectionSampling().prepare(f, saved_model, tiny_tokenizer, CPU,
                                              tmp_path / "cache", DistEnv(), seed=3)  # fmt: skip
    held_out = {c.prompt for split in ("val", "test") for c in splits[split]}
    train_prompts = {c.prompt for c in splits["train"]}
    assert asked and not (set(asked) & held_out)
    unsolved = [c for c in splits["train"] if c.prompt not in solvable]
    expected_asked = len(splits["train"]) + (len(unsolved) if hints else 0)
    assert len(asked) == expected_asked
    trained = task.splits(f)["train"]
    own = [c for c in trained if ":rs" in c.id]
    assert len(own) == 8 + (len(unsolved) if hints else 0)
    assert all(judge(c.messages[1]["content"], c.answer).correct for c in own)
    assert {c.prompt for c in own} <= train_prompts  # the question, never the hinted prompt
    assert (len(trained) - len(own) == len(splits["train"])) is references
    assert task.splits(f)["test"] == splits["test"]
    assert table["hinted"].sum() == (len(unsolved) if hints else 0)
    # The round is cached per sampling model and settings: asked again, nothing is sampled.
    asked.clear()
    again, _ = RejectionSampling().prepare(f, saved_model, tiny_tokenizer, CPU,
                                           tmp_path / "cache", DistEnv(), seed=3)  # fmt: skip
    assert not asked and again.splits(f)["train"] == trained


def test_with_few_demonstrations_sft_gets_those_and_sampling_every_problem(
    monkeypatch: pytest.MonkeyPatch, saved_model: Path, tiny_tokenizer, tmp_path: Path
) -> None:
    """finetune.reasoning_gym.demonstrations: SFT's train split is the first N worked
    replies, the references rejection sampling adds are those N, and a round (and GRPO)
    samples every training problem, never a held-out one."""
    from lmpipe.tasks.grpo import GRPO

    f = small_problems()
    every = conversation_splits(f)
    f.reasoning_gym.demonstrations = 5
    f.rejection_sampling.references = True
    splits = conversation_splits(f)
    assert splits["train"] == every["train"][:5]
    assert splits["val"] == every["val"] and splits["test"] == every["test"]
    assert problem_splits(f) == every
    asked: list[str] = []

    def sample(model, tokenizer, prompts, k, sampling, seed, batch_size, device, what=""):
        asked.extend(prompts)
        return [[reply("#### -1")] * k for _ in prompts]

    monkeypatch.setattr("lmpipe.feedback.rollouts.sample", sample)
    task, _ = RejectionSampling().prepare(f, saved_model, tiny_tokenizer, CPU,
                                          tmp_path / "cache", DistEnv(), seed=3)  # fmt: skip
    assert asked == [c.prompt for c in every["train"]]
    assert task.splits(f)["train"] == splits["train"]  # nothing solved: the references only
    f.task, f.grpo.max_new_tokens, f.batch_size, f.grad_accum = "grpo", 4, 2, 1
    setup = GRPO().setup(f, saved_model, tiny_tokenizer, 3, CPU)
    assert {c.id for c in setup.batches.problems} == {c.id for c in every["train"]}
    with pytest.raises(ConfigError, match="demonstrations"):
        validate({"finetune": {"reasoning_gym": {"demonstrations": 0}}})


@pytest.mark.parametrize("lucky", [False, True])
def test_a_round_that_keeps_nothing_says_what_to_change(
    monkeypatch: pytest.MonkeyPatch, saved_model: Path, tiny_tokenizer, tmp_path: Path,
    lucky: bool,
) -> None:  # fmt: skip
    """Every sample wrong, or (`lucky`) right only after a wrong step, which the default
    check of the working refuses too."""
    f = small_problems()
    f.rejection_sampling.references = False
    answer = {c.prompt: c.answer for c in conversation_splits(f)["train"]}

    def sample(model, tokenizer, prompts, k, *args, **kwargs):
        text = "1 + 1 = 3\n#### {}" if lucky else "#### -1{}"
        return [[reply(text.format(answer[p] if lucky else ""))] * k for p in prompts]

    monkeypatch.setattr("lmpipe.feedback.rollouts.sample", sample)
    with pytest.raises(ConfigError, match=r"kept no reply.*rejection_sampling\.sft_steps"):
        RejectionSampling().prepare(f, saved_model, tiny_tokenizer, CPU, tmp_path, DistEnv())


def test_the_samples_table_numbers_its_rounds() -> None:
    messages = [{"role": "user", "content": "1?"}, {"role": "assistant", "content": "#### 1"}]
    problems = [Conversation("a", messages, answer="1")]
    one = judged_samples(problems, [[reply("#### 1")]], None)
    table = samples_table([one, one])
    assert table["round"].tolist() == [1, 2] and table.columns[0] == "round"
    assert samples_table([]).empty


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        ({"dataset": "chatterbot"}, "finetune.dataset=chatterbot has no checkable answers"),
        ({"rejection_sampling": {"samples": 0}}, "'finetune.rejection_sampling.samples' must"),
        ({"rejection_sampling": {"rounds": 0}}, "'finetune.rejection_sampling.rounds' must"),
        ({"rejection_sampling": {"max_prompts": 0}}, "'finetune.rejection_sampling.max_prompts'"),
        ({"rejection_sampling": {"restart": "scratch"}}, "'finetune.rejection_sampling.restart'"),
        ({"rejection_sampling": {"temperature": 0.0}}, "temperature' must be > 0"),
    ],
)  # fmt: skip
def test_bad_rejection_sampling_configs_name_the_key(settings: dict, pattern: str) -> None:
    finetune = {"task": "rejection_sampling", "dataset": "reasoning_gym", **settings}
    with pytest.raises(ConfigError, match=pattern):
        checked_task(validate({"finetune": finetune}))


def test_the_sft_phase_leaves_out_every_tasks_own_settings() -> None:
    """Arms that start with the same SFT steps share one SFT phase (one cached model)."""
    f = small_problems()
    f.rejection_sampling.sft_steps = 5
    phase = RejectionSampling().sft_first(f)
    assert phase.task == "sft" and phase.steps == 5 and phase.optim.lr == 1e-3
    assert not {"preference", "kto", "rejection_sampling"} & set(phase)
    f.rejection_sampling.samples = 9  # a setting of the rounds, not of the phase
    assert RejectionSampling().sft_first(f) == phase
