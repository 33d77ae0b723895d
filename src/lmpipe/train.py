"""One training loop for pretrain and finetune.

AdamW (no weight decay on norms, biases and embeddings), linear warmup then cosine decay
to `min_lr_ratio * lr`, gradient accumulation and clipping, bf16 autocast on CUDA, periodic
evaluation, step metrics through `tracking.MetricLogger`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from lmpipe.config import HardwareConfig, OptimConfig, TrainConfig
from lmpipe.data.sft import IGNORE_INDEX
from lmpipe.tracking import MetricLogger

log = logging.getLogger(__name__)

Batches = Iterator[dict[str, torch.Tensor]]
EvalFn = Callable[[PreTrainedModel], float]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def select_device(hardware: HardwareConfig) -> torch.device:
    if hardware.num_threads:
        torch.set_num_threads(hardware.num_threads)
    if hardware.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu")
    return torch.device(hardware.device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Decay only matrices of linear layers; norms, biases and embeddings are not decayed."""
    embedding_params = {
        id(p)
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        for p in module.parameters()
    }
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embedding_params else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float | None
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def train(
    model: PreTrainedModel,
    batches: Batches,
    cfg: TrainConfig,
    device: torch.device,
    hardware: HardwareConfig,
    metrics: MetricLogger,
    evaluate: EvalFn | None = None,
    desc: str = "train",
) -> TrainResult:
    """Run `cfg.steps` optimizer steps; each consumes `cfg.grad_accum` batches."""
    model.to(device)
    model.train()
    # The compiled module shares parameters with `model`, which is what gets saved.
    forward = torch.compile(model) if hardware.compile else model
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.steps,
        min_lr_rate=cfg.optim.min_lr_ratio,
    )
    tokens = 0
    train_loss = float("nan")
    val_loss: float | None = None
    start = time.perf_counter()
    progress = tqdm(range(1, cfg.steps + 1), desc=desc, unit="step", mininterval=1)
    for step in progress:
        step_start = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            with autocast(device, hardware.precision):
                loss = forward(**batch).loss
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            step_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not np.isfinite(step_loss):
            raise FloatingPointError(f"{desc}: loss is {step_loss} at step {step}; lower the lr")
        tokens += step_tokens
        train_loss = step_loss
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - step_start
            metrics.log(
                {
                    "train_loss": step_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "tokens_per_second": step_tokens / max(elapsed, 1e-9),
                },
                step,
            )
            progress.set_postfix(loss=f"{step_loss:.3f}")
        if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            val_loss = evaluate(model)
            metrics.log(
                {"val_loss": val_loss, "val_perplexity": float(np.exp(val_loss))}, step, "val"
            )
            log.info("%s step %d: train loss %.4f, val loss %.4f", desc, step, step_loss, val_loss)
    progress.close()
    return TrainResult(cfg.steps, train_loss, val_loss, tokens, time.perf_counter() - start)
