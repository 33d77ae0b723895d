"""Preference pairs: a prompt, a preferred (chosen) and a dispreferred (rejected) reply.

Users' files are `.jsonl` (optionally gzipped) in the formats of Hugging Face preference
datasets: `prompt`, `chosen` and `rejected` as plain strings, or as chat messages (the
prompt a list of turns, each reply a list holding one assistant turn), or without `prompt`,
with `chosen` and `rejected` whole conversations that share everything but the last
(assistant) turn. A record that fits none of them is counted by reason and named by file
and line; it never stops the run unless no record is usable.

A pair trains as two rows of one micro-batch (its chosen and its rejected reply, each after
the prompt, labelled on the reply's tokens only), so the two always meet the same weights.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from lmpipe.data.batches import IGNORE_INDEX
from lmpipe.data.sources import SourceError, decode, expand_paths
from lmpipe.taskdata.conversations import Conversation, Messages, collate, split_of
from lmpipe.taskdata.conversations import fixed_width as conversations_width

T = TypeVar("T")  # an item with an `id`

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: Messages  # ends with a user turn
    chosen: str
    rejected: str
    # the reference model's summed log-probs of each reply (filled in before training)
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    # the final answer a program checks replies against (verifiable tasks); None: none
    answer: str | None = None

    @property
    def conversation(self) -> Conversation:
        """The prompt answered by the chosen reply (what SFT would train on)."""
        return Conversation(self.id, [*self.prompt, {"role": "assistant", "content": self.chosen}],
                            self.answer)  # fmt: skip


class PreferenceDataError(ValueError):
    """Preference files with no usable record."""


def messages_of(value: Any, field: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{field}' is neither a string nor a non-empty list of messages")
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or \
                message.get("role") not in ("system", "user", "assistant"):  # fmt: skip
            raise ValueError(f"'{field}' holds a message without a role "
                             "(system|user|assistant) and a string content")  # fmt: skip
    return [{"role": m["role"], "content": m["content"]} for m in value]


def reply_of(messages: Messages, field: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"'{field}' must be one assistant message")
    return messages[0]["content"].strip()


def parse_record(record: Any) -> tuple[Messages, str, str]:
    """(prompt turns, chosen reply, rejected reply) of one record; ValueError says why not."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    chosen = messages_of(record["chosen"], "chosen")
    rejected = messages_of(record["rejected"], "rejected")
    if "prompt" in record:
        prompt = messages_of(record["prompt"], "prompt")
        chosen_reply, rejected_reply = reply_of(chosen, "chosen"), reply_of(rejected, "rejected")
    else:  # implicit prompt: the conversations' shared turns
        if isinstance(record["chosen"], str):
            raise ValueError("no 'prompt': string replies need one")
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            raise ValueError("no 'prompt', and 'chosen' and 'rejected' do not share all "
                             "turns but the last")  # fmt: skip
        prompt = chosen[:-1]
        chosen_reply = reply_of(chosen[-1:], "chosen")
        rejected_reply = reply_of(rejected[-1:], "rejected")
    if prompt[-1]["role"] != "user":
        raise ValueError("the prompt does not end with a user turn")
    if not chosen_reply or not rejected_reply:
        raise ValueError("an empty reply")
    if chosen_reply == rejected_reply:
        raise ValueError("'chosen' and 'rejected' are the same reply")
    return prompt, chosen_reply, rejected_reply


def read_pair_files(patterns: Sequence[str]) -> tuple[list[Pair], Counter[str]]:
    """Every usable pair of the files (paths, directories or globs), and the bad records
    counted by reason (each reason's first places are logged)."""
    try:
        paths = expand_paths(patterns)
    except SourceError as exc:
        raise PreferenceDataError(
            str(exc).replace("data.paths", "finetune.preference.files")
        ) from None
    pairs: list[Pair] = []
    bad: Counter[str] = Counter()
    where: dict[str, list[str]] = {}
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                text, _ = decode(raw)
                try:
                    prompt, chosen, rejected = parse_record(json.loads(text))
                except json.JSONDecodeError as exc:
                    reason = f"invalid JSON ({exc.msg})"
                except ValueError as exc:
                    reason = str(exc)
                else:
                    pairs.append(Pair(f"{path}:{lineno}", prompt, chosen, rejected))
                    continue
                bad[reason] += 1
                where.setdefault(reason, []).append(f"{path}:{lineno}")
    for reason, places in where.items():
        log.warning("preference data: %d record(s) skipped, %s: %s%s", bad[reason], reason,
                    ", ".join(places[:3]), " ..." if len(places) > 3 else "")  # fmt: skip
    if not pairs:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in bad.most_common())
        raise PreferenceDataError(
            f"finetune.preference.files {list(patterns)}: no usable "
            f"preference record ({reasons or 'the files are empty'})"
        )
    return pairs, bad


