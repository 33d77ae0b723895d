"""Text repairs and document-level filters for the clean stage.

Repairs change text (normalise, strip); filters decide to keep or drop a document and
name the rule that dropped it, so every drop is counted per rule.
"""

from __future__ import annotations

import re
import unicodedata

from lmpipe.config import CleanConfig

# nroff bold/underline: "c\bc" and "_\bc" render as c. Applied repeatedly for stacked marks.
_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")
# C0 and C1 controls and DEL, except tab and newline; \r is folded into \n first.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def fix_overstrike(text: str) -> str:
    while "\x08" in text:
        fixed = _OVERSTRIKE.sub("", text)
        if fixed == text:  # a backspace with nothing before it
            return text.replace("\x08", "")
        text = fixed
    return text


def strip_control(text: str) -> str:
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def repair(text: str, cfg: CleanConfig) -> str:
    """Normalise and strip a document's text; the order matters (overstrikes use \\b)."""
    if cfg.fix_overstrike:
        text = fix_overstrike(text)
    if cfg.strip_control:
        text = strip_control(text)
    if cfg.normalize:
        text = unicodedata.normalize(cfg.normalize, text)
    return text.strip()


def drop_reason(text: str, cfg: CleanConfig) -> str | None:
    """The rule that drops this (repaired) document, or None to keep it."""
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if "\ufffd" in text and text.count("\ufffd") > 0.01 * len(text):
        return "undecodable"
    return None
