"""Who this process is among a run's processes (rank, world size), from the environment that
torchrun or SLURM set: torch-free, so that stages that train nothing need not import torch."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process logs to MLflow and writes outputs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _export_slurm_env() -> None:
    """Inside a SLURM job of several tasks, set torchrun's variables from SLURM's.

    A rendezvous address or port already in the environment (set by the user's job script
    or the cluster) is kept: submitit's export would refuse to run over them.
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    slurm = TorchDistributedEnvironment()  # reads MASTER_PORT itself when it is set
    slurm.master_addr = os.environ.get("MASTER_ADDR", slurm.master_addr)
    slurm.export(set_cuda_visible_devices=False, overwrite=True)


def process_env() -> DistEnv:
    """The rank and world size this process was started with (1 process if none)."""
    _export_slurm_env()
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def allotted_cpus() -> int | None:
    """The CPUs a SLURM task was given (SLURM_CPUS_PER_TASK), None outside one: torch's default
    is every core of the node, which oversubscribes it when tasks share the node."""
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else None
