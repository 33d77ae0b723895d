"""The judge: a reply to a problem with a checkable answer, turned into a reward, a reason and
the words a teacher would say back.

The verdict comes from the answer checker (lmpipe.evaluation.answers: the final answer,
parsed and compared as a number where it is one); the reward is 1 for a right answer and 0
otherwise. Its words come in two kinds, the two that self-correction is trained and
measured with:
- `outcome`: whether the answer is right ("Your answer 8 is wrong.");
- `step`: where the reply's working can be checked, its first wrong step ("12 - 3 is 9, not
  8."). A step is an arithmetic fact the reply states, "a op b = c" (a chain of terms
  allowed) or a GSM8K calculator note "<<a*b=c>>"; steps are checked in order with exact
  fractions. A wrong answer whose stated steps are all right (or that shows none) gets the
  outcome words.

With `steps=True` the judge checks the working too (a process check): a right answer reached
through a wrong stated step ("-4 - 8 = -13 ... #### -12") is not correct. Sampled at
temperature 1, most of the tiny demo model's distinct right answers were such lucky ones (777
of 1,020 kept replies in one rejection-sampling round), and training on them teaches wrong
arithmetic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from lmpipe.evaluation.answers import as_number, final_answer, normalize

CORRECT, WRONG, NO_ANSWER, EMPTY = "correct", "wrong", "no answer", "empty"
WRONG_STEP = "wrong step"  # a right answer after a wrong stated step (judged with steps=True)
FEEDBACK_KINDS = ("outcome", "step")

_NUM = r"[-+\u2212]?\d(?:[\d,]*\d)?(?:\.\d+)?"
_OP = r"[-+*/×÷x\u2212]"
# A stated step: terms joined by operators, "=", a number (not part of a longer expression).
_STEP = re.compile(rf"(?<![\w.])((?:{_NUM}\s*{_OP}\s*)+{_NUM})\s*=\s*({_NUM})(?![\w.]|[.,]\d)")
_CALCULATOR = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_NUMBER_AT = re.compile(_NUM)
_SPACE = re.compile(r"\s*")
_OPERATOR_AT = re.compile(_OP)
_OPERATORS = {"×": "*", "x": "*", "÷": "/", "\u2212": "-"}


@dataclass(frozen=True)
class Verdict:
    """How a reply fares: `reason` is one of correct, wrong, wrong step, no answer, empty."""

    correct: bool
    answer: str | None  # the reply's final answer, as written
    reason: str
    wrong_step: str | None = None  # "12 - 3 is 9, not 8.": the first stated step that is wrong

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0

    def feedback(self, kind: str = "outcome") -> str:
        """The words for a new user turn: `outcome` or `step` (the first wrong step where
        one was found, else the outcome words)."""
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"feedback kind must be one of {FEEDBACK_KINDS}, got {kind!r}")
        if kind == "step" and self.wrong_step is not None:
            return self.wrong_step
        if self.reason == CORRECT:
            return f"Your answer {self.answer} is correct."
        if self.reason == WRONG:
            return f"Your answer {self.answer} is wrong."
        if self.reason == WRONG_STEP:
            return f"Your answer {self.answer} is right, but a step is wrong."
        if self.reason == EMPTY:
            return "Your reply is empty. Give your final answer."
        return "Your reply has no final answer. Give your final answer."


def judge(reply: str | None, answer: str, steps: bool = False) -> Verdict:
    """The verdict on `reply` for a problem whose answer is `answer`; with `steps`, a right
    answer counts only if every step the reply states is right too."""
    text = (reply or "").strip()
    if not text:
        return Verdict(False, None, EMPTY)
    parsed = final_answer(text)
    if parsed is None:
        return Verdict(False, None, NO_ANSWER, first_wrong_step(text))
    if normalize(parsed) == normalize(answer):
        wrong_step = first_wrong_step(text) if steps else None
        if wrong_step is not None:
            return Verdict(False, parsed, WRONG_STEP, wrong_step)
        return Verdict(True, parsed, CORRECT)
    return Verdict(False, parsed, WRONG, first_wrong_step(text))


def _shown(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    decimal = f"{float(value):.6f}".rstrip("0")
    return decimal if Fraction(decimal) == value else str(value)


def _terms(expression: str) -> tuple[list[str], list[str]] | None:
    """The numbers and the operators between them as written, or None where `expression` is
    not `a op b op c ...` (a sign belongs to a number only where a number is expected)."""
    numbers, operators, position = [], [], 0
    text = expression.strip()
    while True:
        number = _NUMBER_AT.match(text, position)
        if number is None:
            return None
        numbers.append(number.group(0))
        position = _SPACE.match(text, number.end()).end()
        if position == len(text):
            return numbers, operators
        operator = _OPERATOR_AT.match(text, position)
        if operator is None:
            return None
        operators.append(operator.group(0))
        position = _SPACE.match(text, operator.end()).end()


def evaluate_terms(expression: str) -> Fraction | None:
    """The exact value of `a op b op c ...` (+, -, *, /, × and ÷; * and / before + and -),
    or None where it is not such an expression or divides by zero."""
    parsed = _terms(expression)
    if parsed is None:
        return None
    values = [as_number(n) for n in parsed[0]]
    if any(v is None for v in values):
        return None
    terms, signs = [values[0]], []
    for written, value in zip(parsed[1], values[1:], strict=True):
        operator = _OPERATORS.get(written, written)
        if operator == "*":
            terms[-1] *= value
        elif operator == "/":
            if value == 0:
                return None
            terms[-1] /= value
        else:
            signs.append(operator)
            terms.append(value)
    total = terms[0]
    for sign, term in zip(signs, terms[1:], strict=True):
        total = total + term if sign == "+" else total - term
    return total


def first_wrong_step(reply: str) -> str | None:
    """The first arithmetic step the reply states that is wrong, in words; None if every
    stated step is right or none can be read."""
    steps: list[tuple[int, str, str]] = []
    for match in _CALCULATOR.finditer(reply):
        steps.append((match.start(), match.group(1).strip(), match.group(2).strip()))
    outside = _CALCULATOR.sub(lambda m: " " * len(m.group(0)), reply)
    for match in _STEP.finditer(outside):
        steps.append((match.start(), match.group(1).strip(), match.group(2).strip()))
    for _, expression, stated in sorted(steps):
        value, claimed = evaluate_terms(expression), as_number(stated)
        if value is not None and claimed is not None and value != claimed:
            numbers, operators = _terms(expression)  # type: ignore[misc]  # it evaluated
            lhs = " ".join(
                t for pair in zip(numbers, [*operators, ""], strict=True) for t in pair
            ).strip()
            return f"{lhs} is {_shown(value)}, not {stated}."
    return None
