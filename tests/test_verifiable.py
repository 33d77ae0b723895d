"""Problems with checkable answers: reasoning-gym's generators as SFT data (splits disjoint by
question and template, deterministic by seed), the final-answer parser, exact-match scoring
with bootstrap intervals, and the baselines beside it."""

from __future__ import annotations

import sys
from math import comb

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lmpipe.evaluation.answers import final_answer, is_correct, normalize
from lmpipe.evaluation.intervals import (
    PairedOutcomes,
    mcnemar,
    mean_interval,
    paired_binary_difference_interval,
    paired_difference_interval,
    paired_ratio_difference_interval,
    proportion_interval,
    ratio_interval,
)
from lmpipe.runs.config import ConfigError
from lmpipe.taskdata import reasoning_gym
from lmpipe.taskdata.conversations import Conversation
from lmpipe.taskdata.packages import MissingPackageError, bare_packages
from lmpipe.tasks.sft import MOST_FREQUENT, exact_match_scores, most_frequent_answer

SIZES = {"train": 300, "val": 30, "test": 60}
SMALL_SUMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}


# --- the parser ----------------------------------------------------------------------------


# Each row: a reply, the answer the parser reads (None: no answer), and an answer it must or
# must not be credited for (rules in lmpipe.evaluation.answers).
PARSER_TABLE = [
    # (reply, parsed, gold, credited)
    ("114", "114", "114", True),
    ("98 + 93 - 77 = 114", "114", "114", True),  # the last number
    ("-37", "-37", "-37", True),
    ("It is 1,250 apples.", "1,250", "1250", True),  # thousands in groups of three
    ("So 12 - 6 = 6 more.\n#### 6", "6", "6", True),  # the marker wins over later text
    ("#### 42 (because 40 + 2)", "42", "42", True),  # the first number after the marker
    ("#### 1\nno, #### 2", "2", "2", True),  # the last marker
    ("#### seven", "seven", "Seven", True),  # text after the marker when it has no number
    ("3.50", "3.50", "3.5", True),
    ("#### 1,2", "1,2", "12", False),  # a list, not twelve
    ("#### 1,2,3", "1,2,3", "123", False),
    ("#### 1, 2, 3", "1, 2, 3", "1", False),  # no credit for the first of a list
    ("#### 5 or 6", "5 or 6", "5", False),
    ("#### 3; 4", "3; 4", "3", False),
    ("#### 1,234,567", "1,234,567", "1234567", True),
    ("#### 1,2345", "1,2345", "12345", False),  # a broken group is not a number
    ("#### - 7", "-7", "-7", True),  # a spaced sign after the marker
    ("#### - 7", "-7", "7", False),
    ("#### \u22127", "\u22127", "-7", True),  # the Unicode minus
    ("#### +7", "+7", "7", True),
    ("#### 3/4", "3/4", "0.75", True),  # a fraction, not 3
    ("#### 3/4", "3/4", "3", False),
    ("1e3", "1e3", "1000", True),  # an exponent, not 1
    ("1e3", "1e3", "1", False),
    ("5-3 is 2", "2", "2", True),  # a hyphen between digits is no sign
    ("the 1/2/3 date", None, "1", False),  # no number in a malformed run
    ("-0", "-0", "0", True),
    ("5 + 2 = 7\n####", None, "7", False),  # an empty marker: no answer, no fallback
    ("5 + 2 = 7\n####   \n", None, "7", False),
    ("5 + 2 = 7", "7", "7", True),  # no marker at all: the last number
    ("no digits here", None, "5", False),
    ("", None, "5", False),
    (None, None, "5", False),
]


@pytest.mark.parametrize(("reply", "parsed", "gold", "credited"), PARSER_TABLE)
def test_the_parser_reads_numbers_and_credits_no_list(reply, parsed, gold, credited) -> None:
    assert final_answer(reply) == parsed
    assert is_correct(reply, gold) is credited


def test_answers_compare_as_normalised_numbers_or_text() -> None:
    assert normalize("1,000") == normalize("1000") == normalize("1000.0") == normalize("1e3")
    assert normalize("-0") == normalize("0.0") == "0"
    assert normalize("3.50") == normalize("3.5") and normalize("0.75") == normalize("3/4")
    assert normalize(" Seven. ") == normalize("seven")
    assert normalize("10") != normalize("100") and normalize("1,2") != normalize("12")
    assert is_correct("So the answer is 1,000", "1000")
    assert not is_correct("So the answer is 1,001", "1000")


