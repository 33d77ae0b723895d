"""Problems with answers a program can check: reasoning-gym's procedural generators
(Apache-2.0), deterministic by seed, as SFT conversations with their final answers.

reasoning-gym is installed with `--no-deps`: its package __init__ imports every generator
family and their dependencies (ARC kits, SAT solvers, ...). We import only the arithmetic
modules we use (lmpipe.taskdata.packages.bare_packages).

Splits never share a problem:
- `chain_sum`, `basic_arithmetic`: one seeded stream of problems, each distinct expression
  (the generator's metadata, not the question's wording: `basic_arithmetic` words one
  expression several ways) assigned to train/val/test by a hash of the expression, and kept
  once, in its first wording;
- `gsm_symbolic`: by template. Its ~85 templates are each derived from one GSM8K *test*
  problem; they are split into train/val/test templates by a hash of their number, so no
  test template (a problem structure, not just its numbers) is seen in training. Its
  accuracy is never a GSM8K score.

An example's id names its content, not its place in a seed's stream: a hash of the
generator, its options and the normalised question (`content_id`), so two runs with other
seeds share an id exactly where they share a problem, and the deploy gate pairs them by it.
A gsm_symbolic problem's template is its cluster: its intervals resample whole templates.

The target reply is the answer alone for arithmetic (or, with `worked`, a chain sum's
partial results line by line), and the worked solution ending in "#### <answer>"
(GSM8K's convention) for gsm_symbolic; lmpipe.evaluation.answers parses either.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from random import Random
from typing import Any

from lmpipe.runs.config import ConfigError
from lmpipe.taskdata.conversations import Conversation

log = logging.getLogger(__name__)

KEY = "finetune.reasoning_gym"
PIP_NAME = "reasoning-gym==0.1.25"
SPLITS = ("train", "val", "test")
# reasoning-gym draws problem i from Random(seed + i), so seeds 0 and 1 would share all but
# one problem: our seed s picks the stream starting at s * SEED_STRIDE.
SEED_STRIDE = 1 << 32


@dataclass(frozen=True)
class Generator:
    module: str  # under reasoning_gym.arithmetic
    dataset: str  # the ProceduralDataset class
    config: str  # its config dataclass
    by_template: bool  # split by template (else by question text)
    reply: Callable[[Mapping[str, Any]], str]  # the target reply of a generated item


GENERATORS: dict[str, Generator] = {
    "chain_sum": Generator("chain_sum", "ChainSumDataset", "ChainSumConfig", False,
                           lambda item: str(item["answer"])),
    "basic_arithmetic": Generator("basic_arithmetic", "BasicArithmeticDataset",
                                  "BasicArithmeticDatasetConfig", False,
                                  lambda item: str(item["answer"])),
    "gsm_symbolic": Generator("gsm_symbolic.gsm_symbolic", "GSMSymbolicDataset",
                              "GSMSymbolicDatasetConfig", True,
                              lambda item: str(item["metadata"]["answer_cot"]).strip()),
}  # fmt: skip


def chain_sum_steps(item: Mapping[str, Any]) -> str:
    """A chain sum worked left to right, one partial result per line, then the marked
    answer: "98 + 93 = 191\\n191 - 77 = 114\\n#### 114". Each line is a two-number fact,
    shared across problems, so a model can compose answers it never saw."""
    terms = str(item["metadata"]["expression"]).split()
    total = int(terms[0])
    lines = []
    for operator, number in zip(terms[1::2], terms[2::2], strict=True):
        result = total + int(number) if operator == "+" else total - int(number)
        lines.append(f"{total} {operator} {number} = {result}")
        total = result
    if str(total) != str(item["answer"]):
        raise ValueError(f"chain sum {item['metadata']['expression']!r}: worked to {total}, "
                         f"the generator says {item['answer']}")  # fmt: skip
    return "\n".join([*lines, f"#### {total}"])


# Generators whose reply can show its work (`finetune.reasoning_gym.worked`).
WORKED = {"chain_sum": chain_sum_steps}


def _classes(name: str) -> tuple[type, type]:
    from lmpipe.taskdata.packages import bare_packages

    if name not in GENERATORS:
        raise ConfigError(f"invalid value for '{KEY}.generator': {name!r} "
                         f"(allowed: {sorted(GENERATORS)})")  # fmt: skip
    spec = GENERATORS[name]
    bare_packages("reasoning_gym", ("arithmetic",), "finetune.dataset=reasoning_gym", PIP_NAME)
    # The package's own __init__ imports `coaching` before `factory`; a generator module that
    # imports `factory` first (gsm_symbolic) would meet their import cycle half-way.
    importlib.import_module("reasoning_gym.coaching")
    module = importlib.import_module(f"reasoning_gym.arithmetic.{spec.module}")
    return getattr(module, spec.dataset), getattr(module, spec.config)


def make_dataset(name: str, seed: int, size: int, options: Mapping[str, Any]) -> Any:
    """reasoning-gym's dataset object for generator `name` with its own `options`."""
    dataset_class, config_class = _classes(name)
    try:
        config = config_class(seed=seed, size=size, **dict(options))
        config.validate()
    except (TypeError, AssertionError) as exc:
        raise ConfigError(f"invalid value for '{KEY}.options' ({name}): {exc}") from None
    return dataset_class(config)


