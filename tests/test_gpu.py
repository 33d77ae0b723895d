"""On a CUDA GPU: the 125M preset with bf16 autocast and torch.compile trains, reports MFU
against the GPU's known peak, and resumes exactly from a checkpoint (CUDA RNG included).
Skipped without a GPU; throughput itself is measured by benchmarks/gpu_throughput.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmpipe.checkpoint import LAST, Checkpoints
from lmpipe.config import HardwareConfig, ModelConfig, OptimConfig, TrainConfig
from lmpipe.data.batches import window_batches
from lmpipe.model import build_model
from lmpipe.train import seed_everything, train
from tests.conftest import REPO
from tests.test_checkpoint import Crash, CrashingLogger
from tests.test_train import NullLogger

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def preset(name: str) -> ModelConfig:
    loaded = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded))


def test_125m_bf16_compiled_trains_and_reports_mfu(tiny_tokenizer, tmp_path: Path) -> None:
    device = torch.device("cuda")
    hardware = HardwareConfig(device="cuda", precision="bf16", compile=True)
    tokens = np.random.default_rng(0).integers(0, len(tiny_tokenizer), 2_000_000, np.uint16)
    seed_everything(0)
    model = build_model(preset("llama-125m"), tiny_tokenizer)
    cfg = TrainConfig(steps=30, batch_size=8, log_every=5, checkpoint_every=20,
                      optim=OptimConfig(lr=1e-3, warmup_steps=5))  # fmt: skip
    logger = NullLogger()
    checkpoints = Checkpoints(tmp_path, "gpu")
    result = train(model, window_batches(tokens, 1024, 8, 0), cfg, hardware, device, logger,
                   checkpoints=checkpoints)  # fmt: skip
    rows = [row for row, _, series in logger.rows if series == "train"]
    assert np.isfinite(result.train_loss) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(0 < row["mfu"] < 1 for row in rows)  # a known GPU: H100/H200/A100/...
    assert rows[-1]["peak_memory_gb"] > 0.5
    assert next(model.parameters()).dtype == torch.float32  # autocast, fp32 master weights
    assert "cuda" in torch.load(tmp_path / LAST / "trainer.pt", weights_only=True)["rng"][0]


def test_resume_on_gpu_continues_from_the_checkpoint(tiny_tokenizer, tmp_path: Path) -> None:
    device = torch.device("cuda")
    hardware = HardwareConfig(device="cuda", precision="bf16")
    tokens = np.random.default_rng(1).integers(0, len(tiny_tokenizer), 200_000, np.uint16)
    cfg = TrainConfig(steps=8, batch_size=4, checkpoint_every=4)

    def run(checkpoints: Checkpoints | None, logger: NullLogger):
        seed_everything(0)
        model = build_model(preset("tiny"), tiny_tokenizer)
        train(model, window_batches(tokens, 256, 4, 0), cfg, hardware, device, logger,
              checkpoints=checkpoints)  # fmt: skip
        return model

    straight = run(None, NullLogger())
    checkpoints = Checkpoints(tmp_path, "gpu")
    with pytest.raises(Crash):
        run(checkpoints, CrashingLogger(at_step=6))
    assert checkpoints.resumable()["step"] == 4
    resumed = run(checkpoints, NullLogger())
    # GPU kernels may reduce in a different order from run to run: close, not bitwise.
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
