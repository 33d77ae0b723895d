"""Scoring for finetune's periodic eval and the evaluate stage: scores of generated replies
(the replies themselves: lmpipe.feedback.rollouts), class predictions,
confusion matrix and per-class report, per-example losses
(LM loss itself: lmpipe.evaluation.lm_metrics)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from lmpipe.evaluation.lm_metrics import eval_mode, token_losses


def reply_scores(
    replies: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Generated replies against their references (one, or several for a reply): corpus
    chrF (sacrebleu, 0-100) and mean ROUGE-L F1 (rouge-score, stemmed, 0-1); with several
    references each reply is scored against the one it matches best."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not replies:
        raise ValueError("no generated replies to score")
    options = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(refs, reply)["rougeL"].fmeasure
             for reply, refs in zip(replies, options, strict=True)]  # fmt: skip
    # sacrebleu takes reference streams; a reply with fewer references gets None in the rest
    streams = [[refs[i] if i < len(refs) else None for refs in options]
               for i in range(max(len(refs) for refs in options))]  # fmt: skip
    chrf = sacrebleu.corpus_chrf(list(replies), streams).score
    return {"chrf": float(chrf), "rougeL": float(np.mean(rouge))}


@dataclass
class ClassPredictions:
    actual: np.ndarray  # class ids
    predicted: np.ndarray
    confidence: np.ndarray  # softmax probability of the predicted class
    loss: float  # mean cross-entropy


@torch.no_grad()
def predict_classes(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    max_batches: int | None = None,
) -> ClassPredictions:
    """A sequence classifier's predictions (and loss) over labelled batches."""
    actual, predicted, confidence, total = [], [], [], 0.0
    with eval_mode(model):
        for batch in itertools.islice(batches, max_batches):
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits.float()
            labels = batch["labels"].to(device)
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            best = logits.softmax(-1).max(-1)
            actual.append(labels.cpu().numpy())
            predicted.append(best.indices.cpu().numpy())
            confidence.append(best.values.cpu().numpy())
    if not actual:
        raise ValueError("no labelled examples to classify")
    actual_ids = np.concatenate(actual)
    return ClassPredictions(
        actual_ids, np.concatenate(predicted), np.concatenate(confidence), total / len(actual_ids)
    )


def confusion_matrix(
    actual: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> np.ndarray:
    """counts[i, j]: texts of class labels[i] predicted as labels[j]."""
    index = {name: i for i, name in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for truth, guess in zip(actual, predicted, strict=True):
        counts[index[truth], index[guess]] += 1
    return counts


def classification_report(
    actual: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy, macro-F1 and per-class precision/recall/F1 from the confusion matrix.

    A class with no predictions (or no texts) has precision (recall) 0, and F1 0 unless
    both are undefined; macro-F1 averages over all `labels`.
    """
    counts = confusion_matrix(actual, predicted, labels)
    if counts.sum() == 0:
        raise ValueError("no predictions to score")
    hits = np.diag(counts).astype(float)
    predicted_totals, actual_totals = counts.sum(0), counts.sum(1)
    precision = np.divide(hits, predicted_totals, out=np.zeros_like(hits),
                          where=predicted_totals > 0)  # fmt: skip
    recall = np.divide(hits, actual_totals, out=np.zeros_like(hits), where=actual_totals > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(hits),
                   where=denominator > 0)  # fmt: skip
    report = {"accuracy": float(hits.sum() / counts.sum()), "macro_f1": float(f1.mean())}
    for name, p, r, f in zip(labels, precision, recall, f1, strict=True):
        report |= {
            f"precision.{name}": float(p),
            f"recall.{name}": float(r),
            f"f1.{name}": float(f),
        }
    return report


@torch.no_grad()
def example_losses(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
) -> tuple[list[float], list[int]]:
    """Per example (row): summed next-token cross-entropy over its labelled positions, and
    how many there are. Their ratio of sums is `mean_loss`."""
    sums, counts = [], []
    with eval_mode(model):
        for batch in batches:
            losses, labelled = token_losses(model, batch, device)
            sums += losses.sum(1).tolist()
            counts += labelled.sum(1).tolist()
    return sums, counts