# --- the intervals -------------------------------------------------------------------------


def test_mean_interval_matches_scipys_percentile_bootstrap() -> None:
    hits = np.random.default_rng(3).random(400) < 0.3
    ours = mean_interval(hits, resamples=4000, seed=1)
    theirs = stats.bootstrap(
        (hits.astype(float),),
        np.mean,
        n_resamples=4000,
        method="percentile",
        random_state=np.random.default_rng(7),
    )
    reference = theirs.confidence_interval
    # Two resamplings of the same data: equal to Monte-Carlo error (~0.005 here).
    assert ours == pytest.approx((reference.low, reference.high), abs=0.01)
    # ... and both near the normal approximation p ± 1.96 sqrt(p(1-p)/n)
    p, n = hits.mean(), len(hits)
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    assert ours == pytest.approx((p - half, p + half), abs=0.01)


def test_mean_interval_is_deterministic_by_seed_and_shrinks_with_more_examples() -> None:
    rng = np.random.default_rng(0)
    few, many = rng.random(50) < 0.5, rng.random(2000) < 0.5
    assert mean_interval(few, seed=4) == mean_interval(few, seed=4)
    assert np.diff(mean_interval(many))[0] < np.diff(mean_interval(few))[0] / 3


def test_constant_values_have_a_zero_width_interval() -> None:
    assert mean_interval(np.zeros(30)) == (0.0, 0.0)
    assert mean_interval(np.ones(30)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])


def test_paired_difference_interval_uses_the_same_examples_for_both() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.5).astype(float)
    flipped = a.copy()
    flipped[:15] = 1 - flipped[:15]  # b differs from a on 15 examples only
    low, high = paired_difference_interval(a, flipped)
    # Paired, the noise is that of 15 flips, not of two independent accuracies (±0.08).
    assert high - low < 0.06
    with pytest.raises(ValueError, match="equal"):
        paired_difference_interval(a, a[:-1])


def test_proportion_interval_is_clopper_pearson_and_never_zero_width() -> None:
    # Clopper–Pearson by its definition: beta quantiles of the binomial count.
    for k, n, confidence in ((0, 400, 0.95), (7, 40, 0.95), (7, 40, 0.90), (40, 40, 0.99)):
        hits = np.r_[np.ones(k), np.zeros(n - k)]
        tail = (1 - confidence) / 2
        low = 0.0 if k == 0 else stats.beta.ppf(tail, k, n - k + 1)
        high = 1.0 if k == n else stats.beta.ppf(1 - tail, k + 1, n - k)
        assert proportion_interval(hits, confidence) == pytest.approx((low, high), abs=1e-9)
    low, high = proportion_interval(np.zeros(400))
    assert (round(low, 3), round(high, 3)) == (0.0, 0.009)  # not "0.000 [0.000, 0.000]"
    assert np.diff(proportion_interval(np.r_[np.ones(7), np.zeros(33)], 0.90)) < np.diff(
        proportion_interval(np.r_[np.ones(7), np.zeros(33)], 0.95)
    )
    with pytest.raises(ValueError, match="0/1"):
        proportion_interval([0.0, 0.5, 1.0])


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_examples() -> None:
    champion = np.r_[np.ones(240), np.zeros(160)]
    challenger = champion.copy()
    challenger[240:244] = 1  # 4 more right, none wrong, of 400
    pairs = mcnemar(challenger, champion)
    assert (pairs.first_only, pairs.second_only, pairs.examples) == (4, 0, 400)
    assert pairs.p_first_better() == pytest.approx(0.0625)  # 0.5 ** 4: not significant at 5%
    assert pairs.p_second_better() == 1.0
    # By its definition: P(X >= b) for X ~ Binomial(b + c, 1/2), for other counts.
    for b, c in ((10, 2), (3, 9), (0, 0), (25, 13)):
        first = np.r_[np.ones(b), np.zeros(c), np.ones(5)]
        second = np.r_[np.zeros(b), np.ones(c), np.ones(5)]
        exact = sum(comb(b + c, i) for i in range(b, b + c + 1)) / 2 ** (b + c)
        assert mcnemar(first, second).p_first_better() == pytest.approx(exact)
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar(champion, champion[:-1])


