"""The CUDA and cluster code paths, checked on a CPU: each test here failed before the fix it
guards (a GPU checks the rest: tests/test_gpu.py through `make test-gpu`)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lmpipe.data.batches import window_batches
from lmpipe.runs.config import HardwareConfig, OptimConfig, TrainConfig
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training import distributed
from lmpipe.training import loop as train_module
from lmpipe.training.checkpoint import Checkpoints, rng_state, set_rng_state
from lmpipe.training.distributed import DistEnv
from lmpipe.training.loop import enable_tf32, peak_flops, peak_memory_gb, train
from tests.test_checkpoint import Crash, CrashingLogger
from tests.test_train import CPU, NullLogger, fresh_model

CAUSAL_LM = CausalLM()

TOKENS = (np.arange(4000, dtype=np.uint16) * 7) % 97


# --- process groups --------------------------------------------------------------------------


def without_nccl(spec: str) -> str:
    """A backend spec with gloo standing in for NCCL on the devices NCCL serves (CUDA only):
    the same device coverage, on a machine without NCCL."""
    parts = ["cuda:nccl" if part == "nccl" else part for part in spec.split(",")]
    return ",".join(parts).replace(":nccl", ":gloo")


@contextlib.contextmanager
def process_group(spec: str, directory: Path):
    dist.init_process_group(spec, store=dist.FileStore(str(directory / "store"), 1), rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_pure_nccl_group_cannot_carry_cpu_collectives(tmp_path: Path) -> None:
    """What multi-GPU training hit at step 1: the group serves CUDA tensors only."""
    no_cpu_backend = "No backend type associated with device type cpu"
    with (
        process_group(without_nccl("nccl"), tmp_path),
        pytest.raises(RuntimeError, match=no_cpu_backend),
    ):
        distributed.all_reduce_sum(torch.ones(2))


def test_the_cuda_group_carries_every_collective_of_the_loop_and_its_checkpoints(
    tmp_path: Path, tiny_tokenizer
) -> None:
    """The group lmpipe starts on CUDA serves the CPU tensors too (object broadcasts, RNG
    gathers, step counters on the CPU): a run saves, resumes and finishes in it."""
    assert distributed.BACKENDS["cuda"] != "nccl"
    cfg = TrainConfig(steps=4, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2,
                      optim=OptimConfig(lr=1e-3))  # fmt: skip
    checkpoints = Checkpoints(tmp_path / "ckpt", "group")

    def run(logger: NullLogger):
        return train(fresh_model(tiny_tokenizer), window_batches(TOKENS, 16, 2, 0), cfg,
                     HardwareConfig(), CPU, logger, lambda m: 1.0,
                     checkpoints=checkpoints, objective=CAUSAL_LM)  # fmt: skip

    with process_group(without_nccl(distributed.BACKENDS["cuda"]), tmp_path):
        with pytest.raises(Crash):
            run(CrashingLogger(at_step=3))  # killed after the step-2 checkpoint
        result = run(NullLogger())
    assert result.resumed_from == 2 and result.steps == 4


def test_init_asks_for_a_cpu_backend_beside_nccl_and_binds_the_tasks_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: dict[str, object] = {}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend)
    )
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.update(device=index))
    # A cluster that binds one GPU per task: each process sees one GPU, ordinal 0.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.init("cuda") == DistEnv(rank=3, world_size=4, local_rank=3)
    assert calls == {"backend": "cpu:gloo,cuda:nccl", "device": 0}


def test_cuda_device_index_by_local_rank_or_one_bound_gpu() -> None:
    assert distributed.cuda_device_index(2, 4) == 2
    assert distributed.cuda_device_index(5, 1) == 0
    with pytest.raises(RuntimeError, match="local rank 3 has no GPU of its own: 2 visible"):
        distributed.cuda_device_index(3, 2)


def test_slurm_tasks_keep_a_rendezvous_address_already_set() -> None:
    """submitit's export refused to run when MASTER_ADDR/MASTER_PORT were already set."""
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node1",
             "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "MASTER_ADDR": "head",
             "MASTER_PORT": "12345"}  # fmt: skip
    # patch.dict restores the whole environment: the export writes RANK, WORLD_SIZE, ...
    with mock.patch.dict(os.environ, slurm):
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(key, None)
        assert distributed.process_env() == DistEnv(rank=1, world_size=2, local_rank=1)
        assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "12345")
    assert "WORLD_SIZE" not in os.environ


def test_a_slurm_task_uses_the_cpus_it_was_given() -> None:
    """Two tasks on a 2-core node, one CPU each: torch's default (every core) would put two
    threads on each core. hardware.num_threads, when set, still wins."""
    from lmpipe.runs.config import HardwareConfig
    from lmpipe.training.loop import select_device

    before = torch.get_num_threads()
    try:
        with mock.patch.dict(os.environ, {"SLURM_CPUS_PER_TASK": "1"}):
            select_device(HardwareConfig(device="cpu"))
            assert torch.get_num_threads() == 1
            select_device(HardwareConfig(device="cpu", num_threads=2))
            assert torch.get_num_threads() == 2
        torch.set_num_threads(2)
        with mock.patch.dict(os.environ, {"SLURM_CPUS_PER_TASK": ""}):
            select_device(HardwareConfig(device="cpu"))
            assert torch.get_num_threads() == 2  # outside SLURM: left alone
    finally:
        torch.set_num_threads(before)


