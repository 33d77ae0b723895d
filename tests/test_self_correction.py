"""Self-correction (lmpipe.feedback.revisions, lmpipe.tasks.self_correction): the second
turn each kind gives, the two attempts, SCoRe's scores by hand, what a round keeps and how
it is trained (the loss on the revision alone), and the config it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lmpipe.data.batches import IGNORE_INDEX
from lmpipe.evaluation.intervals import proportion_interval
from lmpipe.feedback import revisions
from lmpipe.feedback.judge import judge
from lmpipe.feedback.rollouts import Completion
from lmpipe.runs.config import ConfigError, EvaluateConfig, FinetuneConfig, validate
from lmpipe.runs.processes import DistEnv
from lmpipe.taskdata import conversations
from lmpipe.taskdata.conversations import Conversation
from lmpipe.tasks.finetuning import checked_task
from lmpipe.tasks.self_correction import SelfCorrection, judged_revisions, round_metrics
from lmpipe.tasks.sft import conversation_splits

CPU = torch.device("cpu")


def reply(text: str) -> Completion:
    return Completion(text, (1, 2), True)


@pytest.mark.parametrize(
    ("first", "kind", "turn"),
    [
        ("7 + 5 = 12\n12 - 3 = 8\n#### 8", "outcome", "Your answer 8 is wrong."),
        ("7 + 5 = 12\n12 - 3 = 8\n#### 8", "step", "12 - 3 is 9, not 8."),
        ("7 + 5 = 12\n12 - 3 = 9\n#### 8", "step", "Your answer 8 is wrong."),  # no wrong step
        ("I do not know", "step", "Your reply has no final answer. Give your final answer."),
        ("", "outcome", "Your reply is empty. Give your final answer."),
        ("7 + 5 = 12\n12 - 3 = 9\n#### 9", "outcome", None),  # a verified answer is final
        ("7 + 5 = 12\n12 - 3 = 9\n#### 9", "step", None),
        ("7 + 5 = 12\n12 - 3 = 9\n#### 9", "retry", revisions.RETRY_WORDS),
        ("#### 8", "retry", revisions.RETRY_WORDS),
    ],
)
def test_the_second_turn_of_each_kind(first: str, kind: str, turn: str | None) -> None:
    assert revisions.second_turn(judge(first, "9"), kind) == turn


def test_an_unknown_turn_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="second-turn kind"):
        revisions.second_turn(judge("#### 1", "1"), "hint")


def test_two_attempts_ask_again_only_where_the_kind_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in model answers 9 to any conversation whose last turn names a wrong step,
    else repeats its first answer ("#### 8" to problem a, "#### 4" to b)."""
    seen: list[object] = []

    def complete(model, tokenizer, prompts, sampling, device=None, batch_size=1):
        seen.extend(prompts)
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                out.append(reply("12 - 3 = 8\n#### 8" if prompt == "a" else "#### 4"))
            elif "not" in prompt[-1]["content"]:
                out.append(reply("12 - 3 = 9\n#### 9"))
            else:
                out.append(reply(prompt[1]["content"]))
        return out

    monkeypatch.setattr("lmpipe.feedback.rollouts.complete", complete)
    sampling = revisions.rollouts.Sampling(8)
    step = revisions.two_attempts(None, None, ["a", "b"], ["9", "4"], "step", sampling)
    assert [(a.first_correct, a.second_correct) for a in step] == [(False, True), (True, True)]
    assert step[0].turn == "12 - 3 is 9, not 8." and step[1].turn is None
    assert step[1].second == step[1].first  # b was right: no second turn
    assert len(seen) == 3  # two first attempts, one revision
    seen.clear()
    outcome = revisions.two_attempts(None, None, ["a", "b"], ["9", "4"], "outcome", sampling,
                                     firsts=["12 - 3 = 8\n#### 8", "#### 4"])  # fmt: skip
    assert [a.second_correct for a in outcome] == [False, True] and len(seen) == 1
    retry = revisions.two_attempts(None, None, ["a", "b"], ["9", "4"], "retry", sampling)
    assert [a.turn for a in retry] == [revisions.RETRY_WORDS] * 2


