"""The pruned deployment variant, end to end: calibrate on the training split, prune, recover
(optionally, in the shared training loop), save, and score on the held-out split like
evaluate scores the fine-tuned model; plus the unstructured-sparsity analysis.

Calibration, recovery and the sparsity curve use the task's supervised objective
(`FinetuningTask.supervised_task`: SFT for a preference model) and its validation split;
the variants' quality is the task's own held-out score (`predict` + `score`, as evaluate).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.deploy.distill import Distillation
from lmpipe.deploy.prune import Pruned, input_norms, prune_structured
from lmpipe.deploy.sparsity import SparsityPoint, sparsity_curve, sparsity_figure
from lmpipe.deploy.variants import variant_models
from lmpipe.runs.config import FinetuneConfig, LmpipeConfig, PruneConfig
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.base import FinetuningTask
from lmpipe.tasks.finetuning import prepare_finetuning
from lmpipe.training.checkpoint import Checkpoints
from lmpipe.training.loop import autocast, train
from lmpipe.training.model import save_model

log = logging.getLogger(__name__)

# The variants scored here, labelled as their held-out metrics are prefixed (pruned_*, ...).


def recovery_config(f: FinetuneConfig | DictConfig, p: PruneConfig, task: str) -> DictConfig:
    """finetune.* for the recovery fine-tune: `p.recovery_steps` full-weight steps at
    `p.recovery_lr` on the whole training split, evaluated once at the end, checkpointed as
    finetune is."""
    settings = OmegaConf.to_container(OmegaConf.structured(f), resolve=True)
    steps = max(p.recovery_steps, 1)  # 0 steps: the setup still gives calibration batches
    settings |= {
        "task": task, "steps": steps, "epochs": None, "eval_every": steps,
        "checkpoint_every": min(settings["checkpoint_every"], steps),
        "early_stopping_patience": None, "final_weights": "last",
        "freeze_layers": 0, "freeze_embeddings": False,
    }  # fmt: skip
    settings["peft"]["method"] = "none"
    settings["selection"]["steps"] = []
    settings["optim"]["lr"] = p.recovery_lr
    settings["optim"]["warmup_steps"] = min(settings["optim"]["warmup_steps"], steps // 10)
    return OmegaConf.create(settings)


def loss_of(value: float | Mapping[str, float]) -> float:
    """A validation function's loss (a classifier's returns its loss among other metrics)."""
    return float(value["loss"]) if isinstance(value, Mapping) else float(value)


@dataclass
class Compression:
    pruned_dir: Path
    pruned: Pruned
    metrics: dict[str, float]  # pruned_*, pruned_int8_* held-out scores; prune.* facts
    curve: list[SparsityPoint] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)


def compress(
    model_dir: Path,
    task: FinetuningTask,
    splits: Mapping[str, list],
    c: LmpipeConfig | DictConfig,
    *,
    device: torch.device,
    out_dir: Path,
    metrics: MetricLogger,
    checkpoints: Checkpoints | None = None,
    run_id: str = "",
) -> Compression:
    """Prune the model in `model_dir` into `out_dir` as `deploy.prune` says, with its held-out
    scores (`splits`: the held-out data evaluate scored) and the sparsity curve of
    `deploy.sparsity`. With `checkpoints`, an interrupted recovery resumes."""
    f, e, p, hardware, seed = c.finetune, c.evaluate, c.deploy.prune, c.hardware, c.seed
    levels, methods = list(c.deploy.sparsity.levels), list(c.deploy.sparsity.methods)
    tokenizer = load_tokenizer(model_dir)
    supervised = task.supervised_task()
    r = recovery_config(f, p, supervised.name)
    setup = prepare_finetuning(r, model_dir, tokenizer, seed, device, task=supervised)
    model = setup.model.to(device)

    def val_loss(m: PreTrainedModel) -> float:
        with autocast(device, hardware.precision):
            return loss_of(setup.evaluate(m.to(device)))

    with autocast(device, hardware.precision):
        calibration = list(itertools.islice(setup.batches, p.calibration_batches))
        norms = input_norms(model, calibration, device)
    setup.batches.position = 0  # recovery starts at the first training batch
    facts: dict[str, float] = {"calibration_batches": len(calibration)}
    figures = {}
    curve = []
    if levels:
        curve = sparsity_curve(model, norms, levels, val_loss, methods)
        figures["sparsity.png"] = sparsity_figure(curve, "validation loss")
    facts["dense_val_loss"] = val_loss(model)
    pruned, kept = prune_structured(model.cpu(), norms, p.mlp_ratio, p.head_ratio)
    facts |= kept.summary
    facts["pruned_val_loss_before_recovery"] = val_loss(pruned)
    if p.recovery_steps:
        log.info("prune: recovery fine-tune, %d steps at lr %g, distillation weight %g at "
                 "temperature %g", r.steps, r.optim.lr, p.distill_weight,
                 p.distill_temperature)  # fmt: skip
        objective = setup.objective
        if p.distill_weight > 0:  # the dense model, unpruned, is the teacher
            objective = Distillation(objective, model, p.distill_temperature, p.distill_weight)
        train(pruned, setup.batches, r, hardware, device, metrics, setup.evaluate,
              checkpoints=checkpoints, run_id=run_id, objective=objective,
              desc="prune: recovery")  # fmt: skip
        facts["pruned_val_loss"] = val_loss(pruned)
    save_model(pruned.cpu(), tokenizer, out_dir)

    # Held-out scores of the pruned variants, as evaluate scores the fine-tuned model's.
    variants = variant_models(lambda: task.load(out_dir), "pruned", device, c.deploy.quantize)
    with autocast(device, hardware.precision):
        frame = task.predict(variants, tokenizer, splits, f, e)
    scores = task.score(frame, list(variants), splits)
    scored = {k: v for k, v in scores.items() if k.startswith(tuple(f"{v}_" for v in variants))}
    return Compression(out_dir, kept, {**scored, **{f"prune.{k}": v for k, v in facts.items()}},
                       curve, figures)  # fmt: skip


def curve_table(points: list[SparsityPoint]) -> list[dict[str, Any]]:
    return [vars(point) for point in points]