def test_fsdp_all_gathers_in_bf16_when_training_in_bf16(tmp_path: Path, tiny_tokenizer) -> None:
    with process_group("gloo", tmp_path):
        model = distributed.wrap_model(
            fresh_model(tiny_tokenizer), DistEnv(world_size=2), "fsdp", torch.bfloat16
        )
        policies = [m._get_fsdp_state()._mp_policy for m in [model, *model.model.layers]]
    assert all(p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32
               for p in policies)  # fmt: skip


# --- RNG -------------------------------------------------------------------------------------


class FakeCuda:
    """torch.cuda's RNG functions for `visible` GPUs, this process on `current`."""

    def __init__(self, visible: int, current: int) -> None:
        self.visible, self.current = visible, current
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(visible)}

    def index(self, device: int | str | torch.device) -> int:
        if not isinstance(device, int):
            device = torch.device(device).index
        index = self.current if device is None else device
        if not 0 <= index < self.visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(
            torch.cuda,
            "get_rng_state",
            lambda device="cuda": self.states[self.index(device)].clone(),
        )
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)

    def set_rng_state(self, state: torch.Tensor, device: int | str = "cuda") -> None:
        self.states[self.index(device)] = state.clone()


def test_resume_with_fewer_visible_gpus_restores_this_ranks_cuda_rng(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Saved by the rank on GPU 2 of 4, restored by a requeued job that sees one GPU."""
    saving = FakeCuda(visible=4, current=2)
    saving.install(monkeypatch)
    state = rng_state()
    restoring = FakeCuda(visible=1, current=0)
    restoring.install(monkeypatch)
    set_rng_state(state)
    assert torch.equal(restoring.states[0], torch.full((8,), 2, dtype=torch.uint8))


# --- MFU, memory, precision -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_flops_by_exact_gpu_name(name: str, peak: float | None, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert peak_flops(HardwareConfig(precision="bf16"), cuda) == peak
    assert peak_flops(HardwareConfig(precision="fp32"), cuda) is None  # no fp32 table
    assert peak_flops(HardwareConfig(precision="bf16", peak_flops=5e14), cuda) == 5e14


def test_unknown_device_logs_one_line_naming_the_setting_and_reports_no_mfu(
    tiny_model, caplog: pytest.LogCaptureFixture
) -> None:
    logger = NullLogger()
    with caplog.at_level(logging.INFO, logger="lmpipe.training.loop"):
        train(tiny_model, window_batches(TOKENS, 16, 2, 0), TrainConfig(steps=2, batch_size=2),
              HardwareConfig(), CPU, logger, objective=CAUSAL_LM)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "MFU" in r.getMessage()]
    assert len(lines) == 1 and "hardware.peak_flops" in lines[0]
    assert not any("mfu" in row for row, _, _ in logger.rows)


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="the peak RSS resets through Linux's /proc"
)
def test_each_training_reports_its_own_peak_memory(tiny_tokenizer) -> None:
    """Two trainings in one process (a sweep under the basic launcher): the second, small
    one does not report the first one's peak."""
    ballast_gb = 0.5

    def heavy_eval(model) -> float:
        ballast = torch.ones(int(ballast_gb * 2**30) // 4)  # touched: resident
        return float(ballast[-1])

    peaks = []
    for evaluate in (heavy_eval, None):
        logger = NullLogger()
        cfg = TrainConfig(steps=2, batch_size=2, log_every=1, eval_every=1)
        train(fresh_model(tiny_tokenizer), window_batches(TOKENS, 16, 2, 0), cfg,
              HardwareConfig(), CPU, logger, evaluate, objective=CAUSAL_LM)  # fmt: skip
        peaks.append(max(row["peak_memory_gb"] for row, _, s in logger.rows if s == "train"))
    assert peaks[1] < peaks[0] - ballast_gb / 2
    assert 0 < peaks[1] == pytest.approx(peak_memory_gb(CPU), abs=0.5)


def test_periodic_evaluation_runs_in_the_training_precision(
    tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    active = []

    @contextlib.contextmanager
    def recording_autocast(device, precision):
        active.append(precision)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(train_module, "autocast", recording_autocast)
    seen = []

    def evaluate(model) -> float:
        seen.append(list(active))
        return 1.0

    cfg = TrainConfig(steps=2, batch_size=2, eval_every=1)
    train(tiny_model, window_batches(TOKENS, 16, 2, 0), cfg, HardwareConfig(precision="bf16"),
          CPU, NullLogger(), evaluate, objective=CAUSAL_LM)  # fmt: skip
    assert seen == [["bf16"], ["bf16"]]


def test_bf16_on_cuda_enables_tf32_for_the_remaining_fp32_matmuls() -> None:
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        enable_tf32(CPU, "bf16")
        enable_tf32(torch.device("cuda"), "fp32")
        assert torch.get_float32_matmul_precision() == "highest"  # fp32 asked: full fp32
        enable_tf32(torch.device("cuda"), "bf16")
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
