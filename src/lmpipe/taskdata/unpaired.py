"""Unpaired feedback for KTO: a prompt, one reply and whether it is desirable.

Read from files in TRL's unpaired-preference format (one JSON object per line, .jsonl or
.jsonl.gz): `prompt` and `completion` as strings or chat messages, and a boolean `label`
(true: desirable). The KL term of KTO compares each prompt with another example's reply:
within each chunk of `batch_size` examples the replies are rotated by one, as TRL does
(x1, yn), (x2, y1), ..., (xn, y(n-1)).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from lmpipe.data.sources import SourceError, decode, expand_paths
from lmpipe.taskdata.conversations import Conversation, Messages, collate, fixed_width, split_of
from lmpipe.taskdata.pairs import encode_reply, messages_of, reply_of

log = logging.getLogger(__name__)

COLUMNS = ["id", "split", "prompt", "completion", "label", "kl_completion", "ref_logp",
           "ref_kl_logp", "answer"]  # fmt: skip


@dataclass(frozen=True)
class Judged:
    id: str
    prompt: Messages  # ends with a user turn
    completion: str
    desirable: bool
    # Another example's reply to this prompt (the KL term's mismatched pair).
    kl_completion: str | None = None
    # The reference model's summed log-probs of `completion` and `kl_completion`.
    ref_logp: float | None = None
    ref_kl_logp: float | None = None
    answer: str | None = None  # the final answer a program checks (verifiable tasks)

    @property
    def conversation(self) -> Conversation:
        """The prompt answered by this reply (what SFT would train on if desirable)."""
        reply = {"role": "assistant", "content": self.completion}
        return Conversation(self.id, [*self.prompt, reply], self.answer)


class UnpairedDataError(ValueError):
    """Unpaired feedback files with no usable record."""


def parse_record(record: Any) -> tuple[Messages, str, bool]:
    """(prompt turns, reply, desirable) of one TRL-format record; ValueError says why not."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    missing = [key for key in ("prompt", "completion", "label") if key not in record]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not isinstance(record["label"], bool):
        raise ValueError("'label' is not true or false")
    prompt = messages_of(record["prompt"], "prompt")
    if prompt[-1]["role"] != "user":
        raise ValueError("the prompt does not end with a user turn")
    reply = reply_of(messages_of(record["completion"], "completion"), "completion")
    if not reply:
        raise ValueError("an empty completion")
    return prompt, reply, record["label"]


def read_files(patterns: Sequence[str], key: str) -> list[Judged]:
    """Every usable record of the files (paths, directories or globs); bad records are
    counted by reason and logged, and none usable is an error naming `key`."""
    try:
        paths = expand_paths(patterns)
    except SourceError as exc:
        raise UnpairedDataError(str(exc).replace("data.paths", key)) from None
    examples: list[Judged] = []
    bad: Counter[str] = Counter()
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    prompt, reply, desirable = parse_record(json.loads(decode(raw)[0]))
                except json.JSONDecodeError as exc:
                    bad[f"invalid JSON ({exc.msg})"] += 1
                except ValueError as exc:
                    bad[str(exc)] += 1
                else:
                    examples.append(Judged(f"{path}:{lineno}", prompt, reply, desirable))
    for reason, count in bad.items():
        log.warning("unpaired feedback: %d record(s) skipped: %s", count, reason)
    if not examples:
        reasons = "; ".join(f"{n} x {reason}" for reason, n in bad.most_common())
        raise UnpairedDataError(f"{key} {list(patterns)}: no usable record "
                                f"({reasons or 'the files are empty'})")  # fmt: skip
    return examples


def split_judged(
    examples: Sequence[Judged], val_fraction: float, test_fraction: float
) -> dict[str, list[Judged]]:
    """train/val/test by a hash of the prompt, as SFT splits its conversations."""
    splits: dict[str, list[Judged]] = {"train": [], "val": [], "test": []}
    for example in examples:
        splits[split_of(example.conversation, val_fraction, test_fraction)].append(example)
    return splits


