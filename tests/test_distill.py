"""Recovery by distillation (lmpipe.deploy.distill): the KL term against a hand computation,
the label term against the tasks' own losses, and a pruned model's recovery through
`compress` that resumes after an interruption to the weights of a straight run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from lmpipe.deploy.compress import compress
from lmpipe.deploy.distill import Distillation, kl_sum
from lmpipe.runs.config import validate
from lmpipe.taskdata import labelled
from lmpipe.tasks.causal_lm import NextTokenLoss
from lmpipe.tasks.classify import Classify
from lmpipe.tasks.sft import SFT
from lmpipe.training.checkpoint import Checkpoints
from lmpipe.training.model import load_classifier, load_model, save_model
from tests.test_checkpoint import Crash, CrashingLogger
from tests.test_train import NullLogger

CPU = torch.device("cpu")


def test_the_kl_term_of_a_two_by_three_case_by_hand() -> None:
    """T = 2. Row 1: teacher logits (2, 0, 0) and student (0, 0, 0); row 2: equal logits,
    KL 0. Teacher at T: softmax(1, 0, 0) = (e, 1, 1) / (e + 2); student: uniform 1/3. So
    KL = Σ p log(p / (1/3)) = log 3 + Σ p log p, times T² = 4."""
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.5, -1.0, 3.0]])
    student = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 3.0]])
    e = math.e
    p = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    expected = 4 * (math.log(3) + sum(q * math.log(q) for q in p))
    assert float(kl_sum(student, teacher, 2.0)) == pytest.approx(expected, rel=1e-6)
    assert float(kl_sum(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)


def sft_batch(tokenizer) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9, 10], [-100, 12, 13, 14, -100, -100]])
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100) | (ids > 0)}


def test_without_the_teacher_the_loss_is_each_tasks_own(tiny_model, tiny_tokenizer, tmp_path):
    batch = sft_batch(tiny_tokenizer)
    batch["attention_mask"] = batch["attention_mask"].long()
    teacher = copy.deepcopy(tiny_model)
    ours = Distillation(NextTokenLoss(), teacher, 2.0, 0.0)
    torch.testing.assert_close(ours.loss_sum(tiny_model, batch),
                               NextTokenLoss().loss_sum(tiny_model, batch))  # fmt: skip
    assert ours.target_count(batch) == NextTokenLoss().target_count(batch) == 7
    save_model(tiny_model, tiny_tokenizer, tmp_path / "base")
    classifier = load_classifier(tmp_path / "base", ["a", "b"])
    rows = labelled.encode_texts(tiny_tokenizer, [labelled.LabelledText("1", "the fox", "a"),
                                                  labelled.LabelledText("2", "a dog", "b")],
                                 ["a", "b"], 16)  # fmt: skip
    batch = labelled.collate(rows, tiny_tokenizer.pad_token_id)
    task = Classify()
    distilled = Distillation(task, copy.deepcopy(classifier), 3.0, 0.0)
    torch.testing.assert_close(distilled.loss_sum(classifier, batch),
                               task.loss_sum(classifier, batch))  # fmt: skip


def test_the_teacher_pulls_the_student_towards_its_distribution(tiny_model, tiny_tokenizer):
    batch = sft_batch(tiny_tokenizer)
    batch["attention_mask"] = batch["attention_mask"].long()
    same = Distillation(NextTokenLoss(), copy.deepcopy(tiny_model), 2.0, 1.0)
    assert float(same.loss_sum(tiny_model, batch)) == pytest.approx(0.0, abs=1e-5)
    teacher = copy.deepcopy(tiny_model)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)  # a sharper distribution than the student's
    half = Distillation(NextTokenLoss(), teacher, 2.0, 0.5)
    labels_only = NextTokenLoss().loss_sum(tiny_model, batch)
    mixed = half.loss_sum(tiny_model, batch)
    assert float(mixed) != pytest.approx(0.5 * float(labels_only))  # the KL term counts
    mixed.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


def recovery_config(steps: int):
    return validate({
        "finetune": {"dataset": "chatterbot", "max_len": 40, "batch_size": 4,
                     "eval_batches": 1, "optim": {"warmup_steps": 0}},
        "evaluate": {"max_new_tokens": 2, "batch_size": 16, "num_generations": 2},
        "deploy": {"prune": {"mlp_ratio": 0.5, "calibration_batches": 1,
                             "recovery_steps": steps, "recovery_lr": 1e-3,
                             "distill_weight": 0.5, "distill_temperature": 2.0},
                   "sparsity": {"levels": []}, "quantize": {"variants": []}},
    })  # fmt: skip


@pytest.mark.slow
def test_a_distilled_recovery_resumes_after_an_interruption(
    tiny_model, tiny_tokenizer, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    save_model(tiny_model, tiny_tokenizer, model_dir)
    c = recovery_config(steps=6)
    c.finetune.checkpoint_every = 2
    splits = SFT().splits(c.finetune)
    splits["test"] = splits["test"][:8]

    def run(out: str, logger, checkpoints=None):
        return compress(model_dir, SFT(), splits, c, device=CPU, out_dir=tmp_path / out,
                        metrics=logger, checkpoints=checkpoints, run_id="deploy-run")  # fmt: skip

    straight = run("straight", NullLogger())
    checkpoints = Checkpoints(tmp_path / "checkpoints", "recovery")
    with pytest.raises(Crash):
        run("interrupted", CrashingLogger(at_step=5), checkpoints)
    assert checkpoints.resumable()["step"] == 4
    resumed = run("resumed", NullLogger(), checkpoints)
    assert checkpoints.resumable() is None
    expected = load_model(straight.pruned_dir).state_dict()
    for name, value in load_model(resumed.pruned_dir).state_dict().items():
        assert torch.equal(value, expected[name]), name
    facts = straight.metrics
    assert facts["prune.pruned_val_loss"] < facts["prune.pruned_val_loss_before_recovery"]
    c.deploy.prune.distill_weight = 0.0  # the labels alone: another recovery
    labels_only = load_model(run("labels-only", NullLogger()).pruned_dir).state_dict()
    assert not all(torch.equal(value, expected[name]) for name, value in labels_only.items())
