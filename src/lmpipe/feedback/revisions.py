"""Self-correction: a first attempt, words back, and a second attempt (seed 003 taken
literally; ILF, Scheurer et al. 2023; SCoRe, Kumar et al. 2024).

The second turn is one of three kinds (`TURN_KINDS`):
- `outcome`: the verifier's verdict on a wrong answer ("Your answer 8 is wrong.");
- `step`: the verifier's first wrong step where it can locate one ("12 - 3 is 9, not 8."),
  else the outcome words;
- `retry`: no verifier words, the same request after every first attempt ("Check your
  working and give your final answer."), right ones included, so that a model can also
  turn a right answer wrong.
With the verifier's words only a wrong first attempt gets a second turn (a verified answer
is final), so a right answer is never turned wrong there: Δc→i is 0 by construction.

The scores are SCoRe's: accuracy at attempt 1 and at attempt 2, Δi→c (the share of
problems wrong at attempt 1 and right at attempt 2) and Δc→i (right, then wrong), each with
its 95% interval, and the exact paired test that attempt 2 beats attempt 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.evaluation.intervals import paired_binary_summary, proportion_interval, ratio_interval
from lmpipe.feedback import rollouts
from lmpipe.feedback.judge import Verdict, judge

RETRY = "retry"
TURN_KINDS = ("outcome", "step", RETRY)
RETRY_WORDS = "Check your working and give your final answer."


def second_turn(verdict: Verdict, kind: str) -> str | None:
    """The user's second turn after a first attempt judged `verdict`, or None where there
    is none (the verifier's words after a right answer)."""
    if kind not in TURN_KINDS:
        raise ValueError(f"second-turn kind must be one of {TURN_KINDS}, got {kind!r}")
    if kind == RETRY:
        return RETRY_WORDS
    return None if verdict.correct else verdict.feedback(kind)


def revision_messages(prompt: str, first: str, turn: str) -> list[dict[str, str]]:
    """The conversation the second attempt answers: question, first attempt, words back."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": first},
            {"role": "user", "content": turn}]  # fmt: skip


@dataclass(frozen=True)
class Attempts:
    """One problem's two attempts: the second is the first where no second turn was asked."""

    first: str
    first_correct: bool
    turn: str | None
    second: str
    second_correct: bool


def two_attempts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    kind: str,
    sampling: rollouts.Sampling,
    device: torch.device | None = None,
    batch_size: int = 1,
    firsts: Sequence[str] | None = None,
) -> list[Attempts]:
    """Each problem answered, judged, told `kind`'s words and answered again (greedy at
    temperature 0); `firsts`: the first attempts already made (evaluation's replies)."""
    if firsts is None:
        firsts = [c.text for c in rollouts.complete(model, tokenizer, prompts, sampling, device,
                                                    batch_size)]  # fmt: skip
    verdicts = [judge(reply, answer) for reply, answer in zip(firsts, answers, strict=True)]
    turns = [second_turn(v, kind) for v in verdicts]
    asked = [i for i, turn in enumerate(turns) if turn is not None]
    conversations = [revision_messages(prompts[i], firsts[i], turns[i]) for i in asked]
    revised = dict(zip(asked, (c.text for c in rollouts.complete(
        model, tokenizer, conversations, sampling, device, batch_size)), strict=True))  # fmt: skip
    attempts = []
    for i, (first, verdict) in enumerate(zip(firsts, verdicts, strict=True)):
        second = revised.get(i, first)
        attempts.append(Attempts(first, verdict.correct, turns[i], second,
                                 judge(second, answers[i]).correct))  # fmt: skip
    return attempts


def correction_scores(
    first_correct: Sequence[bool],
    second_correct: Sequence[bool],
    prefix: str,
    clusters: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy at attempt 1 and 2, Δi→c and Δc→i (shares of all problems) with their 95%
    intervals (exact, or a cluster bootstrap over templates), and attempt 2 - attempt 1 with
    its exact paired interval and McNemar's one-sided p, as `<prefix>_<name>` columns."""
    first = np.asarray(first_correct, dtype=float)
    second = np.asarray(second_correct, dtype=float)
    if len(first) != len(second) or not len(first):
        raise ValueError(f"attempts of the same problems needed, got {len(first)} and "
                         f"{len(second)}")  # fmt: skip
    shares = {
        "attempt1": first,
        "attempt2": second,
        "delta_i_to_c": (1 - first) * second,
        "delta_c_to_i": first * (1 - second),
    }
    scores: dict[str, float] = {}
    for name, hits in shares.items():
        if clusters is None:
            low, high = proportion_interval(hits)
        else:
            low, high = ratio_interval(hits, np.ones(len(hits)), list(clusters))
        scores |= {f"{prefix}_{name}": float(hits.mean()), f"{prefix}_{name}_low": low,
                   f"{prefix}_{name}_high": high}  # fmt: skip
    gain = paired_binary_summary(second, first, f"{prefix}_gain")
    return scores | {k: float(v) for k, v in gain.items()}
