"""Recovery by distillation: the pruned model learns the dense model's output distribution
as well as the task's labels (Hinton et al. 2015; the recovery step of Sheared-LLaMA and
Minitron).

At each of the task's targets (a labelled next token, or a row's class) the loss is
(1 − w) × the cross-entropy of the label + w × T² × KL(softmax(teacher / T) ‖
softmax(student / T)), summed over the targets like every objective (the loop divides by the
global target count). T² keeps the KL term's gradients on the scale of the label's as T
grows. The teacher is the dense fine-tuned model, frozen; `w = 0` is the task's own loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmpipe.data.batches import IGNORE_INDEX, Batch
from lmpipe.training.loop import Objective


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² × Σ over rows of KL(softmax(teacher / T) ‖ softmax(student / T)) for logits
    [rows, classes] (fp32)."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return temperature**2 * per_row.sum()


class Distillation(Objective):
    """The task's targets, learnt from their labels and from the teacher's distribution."""

    name = "distillation"

    def __init__(
        self, task: Objective, teacher: torch.nn.Module, temperature: float, weight: float
    ) -> None:
        self.task, self.teacher = task, teacher.eval().requires_grad_(False)
        self.temperature, self.weight = temperature, weight

    def target_count(self, batch: Batch) -> int:
        return self.task.target_count(batch)

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
        with torch.no_grad():
            teacher = self.teacher(**inputs, use_cache=False).logits
        labels = batch["labels"]
        if logits.dim() == 3:  # a causal LM: each position predicts the next token
            targets = labels[:, 1:]
            mask = targets != IGNORE_INDEX
            logits, teacher, labels = logits[:, :-1][mask], teacher[:, :-1][mask], targets[mask]
        label_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        if self.weight == 0:
            return label_sum
        distilled = kl_sum(logits, teacher, self.temperature)
        return (1 - self.weight) * label_sum + self.weight * distilled
