"""Quality rules for fine-tuning examples, each switched by finetune.selection.quality."""

from __future__ import annotations

import difflib
import re

from omegaconf import DictConfig

from lmpipe.data.filters import quality_reason
from lmpipe.runs.config import QualityConfig
from lmpipe.selection.candidates import Candidate

EMPTY_TURN, LONG_TURN, REPEATS_PROMPT, NON_TEXT = (
    "empty_turn", "long_turn", "repeats_prompt", "non_text",
)  # fmt: skip
_SPACE = re.compile(r"\s+")


def prompt_similarity(prompt: str, response: str) -> float:
    """difflib's ratio of the two texts, case and spacing ignored (1: the same text)."""
    a, b = (_SPACE.sub(" ", t).strip().lower() for t in (prompt, response))
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def rule_reason(candidate: Candidate, q: DictConfig) -> str | None:
    """The first rule the example breaks, or None."""
    if q.empty_turn and any(not turn.strip() for turn in candidate.turns):
        return EMPTY_TURN
    if q.max_turn_chars is not None and any(len(t) > q.max_turn_chars for t in candidate.turns):
        return LONG_TURN
    if q.max_prompt_similarity is not None and any(
        prompt_similarity(p, r) >= q.max_prompt_similarity for p, r in candidate.exchanges
    ):
        return REPEATS_PROMPT
    if q.min_alpha_word_fraction is not None:
        # The clean stage's rule on words holding a letter, applied to each response (to
        # the text itself where the task has no responses).
        rule = QualityConfig(min_chars=None, max_chars=None,
                             min_alpha_word_fraction=q.min_alpha_word_fraction)  # fmt: skip
        texts = [r for _, r in candidate.exchanges] or list(candidate.turns)
        if any(t.strip() and quality_reason(t, rule) for t in texts):
            return NON_TEXT
    return None
