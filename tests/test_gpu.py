"""On CUDA GPUs (the GPU check, scripts/gpu_check.sh): what the CPU tests cannot show.
Skipped without a GPU in the ordinary suite; in the GPU check a skip is a failure, but for
what needs two GPUs on one. Throughput (bf16 and compile against eager fp32) is measured
by benchmarks/gpu_throughput.py, which the check runs after these.

- the 125M preset in bf16 with torch.compile trains and reports MFU against the GPU's known
  dense bf16 peak (an unknown GPU: no MFU, and this check skips naming the GPU);
- peak memory is per training: a small training after a big one reports its own peak;
- resume: compiled, where a resume that drops the optimizer state ends measurably
  elsewhere, and with dropout, where the CUDA RNG state must come back (likewise);
- 2 GPUs through torchrun, DDP and FSDP2, train what 1 GPU trains with the doubled batch;
- the pipeline up to the evaluate stage with `hardware=gpu` (bf16, compile; the int8
  variant scored on the CPU beside the GPU model): marked `stages`, it needs dvc and mlflow,
  which the lent GPU machine lacks (the check deselects it, saying so).

LMPIPE_GPU_CHECK_DEVICE=cpu runs these on the CPU: a dry run of the check's code, not a check
of the GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmpipe.data.batches import window_batches
from lmpipe.runs.config import HardwareConfig, ModelConfig, OptimConfig, TrainConfig
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training import checkpoint
from lmpipe.training.checkpoint import LAST, Checkpoints
from lmpipe.training.loop import PEAK_BF16_FLOPS, device_name, seed_everything, train
from lmpipe.training.model import build_model
from tests.conftest import REPO, copy_project, run
from tests.test_checkpoint import Crash, CrashingLogger
from tests.test_distributed import assert_same_training, train_tiny
from tests.test_train import NullLogger

CAUSAL_LM = CausalLM()

# The device the GPU checks run on: CUDA, or the CPU for a dry run of their code.
CUDA = torch.device(os.environ.get("LMPIPE_GPU_CHECK_DEVICE", "cuda"))
needs_gpu = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                               reason="needs a CUDA GPU")  # fmt: skip
pytestmark = [pytest.mark.gpu, needs_gpu]
two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"needs 2 GPUs; this machine has {torch.cuda.device_count()}",
)


def preset(name: str) -> ModelConfig:
    loaded = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded)
    return OmegaConf.to_object(merged)


def train_rows(logger: NullLogger) -> list[dict]:
    return [row for row, _, series in logger.rows if series == "train"]


def test_125m_bf16_compiled_trains_and_reports_mfu(tiny_tokenizer, tmp_path: Path) -> None:
    hardware = HardwareConfig(device=CUDA.type, precision="bf16", compile=True)
    tokens = np.random.default_rng(0).integers(0, len(tiny_tokenizer), 2_000_000, np.uint16)
    seed_everything(0)
    model = build_model(preset("llama-125m"), tiny_tokenizer)
    cfg = TrainConfig(steps=30, batch_size=8, log_every=5, checkpoint_every=20,
                      optim=OptimConfig(lr=1e-3, warmup_steps=5))  # fmt: skip
    logger = NullLogger()
    train(model, window_batches(tokens, 1024, 8, 0), cfg, hardware, CUDA, logger,
          checkpoints=Checkpoints(tmp_path, "gpu"), objective=CAUSAL_LM)  # fmt: skip
    rows = train_rows(logger)
    assert np.isfinite(rows[-1]["train_loss"]) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["peak_memory_gb"] > 0.5
    assert next(model.parameters()).dtype == torch.float32  # autocast, fp32 master weights
    rng = torch.load(tmp_path / LAST / "trainer.pt", weights_only=True)["rng"][0]
    assert CUDA.type != "cuda" or torch.is_tensor(rng["cuda"])
    name = device_name(CUDA)
    if name not in PEAK_BF16_FLOPS:
        pytest.skip(f"no dense bf16 peak known for {name!r} (set hardware.peak_flops): no MFU")
    assert all(0.01 < row["mfu"] < 1 for row in rows[1:])  # the first interval compiles


def test_each_training_reports_its_own_peak_memory(tiny_tokenizer) -> None:
    tokens = np.random.default_rng(2).integers(0, len(tiny_tokenizer), 500_000, np.uint16)
    peaks = []
    for batch_size in (64, 2):
        seed_everything(0)
        model = build_model(preset("tiny"), tiny_tokenizer)
        logger = NullLogger()
        cfg = TrainConfig(steps=2, batch_size=batch_size, log_every=1)
        train(model, window_batches(tokens, 256, batch_size, 0), cfg,
              HardwareConfig(device=CUDA.type, precision="bf16"), CUDA, logger,
              objective=CAUSAL_LM)  # fmt: skip
        peaks.append(max(row["peak_memory_gb"] for row in train_rows(logger)))
        del model
    assert CUDA.type != "cuda" or peaks[1] < peaks[0] / 2, peaks


def resume_run(tokenizer, tmp_path: Path, hardware: HardwareConfig, dropout: float = 0.0):
    """An uninterrupted run and one killed at step 6 and resumed from its step-4 checkpoint:
    the largest parameter difference between them."""
    tokens = np.random.default_rng(1).integers(0, len(tokenizer), 200_000, np.uint16)
    cfg = TrainConfig(steps=8, batch_size=4, log_every=1, checkpoint_every=4)

    def run_once(checkpoints: Checkpoints | None, logger: NullLogger):
        seed_everything(0)
        model = build_model(preset("tiny"), tokenizer)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = dropout
        train(model, window_batches(tokens, 256, 4, 0), cfg, hardware, CUDA, logger,
              checkpoints=checkpoints, objective=CAUSAL_LM)  # fmt: skip
        return model

    straight = run_once(None, NullLogger())
    checkpoints = Checkpoints(tmp_path, "gpu")
    with pytest.raises(Crash):
        run_once(checkpoints, CrashingLogger(at_step=6))
    assert checkpoints.resumable()["step"] == 4
    resumed = run_once(checkpoints, NullLogger())
    return max(
        (a - b).abs().max().item()
        for a, b in zip(straight.parameters(), resumed.parameters(), strict=True)
    )


def test_a_compiled_run_resumes_from_its_checkpoint(
    tiny_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled bf16 run resumed from its checkpoint ends where the uninterrupted run
    does; one whose resume drops the optimizer state (fresh Adam moments) does not."""
    hardware = HardwareConfig(device=CUDA.type, precision="bf16", compile=True)
    # GPU kernels may reduce in another order from run to run: close, not bitwise.
    resumed = resume_run(tiny_tokenizer, tmp_path / "resumed", hardware)
    monkeypatch.setattr(checkpoint, "set_optimizer_state_dict", lambda *a, **k: None)
    broken = resume_run(tiny_tokenizer, tmp_path / "broken", hardware)
    assert resumed < 1e-3 and broken > 10 * max(resumed, 1e-4), (resumed, broken)


