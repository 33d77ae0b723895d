"""The shared training loop, optimizer grouping, model save/load and evaluation helpers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpipe.data.batches import sequential_windows, window_batches
from lmpipe.evaluation.lm_metrics import mean_loss, unigram_entropy
from lmpipe.feedback.rollouts import generate_replies
from lmpipe.runs.config import HardwareConfig, OptimConfig, TrainConfig
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training.loop import (
    build_optimizer,
    flops_per_token,
    peak_flops,
    seed_everything,
    select_device,
    train,
)
from lmpipe.training.model import load_model, save_model

CAUSAL_LM = CausalLM()

CPU = torch.device("cpu")


def fresh_model(tokenizer, attention_dropout: float = 0.0):
    """A 2-layer decoder; with `attention_dropout`, training draws from the RNG every step
    (so a resume that does not restore the RNG state ends elsewhere)."""
    from lmpipe.runs.config import ModelConfig
    from lmpipe.training.model import build_model

    seed_everything(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=64)  # fmt: skip
    model = build_model(cfg, tokenizer)
    model.config.attention_dropout = attention_dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = attention_dropout
    return model


class NullLogger(MetricLogger):
    """Collects rows without an MLflow run (and keeps MetricLogger's own history)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.rows: list[tuple[dict, int, str]] = []

    def log(self, metrics, step, series="train") -> None:
        self.rows.append((dict(metrics), step, series))
        super().log(metrics, step, series)


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
        tiny_model, window_batches(pattern, 32, 8, seed=0), cfg, HardwareConfig(), device,
        logger, val_loss, objective=CAUSAL_LM
    )  # fmt: skip
    assert result.val_loss < before / 3
    assert [step for _, step, series in logger.rows if series == "val"] == [30, 60]
    lrs = [row["lr"] for row, _, series in logger.rows if series == "train"]
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3, rel=1e-3)


def test_step_metrics_include_throughput_mfu_and_memory(tiny_model) -> None:
    tokens = np.arange(2000, dtype=np.uint16) % 50
    logger = NullLogger()
    cfg = TrainConfig(steps=4, batch_size=2, log_every=2)
    hardware = HardwareConfig(peak_flops=1e12)
    train(
        tiny_model,
        window_batches(tokens, 16, 2, 0),
        cfg,
        hardware,
        CPU,
        logger,
        objective=CAUSAL_LM,
    )
    rows = [(row, step) for row, step, series in logger.rows if series == "train"]
    assert [step for _, step in rows] == [2, 4]
    for row, _ in rows:
        assert {"train_loss", "lr", "grad_norm", "tokens_per_second", "mfu"} <= set(row)
        assert row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1
        assert row["peak_memory_gb"] > 0.05  # this process's peak RSS


def test_flops_per_token_is_six_per_weight_plus_attention(tiny_model) -> None:
    config = tiny_model.config
    weights = sum(p.numel() for p in tiny_model.parameters())  # tied: the embedding once
    attention = 12 * config.num_hidden_layers * config.hidden_size * 64
    assert flops_per_token(tiny_model, 64) == 6 * weights + attention


def test_mfu_is_off_without_a_known_peak() -> None:
    assert peak_flops(HardwareConfig(), CPU) is None
    assert peak_flops(HardwareConfig(peak_flops=2e12), CPU) == 2e12


def test_diverging_training_stops_with_a_clear_error(tiny_model) -> None:
    tokens = np.arange(200, dtype=np.uint16) % 50
    cfg = TrainConfig(steps=3, batch_size=2, optim=OptimConfig(lr=float("inf"), warmup_steps=0))
    with pytest.raises(FloatingPointError, match="lower the lr"):
        train(
            tiny_model,
            window_batches(tokens, 16, 2, 0),
            cfg,
            HardwareConfig(),
            CPU,
            NullLogger(),
            objective=CAUSAL_LM,
        )


def test_gradient_checkpointing_trains_the_same_weights(tiny_tokenizer) -> None:
    tokens = np.arange(3000, dtype=np.uint16) % 60
    cfg = TrainConfig(steps=3, batch_size=2)
    weights = []
    for checkpointing in (False, True):
        model = fresh_model(tiny_tokenizer)
        hardware = HardwareConfig(gradient_checkpointing=checkpointing)
        train(
            model,
            window_batches(tokens, 16, 2, 0),
            cfg,
            hardware,
            CPU,
            NullLogger(),
            objective=CAUSAL_LM,
        )
        # transformers 5.17 (the floor) names it is_gradient_checkpointing
        on = getattr(model, "is_activation_checkpointing", None)
        assert (model.is_gradient_checkpointing if on is None else on) == checkpointing
        weights.append(model.state_dict())
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor)


def test_window_batches_split_a_global_batch_across_processes() -> None:
    tokens = np.arange(64 * 8, dtype=np.uint16)
    whole = window_batches(tokens, 8, 4, seed=5)
    halves = [window_batches(tokens, 8, 2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):  # crosses an epoch boundary (16 windows per epoch)
        joined = torch.cat([next(h)["input_ids"] for h in halves])
        torch.testing.assert_close(next(whole)["input_ids"], joined)


def test_batches_resume_from_a_position() -> None:
    tokens = np.arange(64 * 8, dtype=np.uint16)
    straight = window_batches(tokens, 8, 4, seed=5)
    expected = [next(straight)["input_ids"] for _ in range(9)]
    resumed = window_batches(tokens, 8, 4, seed=5)
    resumed.position = 6
    for want in expected[6:]:
        torch.testing.assert_close(next(resumed)["input_ids"], want)
    epochs = {tuple(sorted(straight.indices(p) + straight.indices(p + 1))) for p in (0, 2)}
    assert len(epochs) == 2  # a fresh permutation each epoch


def test_too_little_data_for_one_global_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="fewer than one global batch"):
        window_batches(np.arange(100, dtype=np.uint16), 16, 4, seed=0, world_size=2)


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


def test_init_from_sources_resolve_or_fail_clearly(tmp_path: Path) -> None:
    from lmpipe.data.pretrained import resolve_source

    packaged = resolve_source("smollm2-135m")
    assert packaged.gguf_file.endswith(".gguf")
    assert (Path(packaged.path) / packaged.gguf_file).is_file()
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").path == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="not a transformers model directory"):
        resolve_source(str(tmp_path))


def test_init_from_with_a_foreign_tokenizer_is_refused(tmp_path: Path, tiny_model) -> None:
    from lmpipe.runs.config import ModelConfig
    from lmpipe.training.model import build_model

    class BiggerVocabulary:  # all build_model asks before refusing
        def __len__(self) -> int:
            return 10_000

    tiny_model.save_pretrained(tmp_path)  # a base with a 400-token vocabulary
    with pytest.raises(ValueError, match="tokenize with the base model's tokenizer"):
        build_model(ModelConfig(init_from=str(tmp_path)), BiggerVocabulary())
