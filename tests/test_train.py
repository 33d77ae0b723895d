"""The shared training loop, optimizer grouping, model save/load and evaluation helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpipe.config import HardwareConfig, OptimConfig, TrainConfig
from lmpipe.data.batches import random_windows, sequential_windows
from lmpipe.evaluate import generate_replies, mean_loss, unigram_entropy
from lmpipe.model import load_model, save_model
from lmpipe.tracking import MetricLogger
from lmpipe.train import build_optimizer, select_device, train


class NullLogger(MetricLogger):
    """Collects rows without an MLflow run."""

    def __init__(self) -> None:
        self.rows: list[tuple[dict, int, str]] = []

    def log(self, metrics, step, series="train") -> None:
        self.rows.append((dict(metrics), step, series))


def test_no_weight_decay_on_norms_biases_and_embeddings(tiny_model) -> None:
    optimizer = build_optimizer(tiny_model, OptimConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    embedding = tiny_model.get_input_embeddings().weight
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"])
    assert any(p is embedding for p in plain["params"])
    assert all(p is not embedding for p in decayed["params"])


def test_training_learns_a_repeating_sequence(tiny_model) -> None:
    pattern = np.tile(np.arange(10, 40, dtype=np.uint16), 200)
    cfg = TrainConfig(
        steps=60, batch_size=8, eval_every=30, optim=OptimConfig(lr=1e-2, warmup_steps=4)
    )
    logger = NullLogger()
    device = torch.device("cpu")

    def val_loss(model) -> float:
        return mean_loss(model, sequential_windows(pattern, 8, 32, 1024), device)[0]

    before = val_loss(tiny_model)
    result = train(
        tiny_model,
        random_windows(pattern, 8, 32, torch.Generator().manual_seed(0)),
        cfg,
        device,
        HardwareConfig(),
        logger,
        val_loss,
    )
    assert result.val_loss < before / 3
    assert [step for _, step, series in logger.rows if series == "val"] == [30, 60]
    lrs = [row["lr"] for row, _, series in logger.rows if series == "train"]
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3, rel=1e-3)


def test_diverging_training_stops_with_a_clear_error(tiny_model) -> None:
    tokens = np.arange(200, dtype=np.uint16) % 50
    batches = random_windows(tokens, 2, 16, torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=3, batch_size=2, optim=OptimConfig(lr=float("inf"), warmup_steps=0))
    with pytest.raises(FloatingPointError, match="lower the lr"):
        train(tiny_model, batches, cfg, torch.device("cpu"), HardwareConfig(), NullLogger())


def test_saved_model_loads_with_auto_classes(tmp_path: Path, tiny_model, tiny_tokenizer) -> None:
    save_model(tiny_model, tiny_tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(loaded(ids).logits, tiny_model(ids).logits)
    assert load_model(tmp_path).config.vocab_size == len(tiny_tokenizer)


def test_mean_loss_matches_the_models_own_loss(tiny_model) -> None:
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    loss, count = mean_loss(tiny_model, [{"input_ids": ids, "labels": ids}], torch.device("cpu"))
    assert count == 2 * 15
    assert loss == pytest.approx(tiny_model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)


def test_unigram_entropy_of_uniform_tokens_is_log_vocab() -> None:
    tokens = np.tile(np.arange(64), 10)
    assert unigram_entropy(tokens, 100) == pytest.approx(math.log(64))


def test_generation_returns_text_per_prompt(tiny_model, tiny_tokenizer) -> None:
    replies = generate_replies(tiny_model, tiny_tokenizer, ["hi", "What is AI?"], max_new_tokens=4)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_cuda_request_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="hardware=cpu"):
        select_device(HardwareConfig(device="cuda"))
