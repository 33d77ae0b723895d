"""The final answer of a reply, and whether it is right: exact match after a documented parse.

The parser (`final_answer`):
1. If the reply contains "####" (GSM8K's final-answer marker), the answer is read after the
   last marker only, on its first non-empty line: the first number there; or, where that
   number is followed by another one in a list ("1, 2", "3; 4", "5 or 6"), the whole line,
   which never equals a number; or, with no number, the line's text. A marker with nothing
   after it is no answer, whatever numbers come before it: the reply committed to a marked
   answer and gave none (a number in its working is not its answer).
2. Otherwise the answer is the last number in the reply.
3. Otherwise the reply has no answer (None): it counts as wrong, never as an error.

A number is: an optional sign ("-", "+" or the Unicode minus "−"; after the marker a space
may follow it, "#### - 7"), then digits, with commas only as thousands separators in groups
of three ("1,250"; "1,2" is the list 1, 2, not 12), an optional decimal part, an optional
exponent ("1e3") and an optional denominator ("3/4"). A run of digits that is none of these
("1,2345", "1/2/3") is not a number.

Answers compare after normalising (`normalize`): numbers as exact fractions, so "1,000",
"1000", "1000.0" and "1e3" are one answer, "3/4" equals "0.75" and "-0" equals "0"; any
other text case-insensitively with its whitespace collapsed and a final full stop dropped.
"""

from __future__ import annotations

import re
from fractions import Fraction

FINAL_MARK = "####"
_MINUS = "\u2212"
_SIGN = rf"[-+{_MINUS}]"
_MAGNITUDE = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?"
# Not inside a longer token (a word, a decimal, a list "1,2", a fraction) on either side.
NUMBER = re.compile(rf"(?<![\w.,/]){_SIGN}?{_MAGNITUDE}(?![\w]|[.,/]\d)")
_SPACED_SIGN = re.compile(rf"^({_SIGN})\s+(?=\d)")
# What makes a marked number the first of a list: a separator and another number.
_LIST_GOES_ON = re.compile(rf"^\s*(?:[,;&]|\band\b|\bor\b)\s*{_SIGN}?\d")
_WHOLE_NUMBER = re.compile(rf"{_SIGN}?{_MAGNITUDE}")


def final_answer(reply: str | None) -> str | None:
    """The reply's final answer by the rules above; None if it has none."""
    text = reply or ""
    if FINAL_MARK not in text:
        numbers = NUMBER.findall(text)
        return numbers[-1] if numbers else None
    tail = text.rsplit(FINAL_MARK, 1)[1].strip()
    line = _SPACED_SIGN.sub(r"\1", tail.split("\n", 1)[0].strip())
    if not line:
        return None
    number = NUMBER.search(line)
    if number is None:
        return line
    if _LIST_GOES_ON.match(line[number.end() :]):
        return line  # a list: compared as text, it equals no number
    return number.group(0)


def as_number(answer: str) -> Fraction | None:
    """The exact value of `answer` if it is one number by the rules above, else None."""
    text = answer.strip().removesuffix(".").strip().replace(_MINUS, "-")
    if not _WHOLE_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def normalize(answer: str) -> str:
    """The canonical form two answers are compared in."""
    value = as_number(answer)
    if value is not None:
        return str(value)  # "3/4", "1000", "0" (for -0)
    return " ".join(answer.strip().removesuffix(".").lower().split())


def is_correct(reply: str | None, answer: str) -> bool:
    """Whether the reply's final answer equals `answer` (both normalised)."""
    parsed = final_answer(reply)
    return parsed is not None and normalize(parsed) == normalize(answer)
