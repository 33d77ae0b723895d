"""Several training processes through torch.distributed: who we are, wrapping, collectives.

Processes are started by torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) or by
SLURM through hydra-submitit-launcher (submitit exports the same variables); lmpipe never
starts them itself. One process is the plain, undistributed case: every helper here is then
a no-op, so the training loop has a single code path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from lmpipe.runs.processes import DistEnv, process_env  # re-exported: who this process is

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


# Process-group backends per training device. On CUDA, NCCL serves only CUDA tensors; gloo
# beside it serves the CPU tensors that object collectives and state-dict helpers use, so
# no collective ever lands on a device type without a backend.
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The GPU ordinal of this process: its local rank, or 0 where the cluster binds one GPU
    per task (each process then sees only its own GPU)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: {visible} visible "
            "(CUDA_VISIBLE_DEVICES); start one process per GPU, or bind one GPU per task"
        )
    return local_rank


def init(device_type: str) -> DistEnv:
    """Join the process group when there are several processes (BACKENDS)."""
    env = process_env()
    if not env.enabled or dist.is_initialized():
        return env
    if device_type == "cuda":
        torch.cuda.set_device(cuda_device_index(env.local_rank, torch.cuda.device_count()))
    backend = BACKENDS[device_type]
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    log.info("process %d of %d joined the %s group", env.rank, env.world_size, backend)
    return env


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: torch.nn.Module,
    env: DistEnv,
    strategy: str,
    compute_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` per decoder layer, then the root) for big models.

    FSDP2 with a `compute_dtype` (bf16) all-gathers the parameters in it and reduces
    gradients in fp32; the sharded master weights stay fp32.
    """
    if not env.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in transformer_layers(model):
            fully_shard(layer, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks of a transformers model, bottom first: a decoder's `layers`
    (LlamaDecoderLayer and friends), BERT's `encoder.layer`."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None and hasattr(base, "encoder"):
        layers = getattr(base.encoder, "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no list of transformer layers found")
    return layers


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP and torch.compile wrappers (FSDP2 wraps in place)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if hasattr(model, "no_sync") else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches but the last."""
    module = getattr(model, "_orig_mod", model)
    if enabled or not dist.is_initialized():
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardFailed(RuntimeError):
    """Work shared by the processes (`map_batches`) failed on one of them."""


def map_batches(
    fn: Callable[[int, Sequence[T]], Sequence[R]],
    items: Sequence[T],
    batch_size: int,
    what: str,
) -> list[R]:
    """`fn(index, batch)` over `items` in batches of `batch_size`, the batches dealt round
    robin over the processes; every process returns all the results, in the items' order.

    The batches are the same whatever the number of processes (so are their indices, which
    `fn` may seed with), so N processes compute what one does, about N times faster. After
    each round the processes exchange their status: an error on any of them ends all of
    them at that round (`ShardFailed`, naming the process and the error) instead of leaving
    the others waiting in a collective until the group's timeout.
    """
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if not dist.is_initialized():
        return [r for index, batch in enumerate(tqdm(batches, desc=what, unit="batch",
                                                     mininterval=2, leave=False))
                for r in _checked(fn, index, batch)]  # fmt: skip
    rank, world = dist.get_rank(), dist.get_world_size()
    mine: dict[int, Sequence[R]] = {}
    rounds = range(0, len(batches), world)
    for first in tqdm(rounds, desc=f"{what} ({world} processes)", unit="round", mininterval=2,
                      leave=False, disable=rank != 0):  # fmt: skip
        index, error = first + rank, None
        if index < len(batches):
            try:
                mine[index] = _checked(fn, index, batches[index])
            except Exception as exc:  # reported to every process below
                log.exception("%s: batch %d failed on process %d", what, index, rank)
                error = f"{type(exc).__name__}: {exc}"
        failed = [(r, e) for r, e in enumerate(all_gather_object(error)) if e is not None]
        if failed:
            who, message = failed[0]
            raise ShardFailed(f"{what} failed on process {who} of {world}: {message}")
    results: dict[int, Sequence[R]] = {}
    for part in all_gather_object(mine):
        results |= part
    return [r for index in range(len(batches)) for r in results[index]]


def _checked(fn: Callable[[int, Sequence[T]], Sequence[R]], index: int, batch: Sequence[T]):
    out = list(fn(index, batch))
    if len(out) != len(batch):
        raise ValueError(f"batch {index}: {len(out)} results for {len(batch)} items")
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, gathered from all processes (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