def normalized_question(question: Any) -> str:
    """The question with its whitespace collapsed, as ids and dedup see it."""
    return " ".join(str(question).split())


def content_id(name: str, options: Mapping[str, Any], question: Any) -> str:
    """`reasoning_gym:<generator>:<hash>` of the generator, its options and the normalised
    question: the same problem has the same id under any seed and split."""
    content = json.dumps([name, dict(options), normalized_question(question)], sort_keys=True,
                         default=str)  # fmt: skip
    return f"reasoning_gym:{name}:{hashlib.blake2b(content.encode(), digest_size=8).hexdigest()}"


def expression_of(item: Mapping[str, Any]) -> str:
    """An arithmetic problem's expression (its metadata): what splits and dedup key on, since
    one expression may be worded several ways."""
    return " ".join(str(item["metadata"]["expression"]).split())


def _bucket(text: str) -> float:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _split_by_bucket(bucket: float, shares: Mapping[str, float]) -> str:
    edge = 0.0
    for split in ("test", "val"):
        edge += shares[split]
        if bucket < edge:
            return split
    return "train"


def _conversation(
    name: str,
    item: Mapping[str, Any],
    options: Mapping[str, Any],
    worked: bool,
    cluster: str | None = None,
) -> Conversation:
    reply = WORKED[name](item) if worked else GENERATORS[name].reply(item)
    messages = [{"role": "user", "content": str(item["question"]).strip()},
                {"role": "assistant", "content": reply}]  # fmt: skip
    return Conversation(content_id(name, options, item["question"]), messages,
                        answer=str(item["answer"]).strip(), cluster=cluster)  # fmt: skip


def template_split(
    templates: list[int], val_fraction: float, test_fraction: float
) -> dict[str, list[int]]:
    """Templates in the stable order of a hash of their number: the first `test_fraction`
    test, the next `val_fraction` val (at least one each), the rest train."""
    ranked = sorted(templates, key=lambda t: _bucket(f"gsm_symbolic:{t}"))
    n_test = max(1, round(len(ranked) * test_fraction))
    n_val = max(1, round(len(ranked) * val_fraction))
    return {"test": ranked[:n_test], "val": ranked[n_test : n_test + n_val],
            "train": ranked[n_test + n_val :]}  # fmt: skip


