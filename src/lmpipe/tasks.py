"""Fine-tuning tasks: what finetune trains and what evaluate scores, per `finetune.task`.

sft       chat pairs (chatterbot) -> causal LM with the loss on assistant turns only
classify  WordNet glosses -> lexicographer category, a ...ForSequenceClassification head
          on the pretrained decoder

Both stages read their data through the split functions here, so finetune and evaluate
always agree on what is held out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data import classify, sft
from lmpipe.data.batches import ShuffledBatches
from lmpipe.evaluation.lm_metrics import mean_loss, perplexity
from lmpipe.evaluation.scoring import (
    classification_report,
    example_losses,
    generate_replies,
    predict_classes,
)
from lmpipe.runs.config import ConfigError, FinetuneConfig
from lmpipe.training import adapters
from lmpipe.training.model import load_classifier, load_model, model_device


def sft_splits(f: FinetuneConfig) -> dict[str, list[sft.Conversation]]:
    return sft.split_conversations(sft.load_chatterbot(f.language), f.val_fraction,
                                   f.test_fraction)  # fmt: skip


def classify_splits(f: FinetuneConfig) -> dict[str, list[classify.LabelledText]]:
    items = classify.load_wordnet_glosses(list(f.categories), f.max_per_class)
    return classify.stratified_split(items, f.val_fraction, f.test_fraction)


@dataclass
class FinetuneSetup:
    """The model to train (adapters already in place), its data and its validation."""

    model: PreTrainedModel
    batches: ShuffledBatches
    evaluate: Callable[[torch.nn.Module], float | dict[str, float]]
    counts: dict[str, int] = field(default_factory=dict)
    peft_model: PeftModel | None = None

    def final_model(self) -> PreTrainedModel:
        """What gets saved: LoRA merged into the weights, so it loads without peft."""
        return adapters.merge_lora(self.peft_model) if self.peft_model else self.model


def build(
    f: FinetuneConfig,
    base: Path,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> FinetuneSetup:
    """Load the base model for `f.task`, apply LoRA / freezing, and prepare the data."""
    builder = _build_classify if f.task == "classify" else _build_sft
    setup = builder(f, base, tokenizer, seed, device, rank, world_size)
    if f.max_len > setup.model.config.max_position_embeddings:
        raise ConfigError(
            f"finetune.max_len={f.max_len} exceeds the base model's "
            f"max_position_embeddings={setup.model.config.max_position_embeddings}"
        )
    if f.lora.enabled:
        head = ["score"] if f.task == "classify" else []
        setup.peft_model = adapters.add_lora(setup.model, f.lora, trainable_modules=head)
    adapters.freeze_layers(setup.model, f.freeze_layers, f.freeze_embeddings)
    return setup


def _build_sft(
    f: FinetuneConfig,
    base: Path,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    device: torch.device,
    rank: int,
    world_size: int,
) -> FinetuneSetup:
    model = load_model(base)
    splits = sft_splits(f)
    train_examples = sft.encode_all(tokenizer, splits["train"], f.max_len)
    val_examples = sft.encode_all(tokenizer, splits["val"], f.max_len)
    pad = tokenizer.pad_token_id

    def val_loss(m: torch.nn.Module) -> float:
        return mean_loss(m, sft.ordered_batches(val_examples, f.batch_size, pad), device,
                         f.eval_batches)[0]  # fmt: skip

    batches = sft.shuffled_batches(
        train_examples, f.batch_size, pad, seed, rank, world_size,
        packing_len=f.max_len if f.packing else None,
    )  # fmt: skip
    counts = {"train_examples": len(train_examples), "val_examples": len(val_examples)}
    if f.packing:
        counts["train_rows"] = batches.num_items
    return FinetuneSetup(model, batches, val_loss, counts)


def _build_classify(
    f: FinetuneConfig,
    base: Path,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    device: torch.device,
    rank: int,
    world_size: int,
) -> FinetuneSetup:
    splits = classify_splits(f)
    labels = classify.label_names(splits["train"])
    model = load_classifier(base, labels)
    train_examples = classify.encode_texts(tokenizer, splits["train"], labels, f.max_len)
    val_examples = classify.encode_texts(tokenizer, splits["val"], labels, f.max_len)
    pad = model.config.pad_token_id

    def val_metrics(m: torch.nn.Module) -> dict[str, float]:
        result = predict_classes(
            m, classify.ordered_batches(val_examples, f.batch_size, pad), device, f.eval_batches
        )
        return {"loss": result.loss, "accuracy": float((result.actual == result.predicted).mean())}

    batches = classify.shuffled_batches(train_examples, f.batch_size, pad, seed, rank, world_size)
    counts = {
        "train_examples": len(train_examples),
        "val_examples": len(val_examples),
        "classes": len(labels),
    }
    return FinetuneSetup(model, batches, val_metrics, counts)


# --- evaluation ------------------------------------------------------------------------------
#
# Each task's evaluation first writes its predictions (one row per held-out example), and
# the metrics are then computed from that table alone, so they can be recomputed, audited
# and diffed from the saved file.


def predict_sft(
    models: Mapping[str, PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    test: Sequence[sft.Conversation],
    max_len: int,
    batch_size: int,
    generation: Mapping[str, Any],
    num_generations: int,
) -> pd.DataFrame:
    """Per held-out conversation: each model's summed response loss and, for the first
    `num_generations`, its reply to the opening prompt. Each model runs on the device it
    is on (an int8 variant on the CPU beside an fp32 model on a GPU)."""
    pairs = [(c, sft.encode_conversation(tokenizer, c.messages, max_len)) for c in test]
    pairs = [(c, e) for c, e in pairs if e is not None]
    if not pairs:
        raise ValueError("no held-out SFT examples with a response within finetune.max_len")
    examples = [e for _, e in pairs]
    frame = pd.DataFrame(
        {
            "id": [c.id for c, _ in pairs],
            "prompt": [c.prompt for c, _ in pairs],
            "reference": [c.messages[1]["content"] for c, _ in pairs],
        }
    )
    prompts = frame["prompt"].tolist()[:num_generations]
    for label, model in models.items():
        device = model_device(model)
        sums, counts = example_losses(
            model, sft.ordered_batches(examples, batch_size, tokenizer.pad_token_id), device
        )
        frame[f"{label}_loss"] = sums
        frame["target_tokens"] = counts
        replies = generate_replies(model, tokenizer, prompts, device=device, **generation)
        frame[f"{label}_reply"] = replies + [""] * (len(frame) - len(replies))
    return frame


def score_sft(frame: pd.DataFrame, models: Sequence[str]) -> dict[str, float]:
    """Token-weighted held-out response loss (and perplexity) of each model."""
    tokens = frame["target_tokens"].sum()
    metrics: dict[str, float] = {"sft_test_examples": len(frame)}
    for label in models:
        loss = float(frame[f"{label}_loss"].sum() / tokens)
        metrics[f"{label}_sft_test_loss"] = loss
        metrics[f"{label}_sft_test_perplexity"] = perplexity(loss)
    return metrics


def predict_classify(
    models: Mapping[str, PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    test: Sequence[classify.LabelledText],
    max_len: int,
    batch_size: int,
) -> pd.DataFrame:
    """Per held-out text: the true category and each model's prediction and confidence,
    each model run on the device it is on."""
    first = next(iter(models.values()))
    labels = [first.config.id2label[i] for i in range(first.config.num_labels)]
    examples = classify.encode_texts(tokenizer, test, labels, max_len)
    kept = [item for item in test if tokenizer(item.text, add_special_tokens=False)["input_ids"]]
    frame = pd.DataFrame(
        {"id": [t.id for t in kept], "text": [t.text for t in kept],
         "actual": [t.label for t in kept]}
    )  # fmt: skip
    for label, model in models.items():
        result = predict_classes(
            model, classify.ordered_batches(examples, batch_size, first.config.pad_token_id),
            model_device(model),
        )  # fmt: skip
        frame[f"{label}_predicted"] = [labels[i] for i in result.predicted]
        frame[f"{label}_confidence"] = result.confidence
    return frame


def score_classify(
    frame: pd.DataFrame, models: Sequence[str], labels: Sequence[str], majority: str
) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class scores of each model, and of always answering the
    training set's majority class (the baseline)."""
    actual = frame["actual"].tolist()
    columns = {label: frame[f"{label}_predicted"].tolist() for label in models}
    columns["baseline"] = [majority] * len(frame)
    metrics: dict[str, float] = {"test_examples": len(frame)}
    for label, predicted in columns.items():
        report = classification_report(actual, predicted, labels)
        metrics |= {f"{label}_{key}": value for key, value in report.items()}
    return metrics
