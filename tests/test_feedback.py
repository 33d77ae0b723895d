"""The path every feedback method shares: rollouts (lmpipe.feedback.rollouts) and the judge
(lmpipe.feedback.judge). Two processes drawing what one does: tests/test_sharded_work.py."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from lmpipe.feedback.judge import (
    CORRECT,
    EMPTY,
    NO_ANSWER,
    WRONG,
    WRONG_STEP,
    evaluate_terms,
    judge,
)
from lmpipe.feedback.rollouts import Sampling, complete, generate_replies, sample

CPU = torch.device("cpu")

# --- the judge -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "answer", "reason", "reward", "outcome", "step"),
    [
        ("98 + 93 = 191\n191 - 77 = 114\n#### 114", "114", CORRECT, 1.0,
         "Your answer 114 is correct.", "Your answer 114 is correct."),
        ("12 - 3 = 8\n#### 8", "9", WRONG, 0.0,
         "Your answer 8 is wrong.", "12 - 3 is 9, not 8."),
        # the first wrong step, not a later one
        ("5 + 5 = 11\n11 + 1 = 13\n#### 13", "11", WRONG, 0.0,
         "Your answer 13 is wrong.", "5 + 5 is 10, not 11."),
        # every stated step right, the answer wrong: the outcome words
        ("5 + 5 = 10\n#### 12", "10", WRONG, 0.0,
         "Your answer 12 is wrong.", "Your answer 12 is wrong."),
        ("#### 7", "8", WRONG, 0.0, "Your answer 7 is wrong.", "Your answer 7 is wrong."),
        # a GSM8K calculator note, and a product before a sum
        ("She pays 2+3*4=<<2+3*4=20>>20.\n#### 20", "14", WRONG, 0.0,
         "Your answer 20 is wrong.", "2 + 3 * 4 is 14, not 20."),
        ("10 / 4 = 2\n#### 2", "2.5", WRONG, 0.0,
         "Your answer 2 is wrong.", "10 / 4 is 2.5, not 2."),
        ("I do not know ####", "3", NO_ANSWER, 0.0,
         "Your reply has no final answer. Give your final answer.",
         "Your reply has no final answer. Give your final answer."),
        ("  ", "3", EMPTY, 0.0, "Your reply is empty. Give your final answer.",
         "Your reply is empty. Give your final answer."),
        (None, "3", EMPTY, 0.0, "Your reply is empty. Give your final answer.",
         "Your reply is empty. Give your final answer."),
    ],
)  # fmt: skip
def test_the_judges_verdict_and_words(reply, answer, reason, reward, outcome, step) -> None:
    verdict = judge(reply, answer)
    assert verdict.reason == reason and verdict.reward == reward
    assert verdict.correct is (reason == CORRECT)
    assert verdict.feedback("outcome") == outcome
    assert verdict.feedback("step") == step


def test_a_right_answer_is_right_whatever_its_steps() -> None:
    assert judge("2 + 2 = 5\n#### 4", "4").correct  # the answer is judged, not the working


def test_with_steps_a_lucky_right_answer_is_not_correct() -> None:
    lucky = judge("0 - 4 = -4\n-4 - 8 = -13\n#### -12", "-12", steps=True)
    assert (lucky.correct, lucky.reason, lucky.reward) == (False, WRONG_STEP, 0.0)
    assert lucky.feedback("step") == "-4 - 8 is -12, not -13."
    assert lucky.feedback("outcome") == "Your answer -12 is right, but a step is wrong."
    assert judge("0 - 4 = -4\n-4 - 8 = -12\n#### -12", "-12", steps=True).correct
    assert judge("#### -12", "-12", steps=True).correct  # no stated step to be wrong
    assert judge("0 - 4 = -5\n#### -13", "-12", steps=True).reason == WRONG


def test_an_unknown_feedback_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="feedback kind"):
        judge("#### 1", "2").feedback("hint")


def test_step_arithmetic_equals_pythons_exact_fractions() -> None:
    """`evaluate_terms` against Python's own evaluation of the same expression over
    Fractions (operator precedence, left to right), on 500 random expressions."""
    rng = random.Random(0)
    for _ in range(500):
        numbers = [rng.randint(-20, 99) for _ in range(rng.randint(1, 5))]
        operators = [rng.choice("+-*/") for _ in numbers[1:]]
        written = str(numbers[0]) + "".join(f" {o} {n}" for o, n in zip(operators, numbers[1:],
                                                                         strict=True))  # fmt: skip
        python = f"Fraction({numbers[0]})" + "".join(
            f" {o} Fraction({n})" for o, n in zip(operators, numbers[1:], strict=True)
        )
        try:
            expected = eval(python, {"Fraction": Fraction})  # our own digits and operators
        except ZeroDivisionError:
            expected = None
        assert evaluate_terms(written) == expected, written


@pytest.mark.parametrize("text", ["1 2", "3 +", "+", "2 ** 3", "a + 1", ""])
def test_what_is_not_an_expression_has_no_value(text: str) -> None:
    assert evaluate_terms(text) is None


# --- rollouts ------------------------------------------------------------------------------


def test_samples_are_the_same_for_a_seed_and_leave_the_callers_stream(
    tiny_model, tiny_tokenizer
) -> None:
    prompts = ["What is AI?", "hi", [{"role": "user", "content": "Hello, how are you?"}]]
    sampling = Sampling(6, temperature=1.0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = sample(tiny_model, tiny_tokenizer, prompts, 4, sampling, 7, 5, CPU)
    assert torch.equal(torch.rand(1), before)  # the caller's stream is where it was
    again = sample(tiny_model, tiny_tokenizer, prompts, 4, sampling, 7, 5, CPU)
    other = sample(tiny_model, tiny_tokenizer, prompts, 4, sampling, 8, 5, CPU)
    assert [len(group) for group in first] == [4, 4, 4]
    assert first == again and first != other
    assert len({c.token_ids for group in first for c in group}) > 3  # not one reply repeated


def test_a_completion_ends_at_its_end_token_or_is_cut_at_the_limit(
    tiny_model, tiny_tokenizer
) -> None:
    """Token ids through the end token and nothing after it, `finished` set; or, without an
    end token, cut at max_new_tokens and not finished (what GRPO counts as clipped)."""
    eos, vocab = tiny_tokenizer.eos_token_id, tiny_model.config.vocab_size
    config = tiny_model.generation_config
    config.suppress_tokens = [eos]  # never ends
    cut = complete(tiny_model, tiny_tokenizer, ["hi", "What is AI?"], Sampling(3, 1.0), CPU, 2)
    assert [(len(c.token_ids), c.finished) for c in cut] == [(3, False), (3, False)]
    config.suppress_tokens = [t for t in range(vocab) if t != eos]  # ends at once
    ended = complete(tiny_model, tiny_tokenizer, ["hi", "What is AI?"], Sampling(3, 1.0), CPU, 2)
    assert [(c.token_ids, c.finished, c.text) for c in ended] == [((eos,), True, "")] * 2


def test_greedy_replies_are_the_texts_of_greedy_completions(tiny_model, tiny_tokenizer) -> None:
    prompts = ["hi", "What is AI?", "The quick brown fox"]
    texts = generate_replies(tiny_model, tiny_tokenizer, prompts, 5, batch_size=2)
    completions = complete(tiny_model, tiny_tokenizer, prompts, Sampling(5), CPU, 1)
    assert texts == [c.text for c in completions]  # batching (left padding) changes nothing
    assert sample(tiny_model, tiny_tokenizer, prompts, 2, Sampling(5), 0, 3, CPU) == [
        [c, c] for c in completions
    ]  # greedy: every sample is the greedy reply


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Sampling(0), "max_new_tokens"),
        (lambda: Sampling(4, temperature=-1), "temperature"),
        (lambda: Sampling(4, top_p=0), "top_p"),
    ],
)
def test_bad_sampling_settings_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_k_below_one_is_refused(tiny_model, tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match="k \\(replies per prompt\\)"):
        sample(tiny_model, tiny_tokenizer, ["hi"], 0, Sampling(4), 0, 2, CPU)