@pytest.mark.parametrize("level", [0.05, 0.10])
def test_the_exact_difference_interval_agrees_with_mcnemar(level: float) -> None:
    for b in range(0, 15):
        for c in range(0, 6):
            pairs = PairedOutcomes(200, b, c)
            low, _ = pairs.difference_interval(1 - 2 * level)
            assert (low > 0) == (pairs.p_first_better() < level), (b, c)


def test_paired_differences_are_first_minus_second() -> None:
    ones, zeros = np.ones(50), np.zeros(50)
    assert paired_binary_difference_interval(ones, zeros)[0] > 0
    assert paired_binary_difference_interval(zeros, ones)[1] < 0
    rng = np.random.default_rng(0)
    losses = rng.uniform(1, 2, 60)
    assert paired_difference_interval(losses + 0.5, losses)[0] > 0
    assert paired_difference_interval(losses, losses + 0.5)[1] < 0
    weights = np.ones(60)
    low, _ = paired_ratio_difference_interval((losses + 0.5, weights), (losses, weights))
    assert low > 0


def test_statistic_interval_takes_its_confidence() -> None:
    from lmpipe.evaluation.intervals import statistic_interval

    values = np.random.default_rng(8).normal(size=300)
    for confidence in (0.80, 0.90, 0.95):
        ours = statistic_interval(lambda idx: values[idx].mean(-1), 300, confidence, seed=2)
        theirs = stats.bootstrap((values,), np.mean, confidence_level=confidence,
                                 method="percentile", random_state=np.random.default_rng(2),
                                 n_resamples=2000).confidence_interval  # fmt: skip
        assert ours == pytest.approx((theirs.low, theirs.high), abs=0.02)
    narrow = statistic_interval(lambda idx: values[idx].mean(-1), 300, 0.80)
    wide = statistic_interval(lambda idx: values[idx].mean(-1), 300, 0.95)
    assert np.diff(narrow)[0] < 0.8 * np.diff(wide)[0]


def test_a_cluster_bootstrap_resamples_whole_templates() -> None:
    rng = np.random.default_rng(4)
    # 8 templates of 40 problems: each template easy or hard as a whole.
    clusters = np.repeat([f"t{i}" for i in range(8)], 40)
    rates = np.repeat(rng.choice([0.1, 0.9], 8), 40)
    hits = (rng.random(320) < rates).astype(float)
    weights = np.ones(320)
    by_example = ratio_interval(hits, weights)
    by_template = ratio_interval(hits, weights, clusters)
    # The templates are the independent units: far wider than 320 independent problems.
    assert np.diff(by_template)[0] > 2.5 * np.diff(by_example)[0]
    sums = np.array([hits[clusters == f"t{i}"].sum() for i in range(8)])
    # 40 problems a template: the share of hits is the clusters' sum over 40 per cluster.
    reference = stats.bootstrap((np.arange(8),), lambda idx, axis=-1: sums[idx].mean(-1) / 40,
                                method="percentile", vectorized=True, n_resamples=2000,
                                random_state=np.random.default_rng(0))  # fmt: skip
    ci = reference.confidence_interval
    assert by_template == pytest.approx((ci.low, ci.high), abs=1e-9)
    with pytest.raises(ValueError, match="at least 5 clusters"):
        ratio_interval(hits[:160], weights[:160], clusters[:160])


# --- the generators ------------------------------------------------------------------------


def test_arithmetic_splits_never_share_a_question_and_repeat_by_seed() -> None:
    splits = reasoning_gym.load_splits("chain_sum", SIZES, 0, SMALL_SUMS, 0.05, 0.1)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    questions = {k: [c.prompt for c in v] for k, v in splits.items()}
    for name, items in questions.items():
        assert len(set(items)) == len(items), name  # no duplicate within a split
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["train"]) & set(questions["val"])
    assert not set(questions["val"]) & set(questions["test"])
    again = reasoning_gym.load_splits("chain_sum", SIZES, 0, SMALL_SUMS, 0.05, 0.1)
    assert again == splits
    other = reasoning_gym.load_splits("chain_sum", SIZES, 1, SMALL_SUMS, 0.05, 0.1)
    assert [c.prompt for c in other["test"]] != questions["test"]


