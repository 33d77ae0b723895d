"""What selection sees of a training example, whatever the task."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One training example as selection judges it.

    `example` is what the model reads: input_ids, and labels on the response tokens (all
    ignored for a task without responses, such as classify). `responses_alone` is the same
    response tokens with every prompt turn removed (IFD's denominator); None without
    responses.
    """

    id: str
    turns: tuple[str, ...]  # every turn's text, in order (a classify text: one turn)
    exchanges: tuple[tuple[str, str], ...]  # (prompt, response) pairs; () without responses
    example: dict[str, list[int]]
    responses_alone: dict[str, list[int]] | None = None

    @property
    def prompt(self) -> str:
        return self.turns[0]

    @property
    def text(self) -> str:
        """The whole example, as near-dedup judges it."""
        return "\n".join(self.turns)

    @property
    def tokens(self) -> int:
        """Tokens the model trains on (what a token budget counts)."""
        return len(self.example["input_ids"])
