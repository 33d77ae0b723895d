"""Label noise for training data with checkable answers: real instruction data is noisy, and
data selection is meant to find the bad examples (seed 002). A set share of the training
conversations, chosen by a hash of their id and a seed, get a bad reply of one `kind`:

- `wrong_answer`: the final answer ("#### 9") and the last line of working that states it
  are replaced by a nearby wrong number, as a careless annotator would write it;
- `other_reply`: the reply of another training problem (a misaligned row).

The conversation keeps its true `answer`, so a verifier can still tell the bad ones (the
oracle filter of benchmarks/sft_selection.py). Never applied to val or test.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import replace

from lmpipe.taskdata.conversations import Conversation

NOISE_KINDS = ("wrong_answer", "other_reply")
_FINAL = re.compile(r"####\s*(\S+)\s*$")


def _rank(conversation_id: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{conversation_id}".encode(), digest_size=8).digest()


def _offset(conversation_id: str, seed: int) -> int:
    """A wrong answer's distance from the right one: 1 to 3, either sign, never 0."""
    value = int.from_bytes(_rank(conversation_id, seed + 1), "big")
    return (1 + value % 3) * (1 if value & 4 else -1)


def wrong_answer_reply(reply: str, conversation_id: str, seed: int) -> str:
    """`reply` with its final answer (and the working line that ends in it) off by 1 to 3;
    a non-integer final answer gets another problem's answer text appended instead."""
    match = _FINAL.search(reply)
    if match is None:
        raise ValueError(f"no '#### <answer>' to make wrong in {reply!r}")
    right = match.group(1)
    try:
        wrong = str(int(right) + _offset(conversation_id, seed))
    except ValueError:
        wrong = f"{right}0"
    lines = reply[: match.start()].rstrip("\n").split("\n")
    if lines and lines[-1].rstrip().endswith(f"= {right}"):
        lines[-1] = lines[-1].rstrip()[: -len(right)] + wrong
    head = "\n".join(lines)
    return f"{head}\n#### {wrong}" if head else f"#### {wrong}"


def with_noise(
    conversations: Sequence[Conversation], share: float, kind: str, seed: int
) -> list[Conversation]:
    """`conversations` with round(share x n) of them, chosen by a hash of id and `seed`,
    given a bad reply of `kind`; the others as they were, in the same order."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
    if not 0 <= share <= 1:
        raise ValueError(f"noise share must be in [0, 1], got {share}")
    count = round(share * len(conversations))
    order = sorted(range(len(conversations)), key=lambda i: _rank(conversations[i].id, seed))
    place = {index: position for position, index in enumerate(order)}
    out = list(conversations)
    for index in sorted(order[:count]):
        conversation = conversations[index]
        messages = [dict(m) for m in conversation.messages]
        if kind == "wrong_answer":
            messages[-1]["content"] = wrong_answer_reply(messages[-1]["content"],
                                                         conversation.id, seed)  # fmt: skip
        else:  # the reply of the next problem in hash order, never its own
            donor = conversations[order[(place[index] + 1) % len(order)]]
            if donor.id == conversation.id:
                raise ValueError("other_reply noise needs at least two conversations")
            messages[-1]["content"] = donor.messages[-1]["content"]
        out[index] = replace(conversation, messages=messages)
    return out