def split_pairs(
    pairs: Sequence[Pair], val_fraction: float, test_fraction: float
) -> dict[str, list[Pair]]:
    """train/val/test by a hash of the opening prompt, as SFT splits its conversations."""
    splits: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
    for pair in pairs:
        splits[split_of(pair.conversation, val_fraction, test_fraction)].append(pair)
    return splits


def stable_sample(pairs: Sequence[T], count: int | None) -> list[T]:
    """At most `count` items (pairs, conversations: anything with an `id`) chosen by a hash
    of their id (the same ones on every run), in their original order."""
    if count is None or count >= len(pairs):
        return list(pairs)
    rank = sorted(
        range(len(pairs)),
        key=lambda i: hashlib.blake2b(pairs[i].id.encode(), digest_size=8).digest(),
    )
    kept = set(rank[:count])
    return [pair for i, pair in enumerate(pairs) if i in kept]


def encode_reply(
    tokenizer: PreTrainedTokenizerBase, prompt: Messages, reply: str, max_len: int
) -> dict[str, list[int]] | None:
    """The prompt and the reply through the chat template, labelled on the reply's tokens
    alone (earlier assistant turns of the prompt are context); cut to max_len, None if the
    reply has no token left."""
    conversation = [*prompt, {"role": "assistant", "content": reply}]
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    earlier = 0  # assistant-marked tokens of the prompt's own assistant turns
    if any(m["role"] == "assistant" for m in prompt):
        context = tokenizer.apply_chat_template(
            prompt, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        earlier = sum(context["assistant_masks"])
    labels, seen = [], 0
    for token, marked in zip(ids, mask, strict=True):
        labels.append(token if marked and seen >= earlier else IGNORE_INDEX)
        seen += bool(marked)
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


@dataclass
class PairExample:
    """A pair's two encoded replies and, once known, the reference's log-probs of each."""

    pair: Pair
    chosen: dict[str, list[int]]
    rejected: dict[str, list[int]]

    @property
    def id(self) -> str:
        return self.pair.id


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], max_len: int
) -> list[PairExample]:
    """The pairs whose two replies both keep a token within max_len."""
    examples = []
    for pair in pairs:
        chosen = encode_reply(tokenizer, pair.prompt, pair.chosen, max_len)
        rejected = encode_reply(tokenizer, pair.prompt, pair.rejected, max_len)
        if chosen is not None and rejected is not None:
            examples.append(PairExample(pair, chosen, rejected))
    if len(examples) < len(pairs):
        log.info("preference: %d of %d pairs have a reply with no token within max_len",
                 len(pairs) - len(examples), len(pairs))  # fmt: skip
    return examples


def fixed_width(*example_sets: Sequence[PairExample]) -> int:
    """The one width of every micro-batch of these pairs (`conversations.fixed_width`)."""
    return conversations_width(row for examples in example_sets for e in examples
                               for row in (e.chosen, e.rejected))  # fmt: skip


def collate_pairs(
    examples: Sequence[PairExample],
    pad_id: int,
    with_reference: bool = True,
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch: rows [chosen_1..chosen_B, rejected_1..rejected_B], right-padded to
    the longest (or to `width`: `fixed_width`), and the reference log-probs of the 2B rows
    in the same order."""
    rows = [e.chosen for e in examples] + [e.rejected for e in examples]
    batch = collate(rows, pad_id, width)
    if with_reference:
        references = [e.pair.ref_chosen for e in examples] + [e.pair.ref_rejected for e in examples]
        if any(r is None for r in references):
            raise ValueError("preference pairs without the reference's log-probs")
        batch["ref_logps"] = torch.tensor(references, dtype=torch.float32)
    return batch


# --- the pairs table (outputs/finetune/pairs.parquet) ---------------------------------------

PAIR_COLUMNS = [
    "id",
    "split",
    "prompt",
    "chosen",
    "rejected",
    "ref_chosen",
    "ref_rejected",
    "answer",
]


def pairs_table(splits: dict[str, Sequence[Pair]]) -> pd.DataFrame:
    rows = [
        {"id": p.id, "split": split, "prompt": json.dumps(p.prompt), "chosen": p.chosen,
         "rejected": p.rejected, "ref_chosen": p.ref_chosen, "ref_rejected": p.ref_rejected,
         "answer": p.answer}
        for split, pairs in splits.items() for p in pairs
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def pairs_from_table(table: pd.DataFrame) -> dict[str, list[Pair]]:
    splits: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
    has_answers = "answer" in table  # tables written before answers were kept have none
    for row in table.itertuples(index=False):
        answer = row.answer if has_answers and isinstance(row.answer, str) else None
        pair = Pair(row.id, json.loads(row.prompt), row.chosen, row.rejected, answer=answer)
        if pd.notna(row.ref_chosen):
            pair = replace(pair, ref_chosen=float(row.ref_chosen),
                           ref_rejected=float(row.ref_rejected))  # fmt: skip
        splits[row.split].append(pair)
    return splits


def read_pairs_table(path: Path) -> dict[str, list[Pair]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the preference pairs of finetune are missing")
    return pairs_from_table(pd.read_parquet(path))
