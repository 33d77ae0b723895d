"""The fine-tuning tasks by name (`finetune.task`), and their model and data made ready to
train: adapters, frozen layers and the step count of `finetune.epochs`."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from lmpipe.runs.config import ConfigError, FinetuneConfig
from lmpipe.tasks.base import FinetuningTask, TrainingSetup
from lmpipe.tasks.classify import Classify
from lmpipe.tasks.grpo import GRPO
from lmpipe.tasks.kto import KTO
from lmpipe.tasks.preference import Preference
from lmpipe.tasks.rejection_sampling import RejectionSampling
from lmpipe.tasks.self_correction import SelfCorrection
from lmpipe.tasks.sft import SFT
from lmpipe.training import adapters

log = logging.getLogger(__name__)

FINETUNING: dict[str, type[FinetuningTask]] = {
    task.name: task
    for task in (SFT, Classify, Preference, KTO, RejectionSampling, GRPO, SelfCorrection)
}


def finetuning_task(name: str) -> FinetuningTask:
    try:
        return FINETUNING[name]()
    except KeyError:
        raise ConfigError(f"invalid value for 'finetune.task': {name!r} "
                          f"(allowed: {sorted(FINETUNING)})") from None  # fmt: skip


def checked_task(cfg: DictConfig) -> FinetuningTask:
    """The task of `cfg.finetune.task`, after its own rules for `cfg` (a ConfigError names
    the key): what finetune, evaluate and deploy start with."""
    task = finetuning_task(cfg.finetune.task)
    task.check(cfg)
    return task


def prepare_finetuning(
    f: FinetuneConfig,
    base: Path,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    train_ids: Collection[str] | None = None,
    task: FinetuningTask | None = None,
) -> TrainingSetup:
    """The task's model and data (the selected training examples, with `train_ids`), with
    peft adapters or frozen layers as configured. `setup.config` is what to train with: `f`,
    or with `f.epochs` a copy whose `steps` count them (AdaLoRA plans its rank budget over
    the final count); `f` itself is left as it was."""
    task = task or finetuning_task(f.task)
    setup = task.setup(f, base, tokenizer, seed, device, rank, world_size, train_ids)
    if f.max_len > setup.model.config.max_position_embeddings:
        raise ConfigError(
            f"finetune.max_len={f.max_len} exceeds the base model's "
            f"max_position_embeddings={setup.model.config.max_position_embeddings}"
        )
    if f.epochs is not None:
        f = with_steps(f, steps_for_epochs(f, setup.batches.num_items, world_size))
        log.info("finetune: %s epochs of %d items = %d steps", f.epochs, setup.batches.num_items,
                 f.steps)  # fmt: skip
    setup.config = f
    if f.peft.method != "none":
        head = task.head_modules(setup.model)
        setup.adapters = adapters.add_adapters(setup.model, f.peft, f.steps,
                                               trainable_modules=head)  # fmt: skip
    if task.disables_dropout(f):
        adapters.disable_dropout(setup.model)
    adapters.freeze_layers(setup.model, f.freeze_layers, f.freeze_embeddings)
    return setup


def with_steps(f: FinetuneConfig | DictConfig, steps: int) -> FinetuneConfig | DictConfig:
    """A copy of `f` that trains for `steps` optimizer steps."""
    if isinstance(f, DictConfig):
        copy = f.copy()
        copy.steps = steps
        return copy
    return dataclasses.replace(f, steps=steps)


def steps_for_epochs(f: FinetuneConfig, num_items: int, world_size: int) -> int:
    """Optimizer steps for `f.epochs` passes over `num_items` training items."""
    assert f.epochs is not None
    per_epoch = num_items // (f.batch_size * world_size)
    return max(1, math.floor(f.epochs * per_epoch / f.grad_accum))
