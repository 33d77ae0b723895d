"""The final answer of a reply, and whether it is right: exact match after a documented parse.

The parser (`final_answer`):
1. If the reply contains "####" (GSM8K's final-answer marker), the answer is what follows
   the last one: its first number if it has one, else its text, stripped.
2. Otherwise the answer is the last number in the reply (an optional minus sign, digits
   with optional thousands commas, an optional decimal part).
3. Otherwise the reply has no answer (None): it counts as wrong, never as an error.

Answers compare after normalising (`normalize`): commas removed; numbers compared as
decimals, so "1,000", "1000" and "1000.0" are one answer and "-0" equals "0"; any other
text compared case-insensitively with its whitespace collapsed.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

FINAL_MARK = "####"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(reply: str | None) -> str | None:
    """The reply's final answer by the rules above; None if it has none."""
    text = reply or ""
    if FINAL_MARK in text:
        tail = text.rsplit(FINAL_MARK, 1)[1]
        number = NUMBER.search(tail)
        answer = number.group(0) if number else tail.strip()
        return answer or None
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    """The canonical form two answers are compared in."""
    text = answer.strip().rstrip(".").replace(",", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return " ".join(text.lower().split())
    if value == 0:
        return "0"  # -0, 0.0
    return format(value.normalize(), "f")


def is_correct(reply: str | None, answer: str) -> bool:
    """Whether the reply's final answer equals `answer` (both normalised)."""
    parsed = final_answer(reply)
    return parsed is not None and normalize(parsed) == normalize(answer)