def test_correction_scores_by_hand() -> None:
    first = [1, 1, 1, 0, 0, 0, 0, 0]
    second = [1, 1, 0, 1, 1, 1, 0, 0]
    scores = revisions.correction_scores(first, second, "m_step")
    assert scores["m_step_attempt1"] == pytest.approx(3 / 8)
    assert scores["m_step_attempt2"] == pytest.approx(5 / 8)
    assert scores["m_step_delta_i_to_c"] == pytest.approx(3 / 8)
    assert scores["m_step_delta_c_to_i"] == pytest.approx(1 / 8)
    low, high = proportion_interval(np.array([0, 0, 0, 1, 1, 1, 0, 0.0]))
    assert (scores["m_step_delta_i_to_c_low"], scores["m_step_delta_i_to_c_high"]) == (low, high)
    assert scores["m_step_gain"] == pytest.approx(2 / 8)
    assert scores["m_step_gain_first_only"] == 3 and scores["m_step_gain_second_only"] == 1
    # McNemar's one-sided p for 3 against 1 discordant pairs: P(X >= 3), X ~ Bin(4, 1/2).
    assert scores["m_step_gain_p_better"] == pytest.approx(5 / 16)
    with pytest.raises(ValueError, match="same problems"):
        revisions.correction_scores([1], [1, 0], "m")


def problem(name: str, answer: str) -> Conversation:
    return Conversation(name, [{"role": "user", "content": f"{name}?"},
                               {"role": "assistant", "content": f"#### {answer}"}],
                        answer=answer)  # fmt: skip


def test_a_round_keeps_distinct_verified_revisions_of_wrong_attempts() -> None:
    problems = [problem("a", "9"), problem("b", "4")]
    firsts = [[reply("#### 8"), reply("#### 9"), reply("#### 8")], [reply("#### 4")]]
    # a's two wrong attempts are revised twice each; b was right: no second turn.
    revised = [[reply("#### 9"), reply("#### 7")], [reply("#### 9"), reply("####  9")]]
    table = judged_revisions(problems, firsts, "outcome", revised, None)
    assert table["revised"].tolist() == [True, True, False, True, True, False]
    assert table["correct"].tolist() == [True, False, False, True, True, False]
    # The same (attempt, revision) text twice is kept once.
    assert table["kept"].tolist() == [True, False, False, False, False, False]
    assert table.loc[0, "turn"] == "Your answer 8 is wrong."
    capped = judged_revisions(problems, firsts, "outcome",
                              [[reply("#### 9"), reply("9 #### 9")], revised[1]], 1)  # fmt: skip
    assert capped["kept"].sum() == 1
    metrics = round_metrics(table)
    assert metrics["first_attempt_accuracy"] == pytest.approx(2 / 4)
    assert metrics["revisions"] == 4.0
    assert metrics["revision_accuracy_after_wrong"] == pytest.approx(3 / 4)
    assert metrics["kept_examples"] == 1.0 and metrics["problems_with_kept_revision"] == 0.5
    with pytest.raises(ValueError, match="more revision groups"):
        judged_revisions(problems, firsts, "outcome", [*revised, revised[0]], None)


def test_with_steps_checked_a_lucky_revision_is_not_kept() -> None:
    revised = [[reply("9 - 1 = 9\n#### 9"), reply("10 - 1 = 9\n#### 9")]]
    table = judged_revisions([problem("a", "9")], [[reply("#### 8")]], "outcome", revised,
                             None, check_steps=True)  # fmt: skip
    assert table["kept"].tolist() == [False, True]


def test_unfixed_attempts_get_the_reference_as_revision() -> None:
    """reference_revisions: each distinct first attempt none of whose revisions was kept is
    paired with the reference solution; a fixed one and a right one are not."""
    from lmpipe.tasks.self_correction import reference_revisions

    problems = [problem("a", "9"), problem("b", "4")]
    firsts = [[reply("#### 8"), reply("#### 7"), reply("#### 8")], [reply("#### 4")]]
    revised = [[reply("#### 9")], [reply("#### 6")], [reply("#### 5")]]
    table = judged_revisions(problems, firsts, "outcome", revised, None)
    added = reference_revisions(table, problems)
    assert [c.messages[1]["content"] for c in added] == ["#### 7"]  # "#### 8" was fixed once
    (conversation,) = added
    assert conversation.messages[3]["content"] == "#### 9" and conversation.last_turn_only
    assert conversation.messages[2]["content"] == "Your answer 7 is wrong."