def with_kl_completions(examples: Sequence[Judged], batch_size: int) -> list[Judged]:
    """Each example with another one's reply for the KL term: rotated by one within each
    chunk of `batch_size`, as TRL pairs them."""
    paired = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rotated = [chunk[-1], *chunk[:-1]]
        paired += [replace(e, kl_completion=o.completion) for e, o in zip(chunk, rotated,
                                                                          strict=True)]  # fmt: skip
    return paired


@dataclass(frozen=True)
class JudgedExample:
    """One example tokenised: its reply and the KL term's mismatched reply, each labelled
    on the reply's tokens."""

    judged: Judged
    reply: dict[str, list[int]]
    kl_reply: dict[str, list[int]]

    @property
    def id(self) -> str:
        return self.judged.id


def encode_judged(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Judged], max_len: int
) -> list[JudgedExample]:
    """The examples whose reply and KL reply both keep a token within max_len."""
    encoded = []
    for example in examples:
        assert example.kl_completion is not None, "with_kl_completions pairs them first"
        reply = encode_reply(tokenizer, example.prompt, example.completion, max_len)
        kl_reply = encode_reply(tokenizer, example.prompt, example.kl_completion, max_len)
        if reply is not None and kl_reply is not None:
            encoded.append(JudgedExample(example, reply, kl_reply))
    if len(encoded) < len(examples):
        log.info("kto: %d examples had no reply token within max_len", len(examples) - len(encoded))
    return encoded


def judged_width(*example_sets: Sequence[JudgedExample]) -> int:
    """The one width of every micro-batch of these examples, replies and KL replies
    (`conversations.fixed_width`)."""
    return fixed_width(row for examples in example_sets for e in examples
                       for row in (e.reply, e.kl_reply))  # fmt: skip


def collate_judged(
    examples: Sequence[JudgedExample],
    pad_id: int,
    with_reference: bool = True,
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """The replies (input_ids, attention_mask, labels), the KL replies under `kl_` keys,
    `desirable`, and the reference's log-probs of both (`ref_logps`, `ref_kl_logps`); every
    row padded to the longest, or to `width` (`judged_width`)."""
    batch = collate([e.reply for e in examples], pad_id, width)
    kl_rows = collate([e.kl_reply for e in examples], pad_id, width)
    batch |= {f"kl_{k}": v for k, v in kl_rows.items()}
    batch["desirable"] = torch.tensor([e.judged.desirable for e in examples])
    if with_reference:
        batch["ref_logps"] = torch.tensor([e.judged.ref_logp for e in examples])
        batch["ref_kl_logps"] = torch.tensor([e.judged.ref_kl_logp for e in examples])
    return batch


def judged_table(splits: dict[str, Sequence[Judged]]) -> pd.DataFrame:
    rows = [
        {"id": e.id, "split": split, "prompt": json.dumps(e.prompt), "completion": e.completion,
         "label": e.desirable, "kl_completion": e.kl_completion, "ref_logp": e.ref_logp,
         "ref_kl_logp": e.ref_kl_logp, "answer": e.answer}
        for split, examples in splits.items() for e in examples
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=COLUMNS)


def judged_from_table(table: pd.DataFrame) -> dict[str, list[Judged]]:
    splits: dict[str, list[Judged]] = {"train": [], "val": [], "test": []}
    for row in table.itertuples(index=False):
        splits[row.split].append(Judged(
            row.id, json.loads(row.prompt), row.completion, bool(row.label),
            row.kl_completion if isinstance(row.kl_completion, str) else None,
            float(row.ref_logp) if pd.notna(row.ref_logp) else None,
            float(row.ref_kl_logp) if pd.notna(row.ref_kl_logp) else None,
            row.answer if isinstance(row.answer, str) else None,
        ))  # fmt: skip
    return splits


def read_judged_table(path: Path) -> dict[str, list[Judged]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the KTO examples of finetune are missing")
    return judged_from_table(pd.read_parquet(path))
