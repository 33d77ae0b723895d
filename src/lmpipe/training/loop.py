"""One training loop for pretrain and finetune.

AdamW (no weight decay on norms, biases and embeddings), linear warmup then cosine decay
to `min_lr_ratio * lr`, gradient accumulation with the loss weighted by tokens across
micro-batches and processes, clipping, bf16 autocast on CUDA, optional torch.compile and
gradient checkpointing, DDP or FSDP2 when started as several processes, periodic
evaluation, best and last checkpoints, early stopping, and exact resume: a run killed at
any moment and restarted continues from its last checkpoint to the same weights. On CPU,
freed memory stays in the process while training (lmpipe.training.host_memory).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import resource
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, get_cosine_with_min_lr_schedule_with_warmup

from lmpipe.evaluation.lm_metrics import perplexity
from lmpipe.runs.config import ConfigError, HardwareConfig, OptimConfig, TrainConfig
from lmpipe.runs.processes import allotted_cpus
from lmpipe.runs.tracking import MetricLogger
from lmpipe.training import distributed
from lmpipe.training.checkpoint import BEST, LAST, Checkpoints
from lmpipe.training.distributed import DistEnv
from lmpipe.training.host_memory import retained_host_memory

log = logging.getLogger(__name__)


class Batches(Protocol):
    """Endless micro-batches whose data position (a checkpoint saves it) is one integer."""

    position: int

    def __next__(self) -> dict[str, torch.Tensor]: ...


class Objective(ABC):
    """What the loop asks of a task (lmpipe.tasks): the summed loss of a micro-batch and its
    number of prediction targets, and the sums of any per-target values it tracks (e.g. a
    preference pair's rewards), which the loop averages over the step's targets and logs.
    The loop knows nothing else about tasks."""

    name: ClassVar[str]
    # The loss is a cross-entropy per target token (exp(loss) is a perplexity).
    loss_is_per_token: ClassVar[bool] = True

    @abstractmethod
    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        """Prediction targets in `batch` (labelled tokens, masked tokens, rows, ...)."""

    @abstractmethod
    def loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss summed over the batch's targets (fp32)."""

    def take_metric_sums(self) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Sums since the last call of values worth logging per step: a sum over the targets
        (the loop averages it over the step's targets), or a (sum, count) pair averaged over
        its own count (e.g. per completion or per token where the targets are neither);
        none by default."""
        return {}


class StepHook(Protocol):
    """What a training method needs at every optimizer step besides the optimizer (AdaLoRA,
    lmpipe.training.adapters): a penalty added to the step's loss, a call after the
    optimizer step while the gradients are still there, and state that a checkpoint keeps."""

    def penalty(self) -> torch.Tensor | None: ...

    def after_step(self, step: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    # False: the hook reads whole tensors across the model (AdaLoRA ranks every singular
    # value against one budget), which FSDP2 shards over the processes.
    shardable: bool


# Validation: the val loss, or a mapping with "loss" and further values logged as val_<name>
# (e.g. a classifier's accuracy).
EvalFn = Callable[[torch.nn.Module], float | Mapping[str, float]]

# Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's datasheets, by the exact
# name torch.cuda.get_device_name reports: for MFU when hardware.peak_flops is not set. Names
# are matched whole, never by substring: "H100 PCIe" is not an H100 SXM, "L40" is not an L4.
PEAK_BF16_FLOPS = {
    "NVIDIA B200": 2250e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model initialisation draws from torch's generator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(hardware: HardwareConfig) -> torch.device:
    """The device the config asks for (`auto`: CUDA if there is one), with
    `hardware.num_threads` CPU threads (null: the CPUs a SLURM task was given, else torch's
    default)."""
    threads = hardware.num_threads or allotted_cpus()
    if threads:
        torch.set_num_threads(threads)
    kind = hardware.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu")
    return torch.device(kind)


def setup_hardware(hardware: HardwareConfig) -> tuple[torch.device, DistEnv]:
    """This process's device, after joining the process group if there are several:
    with several processes on CUDA, each takes the GPU of its local rank."""
    device = select_device(hardware)
    env = distributed.init(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    enable_tf32(device, hardware.precision)
    return device, env


def compute_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 where it is asked for and pays (CUDA); None: plain fp32."""
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (training, periodic evaluation and the evaluate stage alike:
    SDPA only takes its flash kernel on half-precision inputs)."""
    dtype = compute_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def enable_tf32(device: torch.device, precision: str) -> None:
    """With reduced precision asked for on CUDA, let the fp32 matmuls and convolutions that
    remain outside autocast use TF32 tensor cores. precision=fp32 keeps full fp32."""
    if compute_dtype(device, precision) is not None:
        # The legacy setters, consistently: torch refuses a mix of these and fp32_precision.
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def device_numerics(device: torch.device) -> dict[str, str]:
    """How this process computes on `device`, for the keys of cached model outputs: the
    device type, and its fp32 matmuls as `highest` (true fp32) or `high` (TF32 on CUDA,
    `enable_tf32`)."""
    matmul = torch.get_float32_matmul_precision() if device.type == "cuda" else "highest"
    return {"device": device.type, "float32_matmul": matmul}


def computed_as_policy(
    model: torch.nn.Module, hardware: HardwareConfig, device: torch.device
) -> torch.nn.Module:
    """A frozen model (a preference reference) set to compute as `train` computes the
    policy: in FSDP2's parameter dtype where the policy is sharded with it (`wrap_model`
    casts the parameters, not only the matmuls), compiled where training compiles. The
    caller runs it under `autocast`, as the loop does."""
    dtype = compute_dtype(device, hardware.precision)
    if dtype is not None and sharded(hardware):
        model = model.to(dtype)
    return torch.compile(model) if hardware.compile else model


def sharded(hardware: HardwareConfig, env: DistEnv | None = None) -> bool:
    """Whether training shards the model (FSDP2): asked for, with several processes."""
    env = env or distributed.process_env()
    return hardware.strategy == "fsdp" and env.enabled


def policy_numerics(hardware: HardwareConfig, device: torch.device) -> dict[str, object]:
    """What changes `computed_as_policy`'s numbers beyond its weights and inputs."""
    dtype = compute_dtype(device, hardware.precision)
    return {
        **device_numerics(device),
        "compute_dtype": str(dtype),
        "param_dtype": str(dtype if sharded(hardware) else None),
        "compile": hardware.compile,
    }


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
    # The fused kernel (CPU and CUDA) updates all parameters in one pass: fewer launches and
    # memory sweeps than the default for-each implementation.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


# --- throughput ----------------------------------------------------------------------------


def flop_terms(model: PreTrainedModel) -> tuple[float, float]:
    """Training FLOPs per token = dense + attention * sequence length.

    dense: 6 per weight (forward + backward). The input embedding is a lookup, not a
    matmul; with tied embeddings the same matrix is the output projection, so it counts
    once. attention (scores and weighted sum): 12 * layers * hidden per position.
    """
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    if not getattr(config, "tie_word_embeddings", False):
        params -= model.get_input_embeddings().weight.numel()
    return 6.0 * params, 12.0 * config.num_hidden_layers * config.hidden_size


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    dense, attention = flop_terms(model)
    return dense + attention * seq_len


def peak_flops(hardware: HardwareConfig, device: torch.device) -> float | None:
    """Peak FLOP/s of one device: the configured value, else a known GPU's dense bf16
    figure (exact name), else None: no MFU."""
    if hardware.peak_flops:
        return float(hardware.peak_flops)
    if device.type == "cuda" and hardware.precision == "bf16":
        return PEAK_BF16_FLOPS.get(device_name(device))
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


_PROC_STATUS, _PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_gb`, so each training in one process (a sweep's
    jobs under the basic launcher, a benchmark's runs) reports its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM)
        _PROC_CLEAR_REFS.write_text("5")


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak RSS on CPU, since the last
    `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError, StopIteration):
        line = next(ln for ln in _PROC_STATUS.read_text().splitlines() if ln.startswith("VmHWM"))
        return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # no /proc: since start