def test_retry_revises_right_attempts_too() -> None:
    table = judged_revisions([problem("b", "4")], [[reply("#### 4")]], "retry",
                             [[reply("#### 4"), reply("#### 5")]], None)  # fmt: skip
    assert table["first_correct"].all() and table["correct"].tolist() == [True, False]
    assert round_metrics(table)["revision_accuracy_after_right"] == 0.5


def test_a_revision_is_trained_on_its_last_turn_alone(tiny_tokenizer) -> None:
    messages = [*revisions.revision_messages("2 + 3 =", "#### 6", "Your answer 6 is wrong."),
                {"role": "assistant", "content": "#### 5"}]  # fmt: skip
    every = conversations.encode_conversation(tiny_tokenizer, messages, 512)
    last = conversations.encode_conversation(tiny_tokenizer, messages, 512, last_turn_only=True)
    assert every["input_ids"] == last["input_ids"]
    trained = [i for i, label in enumerate(last["labels"]) if label != IGNORE_INDEX]
    every_trained = [i for i, label in enumerate(every["labels"]) if label != IGNORE_INDEX]
    assert trained and set(trained) < set(every_trained)
    assert trained == list(range(trained[0], trained[-1] + 1))  # one span: the last turn
    assert (
        tiny_tokenizer.decode([last["input_ids"][i] for i in trained]).strip().startswith("#### 5")
    )
    conversation = Conversation("x", messages, answer="5", last_turn_only=True)
    assert conversations.encode_all(tiny_tokenizer, [conversation], 512) == [last]


def small_problems() -> FinetuneConfig:
    f = FinetuneConfig(task="self_correction", dataset="reasoning_gym")
    f.reasoning_gym.train_size, f.reasoning_gym.val_size, f.reasoning_gym.test_size = 24, 6, 6
    f.self_correction.samples = 2
    f.self_correction.batch_size = 4
    return f


@pytest.mark.parametrize("references", [True, False])
def test_a_round_revises_training_problems_only(
    monkeypatch: pytest.MonkeyPatch, saved_model: Path, tiny_tokenizer, tmp_path: Path,
    references: bool,
) -> None:  # fmt: skip
    """A stand-in sampler answers every first attempt wrong and revises right after the
    verifier's words: each problem's distinct revisions become two-turn conversations that
    train on the revision alone; no held-out problem is ever asked."""
    f = small_problems()
    f.self_correction.references = references
    splits = conversation_splits(f)
    answer = {c.prompt: c.answer for c in splits["train"]}
    asked: list[str] = []

    def sample(model, tokenizer, prompts, k, sampling, seed, batch_size, device, what=""):
        groups = []
        for prompt in prompts:
            question = prompt if isinstance(prompt, str) else prompt[0]["content"]
            asked.append(question)
            right = f"#### {answer[question]}"
            groups.append([reply(f"#### -{i + 1}") if isinstance(prompt, str) else reply(right)
                           for i in range(k)])  # fmt: skip
        return groups

    monkeypatch.setattr("lmpipe.feedback.rollouts.sample", sample)
    task, table = SelfCorrection().prepare(f, saved_model, tiny_tokenizer, CPU,
                                           tmp_path / "cache", DistEnv(), seed=3)  # fmt: skip
    held_out = {c.prompt for split in ("val", "test") for c in splits[split]}
    assert asked and not set(asked) & held_out
    trained = task.splits(f)["train"]
    own = [c for c in trained if c.last_turn_only]
    # Two wrong first attempts per problem, each revised twice to the same right reply:
    # distinct (attempt, revision) pairs are two per problem.
    assert len(own) == 2 * len(splits["train"])
    assert all(len(c.messages) == 4 and judge(c.messages[3]["content"], c.answer).correct
               and c.messages[2]["content"].endswith("is wrong.") for c in own)  # fmt: skip
    assert (len(trained) - len(own) == len(splits["train"])) is references
    assert task.splits(f)["test"] == splits["test"]
    assert set(table.columns) >= {"first", "turn", "revision", "kept"}
    # Revisions right only after a wrong step are not kept (finetune.self_correction.
    # check_steps, on by default).
    lucky = lambda *a, **kw: [[reply("1 + 1 = 3\n" + g[0].text)  # noqa: E731
                               for _ in g] for g in sample(*a, **kw)]  # fmt: skip
    monkeypatch.setattr("lmpipe.feedback.rollouts.sample", lucky)
    f.self_correction.references = True
    task, _ = SelfCorrection().prepare(f, saved_model, tiny_tokenizer, CPU, tmp_path / "c2",
                                       DistEnv(), seed=3)  # fmt: skip
    assert not [c for c in task.splits(f)["train"] if c.last_turn_only]
    # ... unless the reference solutions stand in for the revisions the model could not write.
    f.self_correction.reference_revisions = True
    task, _ = SelfCorrection().prepare(f, saved_model, tiny_tokenizer, CPU, tmp_path / "c3",
                                       DistEnv(), seed=3)  # fmt: skip
    stand_ins = [c for c in task.splits(f)["train"] if c.last_turn_only]
    assert len(stand_ins) == len(splits["train"])  # one distinct wrong attempt each
    reference = {c.prompt: c.messages[1]["content"] for c in splits["train"]}
    assert all(c.messages[3]["content"] == reference[c.prompt] for c in stand_ins)