def _by_template(
    name: str,
    sizes: Mapping[str, int],
    seed: int,
    options: Mapping[str, Any],
    val_fraction: float,
    test_fraction: float,
) -> dict[str, list[Conversation]]:
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok

    groups = template_split(list(tasks_ok), val_fraction, test_fraction)
    splits: dict[str, list[Conversation]] = {}
    for number, split in enumerate(SPLITS):
        templates = groups[split]
        # Each split its own seed stream; the library's __getitem__ draws from its templates.
        split_seed = seed * SEED_STRIDE + 1_000_003 * number
        pick = Random(split_seed)
        dataset = make_dataset(name, split_seed, max(sizes[split], 1) * 4, options)
        dataset.task_indices = [pick.choice(templates) for _ in range(dataset.size)]
        seen: set[str] = set()
        items = []
        for index in range(dataset.size):
            if len(items) == sizes[split]:
                break
            item = dataset[index]
            question = normalized_question(item["question"])
            if question in seen:
                continue
            seen.add(question)
            template = dataset.task_indices[index]
            items.append(_conversation(name, item, options, False, cluster=f"t{template}"))
        splits[split] = items
    short = {s: len(splits[s]) for s in SPLITS if len(splits[s]) < sizes[s]}
    if short:
        raise ConfigError(
            f"{KEY}: {name}'s templates gave too few distinct problems for the sizes asked "
            f"(got {short} of {dict(sizes)}): ask for fewer problems"
        )
    return splits


def _by_question(
    name: str, sizes: Mapping[str, int], seed: int, options: Mapping[str, Any], worked: bool
) -> dict[str, list[Conversation]]:
    total = sum(sizes.values())
    shares = {split: sizes[split] / total for split in SPLITS}
    # Up to 20 draws per wanted problem: a problem space too small to fill the splits with
    # distinct questions fails instead of looping.
    budget = 20 * total
    dataset = make_dataset(name, seed * SEED_STRIDE, budget, options)
    splits: dict[str, list[Conversation]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for index in range(budget):
        if all(len(splits[s]) >= sizes[s] for s in SPLITS):
            break
        item = dataset[index]
        expression = expression_of(item)
        if expression in seen:
            continue
        seen.add(expression)
        split = _split_by_bucket(_bucket(expression), shares)
        if len(splits[split]) < sizes[split]:
            splits[split].append(_conversation(name, item, options, worked))
    short = {s: len(splits[s]) for s in SPLITS if len(splits[s]) < sizes[s]}
    if short:
        raise ConfigError(
            f"{KEY}: {name} with options {dict(options)} gave only {len(seen)} distinct "
            f"problems in {budget} draws, too few for the sizes asked (got {short}); ask for "
            "fewer problems or widen the options"
        )
    return splits


def load_splits(
    name: str,
    sizes: Mapping[str, int],
    seed: int,
    options: Mapping[str, Any],
    val_fraction: float,
    test_fraction: float,
    worked: bool = False,
) -> dict[str, list[Conversation]]:
    """train/val/test conversations of generator `name`, `sizes[split]` problems each, with no
    expression (or, for templated generators, no template) in two splits. With `worked`, the
    replies show their steps (generators in WORKED; gsm_symbolic's always do)."""
    _classes(name)  # an unknown generator or a missing package fails first, by key
    if worked and name not in WORKED and not GENERATORS[name].by_template:
        raise ConfigError(
            f"invalid value for '{KEY}.worked': {name} has no worked replies (generators "
            f"with them: {sorted(WORKED)}, and gsm_symbolic always)"
        )
    for split in SPLITS:
        if sizes[split] < 1:
            raise ConfigError(f"invalid value for '{KEY}.{split}_size': {sizes[split]} "
                             "(each split needs at least one problem)")  # fmt: skip
    if GENERATORS[name].by_template:
        splits = _by_template(name, sizes, seed, options, val_fraction, test_fraction)
    else:
        splits = _by_question(name, sizes, seed, options, worked)
    log.info("reasoning_gym: %s, %s problems", name,
             "/".join(str(len(splits[s])) for s in SPLITS))  # fmt: skip
    return splits