def test_ids_name_the_problem_whatever_the_seed() -> None:
    first = reasoning_gym.load_splits("chain_sum", SIZES, 0, SMALL_SUMS, 0.05, 0.1)
    second = reasoning_gym.load_splits("chain_sum", SIZES, 1, SMALL_SUMS, 0.05, 0.1)
    by_id = {c.id: c.prompt for split in first.values() for c in split}
    other = {c.id: c.prompt for split in second.values() for c in split}
    assert len(by_id) == sum(SIZES.values())  # one id per problem
    shared = set(by_id) & set(other)
    assert len(shared) > 50  # two seeds over one small problem space share problems ...
    assert all(by_id[i] == other[i] for i in shared)  # ... and an id is one question
    questions = {q: i for i, q in by_id.items()}
    assert all(questions[q] == i for i, q in other.items() if q in questions)
    # Other options are other problems, even where a question reads the same.
    wider = reasoning_gym.load_splits("chain_sum", SIZES, 0, {**SMALL_SUMS, "max_digits": 3},
                                      0.05, 0.1)  # fmt: skip
    assert not {c.id for s in wider.values() for c in s} & set(by_id)


@pytest.mark.parametrize(
    ("generator", "style"),
    [("basic_arithmetic", {"format_style": "natural"}),  # four wordings of one expression
     ("basic_arithmetic", {"format_style": "simple"}), ("chain_sum", {})],
)  # fmt: skip
def test_arithmetic_splits_are_disjoint_by_expression(generator: str, style: dict) -> None:
    options = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2, **style}
    sizes = {"train": 800, "val": 50, "test": 200}
    splits = reasoning_gym.load_splits(generator, sizes, 0, options, 0.05, 0.1)

    def expression(conversation: Conversation) -> str:
        # The expression as the question shows it: digits, operators and brackets.
        return "".join(ch for ch in conversation.prompt if ch.isdigit() or ch in "+-*/()")

    expressions = {k: [expression(c) for c in v] for k, v in splits.items()}
    assert len(set(expressions["test"])) == len(expressions["test"])  # each expression once
    assert not set(expressions["train"]) & set(expressions["test"])
    assert not set(expressions["train"]) & set(expressions["val"])
    assert not set(expressions["val"]) & set(expressions["test"])


def test_every_arithmetic_answer_is_right() -> None:
    splits = reasoning_gym.load_splits("chain_sum", SIZES, 0, SMALL_SUMS, 0.05, 0.1)
    for conversation in splits["test"]:
        expression = conversation.prompt.rsplit(":", 1)[1].rstrip("= ")
        assert int(conversation.answer) == eval(expression)  # only digits, + and -
        assert is_correct(conversation.messages[1]["content"], conversation.answer)


def test_gsm_symbolic_splits_are_disjoint_by_template() -> None:
    splits = reasoning_gym.load_splits("gsm_symbolic", {"train": 200, "val": 20, "test": 40},
                                       0, {}, 0.05, 0.1)  # fmt: skip
    templates = {k: {c.cluster for c in v} for k, v in splits.items()}
    assert len(templates["train"]) > 20
    assert not templates["train"] & templates["test"]
    assert not templates["train"] & templates["val"]
    assert not templates["val"] & templates["test"]
    for conversation in splits["test"]:
        reply = conversation.messages[1]["content"]
        assert "####" in reply  # the worked solution ends with the marked answer
        assert is_correct(reply, conversation.answer)


def test_template_split_takes_shares_of_the_templates_in_a_stable_order() -> None:
    groups = reasoning_gym.template_split(list(range(80)), 0.05, 0.1)
    assert [len(groups[s]) for s in ("train", "val", "test")] == [68, 4, 8]
    assert groups == reasoning_gym.template_split(list(reversed(range(80))), 0.05, 0.1)


def test_bad_generator_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"finetune\.reasoning_gym\.generator"):
        reasoning_gym.load_splits("sudoku", SIZES, 0, {}, 0.05, 0.1)
    with pytest.raises(ConfigError, match=r"finetune\.reasoning_gym\.options"):
        reasoning_gym.load_splits("chain_sum", SIZES, 0, {"min_termz": 2}, 0.05, 0.1)
    with pytest.raises(ConfigError, match=r"finetune\.reasoning_gym\.test_size"):
        reasoning_gym.load_splits("chain_sum", {**SIZES, "test": 0}, 0, {}, 0.05, 0.1)
    # Single-digit sums of two terms: ~200 distinct problems cannot fill 390.
    tiny_space = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    with pytest.raises(ConfigError, match="distinct problems"):
        reasoning_gym.load_splits("chain_sum", SIZES, 0, tiny_space, 0.05, 0.1)