def test_resume_with_dropout_restores_the_cuda_rng(
    tiny_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if CUDA.type != "cuda":
        pytest.skip("the CUDA RNG state: nothing to restore in a dry run on the CPU")
    hardware = HardwareConfig(device=CUDA.type, precision="bf16")
    restored = resume_run(tiny_tokenizer, tmp_path / "restored", hardware, dropout=0.1)
    set_rng_state = checkpoint.set_rng_state

    def without_cuda(state: dict) -> None:
        set_rng_state({k: v for k, v in state.items() if k != "cuda"})

    monkeypatch.setattr(checkpoint, "set_rng_state", without_cuda)
    skipped = resume_run(tiny_tokenizer, tmp_path / "skipped", hardware, dropout=0.1)
    assert restored < 1e-3 and skipped > 10 * max(restored, 1e-4), (restored, skipped)


@two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_gpus_match_one_with_the_doubled_batch(
    strategy: str, precision: str, tmp_path: Path
) -> None:
    gpu = ("--device", "cuda", "--precision", precision)
    single = train_tiny(tmp_path / "one", 4, 1, *gpu)
    double = train_tiny(tmp_path / "two", 2, 2, "--strategy", strategy, *gpu)
    assert double["world_size"] == 2
    # fp32: the same sums in another order; bf16: FSDP all-gathers bf16 copies of the weights.
    tolerance = {"fp32": (1e-4, 1e-5), "bf16": (5e-2, 5e-3)}[precision]
    assert_same_training(single, double, *tolerance)


@pytest.mark.stages
def test_pipeline_to_evaluate_on_gpu(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    run(["lmpipe", "params", "experiment=smoke", "hardware=gpu"], project)
    run(["git", "commit", "-qam", "gpu"], project)
    run(["dvc", "repro", "evaluate"], project, timeout=900)
    metrics = json.loads((project / "outputs" / "evaluate" / "metrics.json").read_text())
    for model in ("pretrained", "finetuned", "int8"):
        assert np.isfinite(metrics[f"{model}_sft_test_loss"]), model
    assert abs(metrics["int8_sft_test_loss_change"]) < 0.5