# --- the loop ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    tokens: int
    seconds: float
    stopped_early: bool
    resumed_from: int | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> dict[str, float]:
        """The numbers for metrics.json and MLflow (unset ones left out)."""
        values = {
            "steps": self.steps,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens_per_second,
            "seconds": self.seconds,
            "stopped_early": int(self.stopped_early),
            "resumed_from_step": self.resumed_from,
        }
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass
class _Progress:
    """What a checkpoint must carry besides model and optimizer to continue exactly."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_gain: int = 0
    train_loss: float = float("nan")
    val_loss: float | None = None

    def record_eval(self, step: int, min_delta: float) -> bool:
        """Track the best val loss so far; True if `self.val_loss` (at `step`) is a new best."""
        assert self.val_loss is not None
        if self.best_val_loss is None or self.val_loss < self.best_val_loss - min_delta:
            self.best_val_loss, self.best_step = self.val_loss, step
            self.evals_without_gain = 0
            return True
        self.evals_without_gain += 1
        return False


def train(
    model: PreTrainedModel,
    batches: Batches,
    cfg: TrainConfig,
    hardware: HardwareConfig,
    device: torch.device,
    metrics: MetricLogger,
    evaluate: EvalFn | None = None,
    checkpoints: Checkpoints | None = None,
    run_id: str = "",
    env: DistEnv | None = None,
    desc: str = "train",
    *,
    objective: Objective,
    step_hook: StepHook | None = None,
) -> TrainResult:
    """Run `cfg.steps` optimizer steps of `cfg.grad_accum` micro-batches each, minimising
    `objective`'s loss.

    `model` is trained in place (under FSDP it stays sharded: save it with
    `model.save_model`, which gathers). With `checkpoints`, an unfinished checkpoint of
    the same config is resumed and `last`/`best` are kept up to date.
    """
    env = env or DistEnv()
    if step_hook is not None and not step_hook.shardable and sharded(hardware, env):
        raise ConfigError(
            f"{type(step_hook).__name__.removesuffix('Hook')} cannot train under "
            "hardware.strategy=fsdp: it ranks whole tensors across the model, which FSDP2 "
            "shards over the processes; use hardware.strategy=ddp (the adapters are small)"
        )
    with retained_host_memory(device.type == "cpu" and hardware.retain_host_memory):
        reset_peak_memory(device)
        model.to(device)
        if hardware.gradient_checkpointing:
            # transformers 5.17 (the floor pyproject.toml states) has the older name only
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
        model.train()
        wrapped = distributed.wrap_model(
            model, env, hardware.strategy, compute_dtype(device, hardware.precision)
        )
        optimizer = build_optimizer(wrapped, cfg.optim)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=max(cfg.steps, 1),
            min_lr_rate=cfg.optim.min_lr_ratio,
        )
        progress = _Progress()
        resumed_from = None
        # Rank 0 decides (it also repairs an interrupted write); every rank follows.
        resume = checkpoints is not None and distributed.broadcast_object(
            checkpoints.resumable() is not None if env.is_main else None
        )
        if resume:
            trainer = checkpoints.load(LAST, wrapped, optimizer)
            scheduler.load_state_dict(trainer["scheduler"])
            batches.position = trainer["position"]
            progress = _Progress(**trainer["progress"])
            metrics.load_state_dict(trainer["metrics"])
            if step_hook is not None:
                step_hook.load_state_dict(trainer["step_hook"])
            resumed_from = progress.step
            log.info("%s: resuming at step %d of %d", desc, progress.step, cfg.steps)
        # The compiled module shares parameters with `wrapped`, which is what gets saved.
        forward = torch.compile(wrapped) if hardware.compile else wrapped
        dense_flops, attention_flops = flop_terms(model)
        peak = peak_flops(hardware, device)
        if peak is None and env.is_main:
            log.info("%s: MFU not reported: no dense %s peak FLOP/s known for %r; "
                     "set hardware.peak_flops", desc, hardware.precision,
                     device_name(device))  # fmt: skip

        def save(name: str, state_extra: dict | None = None) -> None:
            if checkpoints is None:
                return
            metrics.flush()
            trainer = None
            if name == LAST:
                trainer = {
                    "scheduler": scheduler.state_dict(),
                    "position": batches.position,
                    "progress": vars(progress).copy(),
                    "metrics": metrics.state_dict(),
                    **({"step_hook": step_hook.state_dict()} if step_hook else {}),
                }
            state = {"step": progress.step, "run_id": run_id, **(state_extra or {})}
            checkpoints.save(name, wrapped, state, optimizer if name == LAST else None, trainer)

        best_weights: dict[str, torch.Tensor] | None = None  # in memory when no checkpoints
        interval_tokens, interval_flops, interval_start = 0, 0.0, time.perf_counter()
        run_start = time.perf_counter() - progress.seconds
        stopped_early = False
        bar = tqdm(
            total=cfg.steps, initial=progress.step, desc=desc, unit="step", mininterval=1,
            disable=not env.is_main,
        )  # fmt: skip
        while progress.step < cfg.steps:
            step = progress.step + 1
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            loss_value, grad_norm, global_tokens, global_flops, extra = _optimizer_step(
                forward, objective, optimizer, micro_batches, cfg.optim.grad_clip, hardware,
                device, env, (dense_flops, attention_flops), step_hook, step,
            )  # fmt: skip
            scheduler.step()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"{desc}: loss is {loss_value} at step {step}; lower the lr"
                )
            progress.step, progress.train_loss = step, loss_value
            progress.tokens += int(global_tokens)
            interval_tokens += int(global_tokens)
            interval_flops += global_flops
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = max(time.perf_counter() - interval_start, 1e-9)
                values = {
                    "train_loss": loss_value,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "tokens_per_second": interval_tokens / elapsed,
                    "peak_memory_gb": peak_memory_gb(device),
                    **extra,
                }
                if peak:
                    values["mfu"] = interval_flops / elapsed / (peak * env.world_size)
                metrics.log(values, step)
                bar.set_postfix(loss=f"{loss_value:.3f}")
                interval_tokens, interval_flops, interval_start = 0, 0.0, time.perf_counter()
            bar.update(1)
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                progress.val_loss, extra = _evaluate(evaluate, forward, device, hardware)
                values = {"val_loss": progress.val_loss}
                if objective.loss_is_per_token:
                    values["val_perplexity"] = perplexity(progress.val_loss)
                metrics.log(
                    {**values, **{f"val_{name}": value for name, value in extra.items()}},
                    step,
                    "val",
                )
                log.info("%s step %d: train loss %.4f, val loss %.4f", desc, step, loss_value,
                         progress.val_loss)  # fmt: skip
                # The best weights are kept only where they become the model (a best
                # checkpoint of SmolLM2-135M is 0.5 GB written at every new best).
                if progress.record_eval(step, cfg.early_stopping_min_delta) and (
                    cfg.final_weights == BEST
                ):
                    if checkpoints is not None:
                        save(BEST, {"val_loss": progress.val_loss})
                    else:
                        best_weights = {
                            k: v.detach().clone() for k, v in model.state_dict().items()
                        }
                patience = cfg.early_stopping_patience
                if patience is not None and progress.evals_without_gain >= patience:
                    log.info("%s: no val gain in %d evaluations, stopping at step %d (best %d)",
                             desc, patience, step, progress.best_step)  # fmt: skip
                    stopped_early = True
            progress.seconds = time.perf_counter() - run_start
            if stopped_early:
                break
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save(LAST)
        bar.close()
        if cfg.steps == 0 and evaluate is not None:  # nothing trained: still report where it stands
            progress.val_loss, _ = _evaluate(evaluate, forward, device, hardware)
        if cfg.steps > 0:  # at 0 steps there is nothing to resume or inspect (1.5 GB for SmolLM2)
            save(LAST)
        if checkpoints is not None:
            checkpoints.mark_finished()
        if cfg.final_weights == BEST and progress.best_step not in (None, progress.step):
            log.info(
                "%s: final weights are the best checkpoint (step %d)", desc, progress.best_step
            )
            if checkpoints is not None:
                checkpoints.load(BEST, wrapped)
            elif best_weights is not None:
                model.load_state_dict(best_weights)
        return TrainResult(
            steps=progress.step,
            train_loss=progress.train_loss,
            val_loss=progress.val_loss,
            best_val_loss=progress.best_val_loss,
            best_step=progress.best_step,
            tokens=progress.tokens,
            seconds=progress.seconds,
            stopped_early=stopped_early,
            resumed_from=resumed_from,
        )


def _optimizer_step(
    forward: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    grad_clip: float,
    hardware: HardwareConfig,
    device: torch.device,
    env: DistEnv,
    flop_terms: tuple[float, float],
    step_hook: StepHook | None = None,
    step: int = 0,
) -> tuple[float, float, float, float, dict[str, float]]:
    """One optimizer step over the micro-batches of every process.

    Returns the global mean loss, the gradient norm before clipping, the input tokens and
    model FLOPs of the step summed over processes, and the objective's tracked values
    averaged over the step's targets.
    """
    # Every labelled token of the global batch weighs the same, however the micro-batches
    # and processes split them: loss = sum over tokens / global token count.
    # Collectives on the training device: NCCL serves CUDA tensors only.
    label_count = distributed.all_reduce_sum(
        torch.tensor(sum(objective.target_count(b) for b in micro_batches), dtype=torch.float64,
                     device=device)
    ).float()  # fmt: skip
    dense_flops, attention_flops = flop_terms
    step_loss = torch.zeros((), device=device)
    input_tokens, flops = 0, 0.0
    for index, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with (
            distributed.gradient_sync(forward, index == len(micro_batches) - 1),
            autocast(device, hardware.precision),
        ):
            loss = objective.loss_sum(forward, batch) / label_count
            step_loss += loss.detach()
            last = index == len(micro_batches) - 1
            penalty = step_hook.penalty() if step_hook is not None and last else None
            if penalty is not None:  # once per step; the processes' copies average to one
                loss = loss + penalty / env.world_size
            # DDP and FSDP average gradients over processes; the loss is already global.
            (loss * env.world_size).backward()
        tokens = _input_tokens(batch)
        input_tokens += tokens
        flops += tokens * (dense_flops + attention_flops * batch["input_ids"].shape[1])
    grad_norm = torch.nn.utils.clip_grad_norm_(forward.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    if step_hook is not None:
        step_hook.after_step(step)
    optimizer.zero_grad(set_to_none=True)
    totals = distributed.all_reduce_sum(
        torch.tensor([input_tokens, flops], dtype=torch.float64, device=device)
    )
    loss_value = float(distributed.all_reduce_sum(step_loss))
    sums = objective.take_metric_sums()
    extra = {}
    if sums:
        names = sorted(sums)
        own = [isinstance(sums[n], tuple) for n in names]  # (sum, count) pairs

        def as_f64(value: torch.Tensor | float) -> torch.Tensor:
            return torch.as_tensor(value).to(device, torch.float64)

        values = torch.stack(
            [as_f64(sums[n][0] if o else sums[n]) for n, o in zip(names, own, strict=True)]
        )
        counts = torch.stack(
            [as_f64(sums[n][1] if o else 0.0) for n, o in zip(names, own, strict=True)]
        )
        summed, counted = distributed.all_reduce_sum(torch.stack([values, counts]))
        counted = torch.where(torch.tensor(own, device=device), counted, label_count.double())
        averaged = (summed / counted).tolist()
        extra = dict(zip(names, averaged, strict=True))
    return loss_value, float(grad_norm), float(totals[0]), float(totals[1]), extra


def _evaluate(
    evaluate: EvalFn, forward: torch.nn.Module, device: torch.device, hardware: HardwareConfig
) -> tuple[float, dict[str, float]]:
    """Validate in the training precision. Every rank then holds rank 0's values: "best",
    early stopping and the collective saves they trigger are decided once, so ranks whose
    losses differ in the last bit never split at a collective."""
    with autocast(device, hardware.precision):
        result = evaluate(forward)
    if isinstance(result, Mapping):
        loss, extra = float(result["loss"]), {k: float(v) for k, v in result.items() if k != "loss"}
    else:
        loss, extra = float(result), {}
    return distributed.broadcast_object((loss, extra))


def _input_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
