"""Data and scoring of lmpipe's offline harness tasks (the YAMLs beside this file): our
packaged copies of the data, so lm-evaluation-harness runs with no download."""

from __future__ import annotations

import re
from typing import Any

import datasets
from omegaconf import OmegaConf

from lmpipe.evaluation.answers import is_correct
from lmpipe.runs.config import FinetuneConfig
from lmpipe.taskdata import trec, wikitext


def wikitext_articles(**_: Any) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"page": wikitext.articles("test")})}
    )


def wikitext_detokenized(doc: dict[str, str]) -> str:
    return wikitext.detokenize(doc["page"])


def wikitext_results(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    """The harness's counts: words and bytes of the article as published."""
    (loglikelihood,) = results
    words, size = len(re.split(r"\s+", doc["page"])), len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}  # fmt: skip


def reasoning_gym_test(lmpipe_finetune: dict[str, Any] | None = None, **_: Any
                       ) -> datasets.DatasetDict:  # fmt: skip
    """The test split of the run's reasoning-gym problems (`lmpipe_finetune`: its finetune
    config, given as task metadata by lmpipe.evaluation.harness)."""
    from lmpipe.taskdata.reasoning_gym import load_splits

    if lmpipe_finetune is None:
        raise ValueError("lmpipe_reasoning_gym reads the run's finetune config from the task "
                         "metadata `lmpipe_finetune`: run it through "
                         "lmpipe.evaluation.harness")  # fmt: skip
    f = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), lmpipe_finetune)
    r = f.reasoning_gym
    # The evaluate stage's test split (lmpipe.tasks.sft builds it the same way; noise and
    # demonstrations touch only the training split).
    test = load_splits(r.generator, {"train": r.train_size, "val": r.val_size,
                                     "test": r.test_size}, r.seed, r.options, f.val_fraction,
                       f.test_fraction, r.worked)["test"]  # fmt: skip
    questions = [next(m["content"] for m in c.messages if m["role"] == "user") for c in test]
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {
                    "id": [c.id for c in test],
                    "question": questions,
                    "answer": [c.answer for c in test],
                }
            )
        }
    )


def reasoning_gym_results(doc: dict[str, str], results: list[str]) -> dict[str, float]:
    return {"exact_match": float(is_correct(results[0], doc["answer"]))}


def trec_test(**_: Any) -> datasets.DatasetDict:
    """The 500 test questions, each labelled by its type's place in trec.COARSE_LABELS (the
    order of the YAML's choices)."""
    _, test = trec.load_trec()
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {
                    "text": [t.text for t in test],
                    "label": [trec.COARSE_LABELS.index(t.label) for t in test],
                }
            )
        }
    )
