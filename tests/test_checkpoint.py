"""Checkpoints: exact resume, fingerprints, best weights and early stopping, atomic writes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lmpipe.data.batches import window_batches
from lmpipe.runs.config import HardwareConfig, OptimConfig, TrainConfig
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training.checkpoint import BEST, LAST, Checkpoints
from lmpipe.training.loop import train
from tests.test_train import CPU, NullLogger, fresh_model

CAUSAL_LM = CausalLM()

TOKENS = (np.arange(6000, dtype=np.uint16) * 7) % 97
CFG = TrainConfig(
    steps=10, batch_size=4, checkpoint_every=3, eval_every=5,
    optim=OptimConfig(lr=5e-3, warmup_steps=2),
)  # fmt: skip


class Crash(Exception):
    pass


class CrashingLogger(NullLogger):
    """Dies while logging `at_step`, like a process killed mid-run."""

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step

    def log(self, metrics, step, series="train") -> None:
        if step == self.at_step:
            raise Crash
        super().log(metrics, step, series)


def run(tokenizer, checkpoints: Checkpoints | None, logger=None, cfg: TrainConfig = CFG):
    model = fresh_model(tokenizer, attention_dropout=0.1)  # resume must restore the RNG
    logger = logger or NullLogger()

    @torch.no_grad()
    def evaluate(m) -> float:
        ids = torch.tensor([[1, 2, 3, 4]])
        return float(m(input_ids=ids, labels=ids).loss)

    result = train(
        model, window_batches(TOKENS, 16, cfg.batch_size, seed=3), cfg, HardwareConfig(), CPU,
        logger, evaluate, checkpoints=checkpoints, run_id="run-1", objective=CAUSAL_LM
    )  # fmt: skip
    return model, result, logger


def assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_an_interrupted_run_resumes_to_bit_identical_weights(tmp_path: Path, tiny_tokenizer):
    straight, straight_result, _ = run(tiny_tokenizer, None)
    checkpoints = Checkpoints(tmp_path / "ckpt", "config-a")
    with pytest.raises(Crash):
        run(tiny_tokenizer, checkpoints, CrashingLogger(at_step=8))
    state = checkpoints.resumable()
    assert state["step"] == 6 and state["run_id"] == "run-1" and not state.get("finished")

    resumed, result, logger = run(tiny_tokenizer, checkpoints)
    assert result.resumed_from == 6 and result.steps == 10
    assert_identical(straight, resumed)
    assert result.train_loss == straight_result.train_loss
    assert result.tokens == straight_result.tokens
    # The logged history is whole: steps 1-6 from the checkpoint, 7-10 from the rerun.
    steps = [row["step"] for row in logger.state_dict()["train"]]
    assert steps == list(range(1, 11))
    assert checkpoints.state(LAST)["finished"] and checkpoints.resumable() is None


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path: Path, tiny_tokenizer):
    with pytest.raises(Crash):
        run(tiny_tokenizer, Checkpoints(tmp_path, "config-a"), CrashingLogger(at_step=5))
    other = Checkpoints(tmp_path, "config-b")
    assert other.resumable() is None
    _, result, _ = run(tiny_tokenizer, other)
    assert result.resumed_from is None and other.state(LAST)["fingerprint"] == "config-b"


def test_early_stopping_keeps_the_best_weights(tmp_path: Path, tiny_tokenizer):
    losses = iter([3.0, 2.0, 2.5, 2.4, 2.6, 1.0])
    cfg = TrainConfig(
        steps=30, batch_size=4, eval_every=2, checkpoint_every=100, final_weights="best",
        early_stopping_patience=3, optim=OptimConfig(lr=5e-3),
    )  # fmt: skip
    checkpoints = Checkpoints(tmp_path, "es")
    model = fresh_model(tiny_tokenizer)
    result = train(
        model, window_batches(TOKENS, 16, 4, seed=3), cfg, HardwareConfig(), CPU, NullLogger(),
        lambda m: next(losses), checkpoints=checkpoints, objective=CAUSAL_LM
    )  # fmt: skip
    assert result.stopped_early and result.steps == 10  # evals at 2..10: 3 without gain after 4
    assert result.best_step == 4 and result.best_val_loss == 2.0
    assert checkpoints.state(BEST)["step"] == 4
    best = fresh_model(tiny_tokenizer)
    Checkpoints(tmp_path, "es").load(BEST, best)
    assert_identical(best, model)


def test_best_weights_without_checkpoints_are_kept_in_memory(tiny_tokenizer):
    losses = iter([2.0, 3.0])
    cfg = TrainConfig(steps=4, batch_size=4, eval_every=2, final_weights="best")
    model = fresh_model(tiny_tokenizer)
    snapshot = {}

    def evaluate(m) -> float:
        snapshot.setdefault("first", {k: v.clone() for k, v in m.state_dict().items()})
        return next(losses)

    result = train(model, window_batches(TOKENS, 16, 4, 3), cfg, HardwareConfig(), CPU,
                   NullLogger(), evaluate, objective=CAUSAL_LM)  # fmt: skip
    assert result.best_step == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, snapshot["first"][name])


def test_a_kill_between_the_renames_leaves_the_previous_checkpoint(tmp_path, tiny_tokenizer):
    checkpoints = Checkpoints(tmp_path, "config-a")
    with pytest.raises(Crash):
        run(tiny_tokenizer, checkpoints, CrashingLogger(at_step=5))
    # The state _replace is in after moving `last` aside and before renaming the new one in.
    (tmp_path / LAST).rename(tmp_path / f".old-0123abcd-{LAST}")
    (tmp_path / f".tmp-89abcdef-{LAST}").mkdir()
    state = checkpoints.resumable()
    assert state is not None and state["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST]


def test_checkpoint_missing_weights_is_an_error(tmp_path: Path, tiny_tokenizer):
    model = fresh_model(tiny_tokenizer)
    Checkpoints(tmp_path, "x").save(LAST, model, {"step": 1})
    from safetensors.torch import load_file, save_file

    path = tmp_path / LAST / "model.safetensors"
    weights = load_file(path)
    weights.pop("model.norm.weight")
    save_file(weights, path)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        Checkpoints(tmp_path, "x").load(LAST, fresh_model(tiny_tokenizer))


class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_trainer_state_is_never_unpickled_beyond_tensors(tmp_path: Path, tiny_tokenizer):
    model = fresh_model(tiny_tokenizer)
    Checkpoints(tmp_path, "x").save(LAST, model, {"step": 1}, trainer={"position": 1})
    torch.save({"position": Payload()}, tmp_path / LAST / "trainer.pt")
    with pytest.raises(pickle.UnpicklingError):
        Checkpoints(tmp_path, "x").load(LAST, fresh_model(tiny_tokenizer))


def test_state_json_records_fingerprint_and_process_count(tmp_path: Path, tiny_tokenizer):
    Checkpoints(tmp_path, "abc").save(LAST, fresh_model(tiny_tokenizer), {"step": 2})
    state = json.loads((tmp_path / LAST / "state.json").read_text())
    assert state == {"fingerprint": "abc", "step": 2, "world_size": 1}