def test_held_out_scores_at_both_attempts(saved_model: Path, tiny_tokenizer) -> None:
    """Through predict and score on a (random) tiny model: every kind's second attempt and
    its scores, with the first attempt equal to SFT's exact match."""
    from lmpipe.training.model import load_model

    f = small_problems()
    e = EvaluateConfig(max_new_tokens=6, batch_size=4)
    task = SelfCorrection()
    splits = task.splits(f)
    frame = task.predict({"finetuned": load_model(saved_model)}, tiny_tokenizer, splits, f, e)
    metrics = task.score(frame, ["finetuned"], splits)
    for kind in revisions.TURN_KINDS:
        assert f"finetuned_{kind}_revision" in frame
        assert metrics[f"finetuned_{kind}_attempt1"] == metrics["finetuned_exact_match"]
        for name in ("attempt2", "delta_i_to_c", "delta_c_to_i"):
            value = metrics[f"finetuned_{kind}_{name}"]
            assert metrics[f"finetuned_{kind}_{name}_low"] <= value
            assert value <= metrics[f"finetuned_{kind}_{name}_high"]
    assert (frame["finetuned_retry_turn"] == revisions.RETRY_WORDS).all()


def test_score_counts_what_each_attempt_got_right() -> None:
    frame = pd.DataFrame({
        "id": ["a", "b", "c", "d"], "prompt": ["a", "b", "c", "d"], "answer": ["1"] * 4,
        "generated": [True] * 4, "target_tokens": [1] * 4, "finetuned_loss": [0.0] * 4,
        "finetuned_reply": ["#### 1", "#### 2", "#### 2", "#### 1"],
        "retrieval_reply": ["#### 2"] * 4, "most_frequent_reply": ["1"] * 4,
    })  # fmt: skip
    for kind in revisions.TURN_KINDS:
        frame[f"finetuned_{kind}_revision"] = ["#### 1", "#### 1", "#### 3", "#### 2"]
    metrics = SelfCorrection().score(frame, ["finetuned"], {})
    assert metrics["finetuned_outcome_attempt1"] == 0.5
    assert metrics["finetuned_outcome_attempt2"] == 0.5
    assert metrics["finetuned_outcome_delta_i_to_c"] == 0.25  # b
    assert metrics["finetuned_outcome_delta_c_to_i"] == 0.25  # d
    for kind in revisions.TURN_KINDS:
        frame[f"finetuned_{kind}_turn"] = ""
    frame["reference"] = "#### 1"
    report = SelfCorrection().report(frame, metrics, ["finetuned"], EvaluateConfig())
    shown = report.tables["generations.json"]
    assert {"finetuned_step_turn", "finetuned_step_revision", "finetuned_reply"} <= set(shown)


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        ({"self_correction": {"revisions": 0}}, "'finetune.self_correction.revisions' must"),
        ({"self_correction": {"samples": 0}}, "'finetune.self_correction.samples' must"),
        ({"self_correction": {"feedback": "hint"}}, "'finetune.self_correction.feedback'"),
        ({"self_correction": {"restart": "x"}}, "'finetune.self_correction.restart'"),
        ({"dataset": "chatterbot"}, "task=self_correction keeps .* no checkable answers"),
    ],
)
def test_bad_self_correction_configs_name_the_key(settings: dict, pattern: str) -> None:
    finetune = {"task": "self_correction", "dataset": "reasoning_gym", **settings}
    with pytest.raises(ConfigError, match=pattern):
        checked_task(validate({"finetune": finetune}))