def test_a_missing_package_names_the_dataset_key(monkeypatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.delitem(sys.modules, "nonexistent_pkg", raising=False)
    with pytest.raises(MissingPackageError, match=r"finetune\.dataset=reasoning_gym"):
        bare_packages("nonexistent_pkg", (), "finetune.dataset=reasoning_gym", "reasoning-gym")


# --- exact-match scoring and its baselines -------------------------------------------------


def conversation(answer: str) -> Conversation:
    return Conversation("c", [{"role": "user", "content": "q"}], answer=answer)


def test_most_frequent_answer_is_deterministic_on_ties() -> None:
    assert most_frequent_answer([conversation(a) for a in ("7", "3", "7", "3", "1")]) == "3"
    assert most_frequent_answer([conversation(a) for a in ("7", "7.0", "3")]) == "7"
    with pytest.raises(ValueError, match="no answers"):
        most_frequent_answer([Conversation("c", [])])


def test_exact_match_scores_each_label_and_the_most_frequent_answer() -> None:
    frame = pd.DataFrame({
        "answer": [3, 14, -2, 3],  # as read back from predictions.csv: numbers
        "finetuned_reply": ["3", "1 + 13 = 14", "", "#### 4"],
        "retrieval_reply": ["3", "41", "-2", "3"],
        f"{MOST_FREQUENT}_reply": [3, 3, 3, 3],
    })  # fmt: skip
    metrics = exact_match_scores(frame, ["finetuned", "retrieval", MOST_FREQUENT])
    assert metrics["finetuned_exact_match"] == 0.5
    assert metrics["finetuned_answered"] == 0.75  # the empty reply has no answer
    assert metrics["retrieval_exact_match"] == 0.75
    assert metrics[f"{MOST_FREQUENT}_exact_match"] == 0.5
    assert f"{MOST_FREQUENT}_answered" not in metrics  # a constant: no reply to parse
    for label in ("finetuned", "retrieval", MOST_FREQUENT):
        low, high = metrics[f"{label}_exact_match_low"], metrics[f"{label}_exact_match_high"]
        assert low <= metrics[f"{label}_exact_match"] <= high


def test_vectorised_macro_f1_is_scikit_learns() -> None:
    from sklearn.metrics import f1_score

    from lmpipe.evaluation.intervals import macro_f1

    rng = np.random.default_rng(2)
    truth, guess = rng.integers(0, 4, (5, 60)), rng.integers(0, 5, (5, 60))
    guess[0] = np.where(guess[0] == 3, 0, guess[0])  # class 3 never predicted in row 0
    ours = macro_f1(truth, guess, 4)
    for row in range(5):
        theirs = f1_score(truth[row], guess[row], labels=[0, 1, 2, 3], average="macro",
                          zero_division=0)  # fmt: skip
        assert ours[row] == pytest.approx(theirs)


def test_statistic_interval_resamples_examples() -> None:
    from lmpipe.evaluation.intervals import statistic_interval

    hits = (np.random.default_rng(5).random(300) < 0.4).astype(float)
    # The mean as a statistic of indices: the same interval as mean_interval's.
    assert statistic_interval(lambda idx: hits[idx].mean(-1), 300, seed=3) == pytest.approx(
        mean_interval(hits, seed=3), abs=0.01
    )


def test_worked_chain_sums_show_correct_steps_that_end_in_the_answer() -> None:
    sums = {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2}
    splits = reasoning_gym.load_splits("chain_sum", SIZES, 0, sums, 0.05, 0.1, worked=True)
    for conversation in splits["test"]:
        *steps, last = conversation.messages[1]["content"].split("\n")
        terms = conversation.prompt.rsplit(":", 1)[1].rstrip("= ").split()
        assert len(steps) == len(terms) // 2  # one line per operator
        for line in steps:
            left, result = line.split(" = ")
            assert eval(left) == int(result)  # "191 - 77", digits and one operator
        assert last == f"#### {conversation.answer}"
        assert is_correct(conversation.messages[1]["content"], conversation.answer)
    plain = reasoning_gym.load_splits("chain_sum", SIZES, 0, sums, 0.05, 0.1)
    assert [c.prompt for c in plain["test"]] == [c.prompt for c in splits["test"]]


def test_worked_replies_only_where_a_generator_has_them() -> None:
    with pytest.raises(ConfigError, match=r"reasoning_gym\.worked"):
        reasoning_gym.load_splits("basic_arithmetic", SIZES, 0, {}, 0.05, 0.1, worked=True)
