"""Sequence classification (TREC questions -> their 6 coarse answer types, or WordNet
glosses -> lexicographer category) through transformers'
...ForSequenceClassification: on a decoder the head reads the last token, on an encoder
the first ([CLS]). Reported beside the majority class and TF-IDF + logistic regression,
both fitted on the same training split."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data.batches import IGNORE_INDEX, Batch
from lmpipe.evaluation.baselines import tfidf_predictions
from lmpipe.evaluation.intervals import macro_f1, proportion_interval, statistic_interval
from lmpipe.evaluation.paired import score_table
from lmpipe.evaluation.plots import confusion_matrix_figure
from lmpipe.evaluation.scoring import classification_report, confusion_matrix, predict_classes
from lmpipe.runs.config import ConfigError, EvaluateConfig, FinetuneConfig
from lmpipe.selection.candidates import Candidate
from lmpipe.taskdata import labelled, trec, wordnet
from lmpipe.tasks.base import FinetuningTask, Report, Serving, TrainingSetup, chosen
from lmpipe.training.model import load_classifier, model_device


def selection_candidates(
    tokenizer: PreTrainedTokenizerBase, items: Sequence[labelled.LabelledText], max_len: int
) -> list[Candidate]:
    """Texts with any tokens, as data selection judges them: the text is the one turn and
    no token is a response. The label is part of the example for dedup (the same gloss
    under two categories is not a copy)."""
    labels = sorted({item.label for item in items})
    kept = [item for item in items if labelled.has_tokens(tokenizer, item.text)]
    encoded = labelled.encode_texts(tokenizer, kept, labels, max_len)
    return [
        Candidate(item.id, (item.text, item.label), (),
                  {"input_ids": ex["input_ids"], "labels": [IGNORE_INDEX] * len(ex["input_ids"])})
        for item, ex in zip(kept, encoded, strict=True)
    ]  # fmt: skip


# Baselines scored beside the models, by their column prefix in the predictions table.
MAJORITY, TFIDF = "baseline", "tfidf"


def headline_intervals(
    label: str, actual: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """95% intervals over test examples: exact (Clopper–Pearson) for accuracy, bootstrap for
    macro-F1."""
    index = {name: i for i, name in enumerate(labels)}
    truth = np.array([index[a] for a in actual])
    guess = np.array([index.get(p, -1) for p in predicted])
    low, high = proportion_interval(truth == guess)
    f1_low, f1_high = statistic_interval(
        lambda idx: macro_f1(truth[idx], guess[idx], len(labels)), len(truth)
    )
    return {f"{label}_accuracy_low": low, f"{label}_accuracy_high": high,
            f"{label}_macro_f1_low": f1_low, f"{label}_macro_f1_high": f1_high}  # fmt: skip


def _trec(f: FinetuneConfig) -> dict[str, list[labelled.LabelledText]]:
    return trec.trec_splits(f.val_fraction)  # its standard test split; val carved from train


def _wordnet(f: FinetuneConfig) -> dict[str, list[labelled.LabelledText]]:
    items = wordnet.load_wordnet_glosses(list(f.categories), f.max_per_class)
    return labelled.stratified_split(items, f.val_fraction, f.test_fraction)


# finetune.dataset -> its train/val/test labelled texts.
LABELLED_SOURCES = {"trec": _trec, "wordnet": _wordnet}


class Classify(FinetuningTask):
    name = "classify"
    datasets = tuple(LABELLED_SOURCES)
    gate_metric = "finetuned_macro_f1"
    gate_threshold = 0.3
    serving = Serving(
        "text", generates=False, output_example=pd.DataFrame({"label": ["x"], "confidence": [0.5]})
    )

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        if "ifd" in cfg.finetune.selection.steps:
            raise ConfigError("'finetune.selection.steps' has ifd, which scores responses: "
                              "finetune.task=classify has none (use dedup, quality and "
                              "diversity)")  # fmt: skip

    def serve(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: list[str],
        params: Mapping[str, Any],
    ) -> pd.DataFrame:
        """The most probable label of each text and its probability."""
        labels, confidences = [], []
        for text in texts:  # one at a time: no padding, so the last token is the text's own
            ids = tokenizer(text or " ", add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                probs = model(input_ids=ids["input_ids"]).logits.float().softmax(-1)[0]
            best = int(probs.argmax())
            labels.append(model.config.id2label[best])
            confidences.append(float(probs[best]))
        return pd.DataFrame({"label": labels, "confidence": confidences})

    def target_count(self, batch: Batch) -> int:
        return batch["labels"].numel()  # one label per row

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # The heads' own loss is a per-batch mean: summed here, so that accumulation and
        # processes weigh every example the same.
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    def head_modules(self, model: PreTrainedModel) -> list[str]:
        """The new classification head: trained in full under LoRA."""
        return [name for name in ("score", "classifier") if hasattr(model, name)]

    def splits(self, f: FinetuneConfig) -> dict[str, list[labelled.LabelledText]]:
        return LABELLED_SOURCES[f.dataset](f)

    def candidates(self, f: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> list[Candidate]:
        return selection_candidates(tokenizer, self.splits(f)["train"], f.max_len)

    def setup(
        self,
        f: FinetuneConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        train_ids: Collection[str] | None = None,
    ) -> TrainingSetup:
        splits = self.splits(f)
        # The classes are those of the whole training split, selected or not.
        labels = labelled.label_names(splits["train"])
        model = load_classifier(base, labels)
        train = chosen(splits["train"], train_ids)
        train_examples = labelled.encode_texts(tokenizer, train, labels, f.max_len)
        val_examples = labelled.encode_texts(tokenizer, splits["val"], labels, f.max_len)
        pad = model.config.pad_token_id

        def val_metrics(m: torch.nn.Module) -> dict[str, float]:
            result = predict_classes(
                m, labelled.ordered_batches(val_examples, f.batch_size, pad), device,
                f.eval_batches,
            )  # fmt: skip
            accuracy = float((result.actual == result.predicted).mean())
            return {"loss": result.loss, "accuracy": accuracy}

        batches = labelled.shuffled_batches(train_examples, f.batch_size, pad, seed, rank,
                                            world_size)  # fmt: skip
        counts = {
            "train_examples": len(train_examples),
            "val_examples": len(val_examples),
            "classes": len(labels),
        }
        return TrainingSetup(model, batches, self, val_metrics, counts)

    def load(self, path: Path) -> PreTrainedModel:
        return load_classifier(path)

    def predict(
        self,
        models: Mapping[str, PreTrainedModel],
        tokenizer: PreTrainedTokenizerBase,
        splits: Mapping[str, Sequence[labelled.LabelledText]],
        f: FinetuneConfig,
        e: EvaluateConfig,
    ) -> pd.DataFrame:
        """Per test text: the true category, each model's prediction and confidence (each
        model run on the device it is on), and the TF-IDF baseline's prediction."""
        first = next(iter(models.values()))
        labels = [first.config.id2label[i] for i in range(first.config.num_labels)]
        test = splits["test"]
        examples = labelled.encode_texts(tokenizer, test, labels, f.max_len)
        kept = [t for t in test if labelled.has_tokens(tokenizer, t.text)]
        frame = pd.DataFrame(
            {"id": [t.id for t in kept], "text": [t.text for t in kept],
             "actual": [t.label for t in kept]}
        )  # fmt: skip
        for label, model in models.items():
            result = predict_classes(
                model, labelled.ordered_batches(examples, e.batch_size, first.config.pad_token_id),
                model_device(model),
            )  # fmt: skip
            frame[f"{label}_predicted"] = [labels[i] for i in result.predicted]
            frame[f"{label}_confidence"] = result.confidence
        train = splits["train"]
        frame[f"{TFIDF}_predicted"] = tfidf_predictions(
            [t.text for t in train], [t.label for t in train], frame["text"].tolist()
        )
        return frame

    def score(
        self, frame: pd.DataFrame, models: Sequence[str], splits: Mapping[str, list]
    ) -> dict[str, float]:
        """Accuracy, macro-F1 and per-class scores of each model, of always answering the
        training split's majority class, and of TF-IDF + logistic regression."""
        labels = labelled.label_names(splits["train"])
        majority = labelled.majority_label(splits["train"])
        actual = frame["actual"].tolist()
        columns = {label: frame[f"{label}_predicted"].tolist() for label in models}
        columns[MAJORITY] = [majority] * len(frame)
        columns[TFIDF] = frame[f"{TFIDF}_predicted"].tolist()
        metrics: dict[str, float] = {"test_examples": len(frame)}
        for label, predicted in columns.items():
            report = classification_report(actual, predicted, labels)
            metrics |= {f"{label}_{key}": value for key, value in report.items()}
            metrics |= headline_intervals(label, actual, predicted, labels)
        for label in models:
            metrics[f"{label}_macro_f1_vs_{TFIDF}"] = (
                metrics[f"{label}_macro_f1"] - metrics[f"{TFIDF}_macro_f1"]
            )
        return metrics

    def example_scores(self, frame: pd.DataFrame, metric: str) -> pd.DataFrame | None:
        """A model's prediction right (1) or not per test text (`<model>_accuracy`)."""
        if not metric.endswith("_accuracy"):
            return None
        predicted = frame[f"{metric.removesuffix('_accuracy')}_predicted"]
        hits = (predicted == frame["actual"]).to_numpy(float)
        return score_table(metric, "max", frame["id"].astype(str), hits)

    def example_metrics(self, frame: pd.DataFrame) -> list[str]:
        return ["finetuned_accuracy"]

    def report(
        self,
        frame: pd.DataFrame,
        metrics: Mapping[str, float],
        models: Sequence[str],
        e: EvaluateConfig,
    ) -> Report:
        """The tuned classifier's confusion matrix, titled with its scores and TF-IDF's."""
        labels = sorted(set(frame["actual"]) | set(frame["finetuned_predicted"]))
        figure = confusion_matrix_figure(
            confusion_matrix(frame["actual"], frame["finetuned_predicted"], labels),
            labels,
            f"Test set: accuracy {metrics['finetuned_accuracy']:.3f}, "
            f"macro-F1 {metrics['finetuned_macro_f1']:.3f} (TF-IDF + LR "
            f"{metrics[f'{TFIDF}_macro_f1']:.3f})",
        )
        return Report({"confusion_matrix.png": figure})
