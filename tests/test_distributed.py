"""Several processes on CPU (gloo): DDP and FSDP2 through torchrun must train exactly what one
process does with the batch doubled, and gradient accumulation what one bigger batch does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, REPO, run

pytestmark = pytest.mark.distributed

WORKER = str(REPO / "tests" / "distributed_worker.py")


def train_tiny(
    out: Path, batch_size: int, processes: int = 1, *extra: str, check: bool = True
) -> dict | None:
    if processes == 1:
        cmd = [sys.executable, WORKER]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={processes}", WORKER]
    done = run([*cmd, str(out), "--batch-size", str(batch_size), *extra], REPO, check, timeout=120)
    if done.returncode != 0:
        return None
    result = json.loads((out / "result.json").read_text())
    result["weights"] = load_file(out / "weights.safetensors")
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train_tiny(tmp_path_factory.mktemp("single"), batch_size=4)


def assert_same_training(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a["tokens"] == b["tokens"]
    assert a["losses"] == pytest.approx(b["losses"], rel=rtol)
    assert a["weights"].keys() == b["weights"].keys()
    for name, tensor in a["weights"].items():
        torch.testing.assert_close(b["weights"][name], tensor, rtol=rtol, atol=atol)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_doubled_batch(
    strategy: str, single: dict, tmp_path: Path
) -> None:
    double = train_tiny(tmp_path, 2, 2, "--strategy", strategy)
    assert double["world_size"] == 2
    assert_same_training(single, double)


def test_two_processes_match_one_with_the_doubled_batch_of_preference_pairs(
    tmp_path: Path,
) -> None:
    """DPO: the loss and TRL's reward values are per pair, averaged over the global batch."""
    single_pairs = train_tiny(tmp_path / "one", 4, 1, "--objective", "preference")
    double_pairs = train_tiny(tmp_path / "two", 2, 2, "--objective", "preference")
    assert double_pairs["world_size"] == 2
    assert_same_training(single_pairs, double_pairs)
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected"]  # fmt: skip
    for one, two in zip(single_pairs["logged"], double_pairs["logged"], strict=True):
        for name in names:
            assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
    assert any(row["rewards/margins"] != 0 for row in single_pairs["logged"])
    # Step 1: policy = reference, every margin float noise, every pair a tie (counted half).
    assert single_pairs["logged"][0]["rewards/accuracies"] == pytest.approx(0.5)


def test_gradient_accumulation_matches_one_bigger_batch(single: dict, tmp_path: Path) -> None:
    accumulated = train_tiny(tmp_path, 2, 1, "--grad-accum", "2")
    assert_same_training(single, accumulated)


def test_training_actually_changed_the_weights(single: dict, tmp_path: Path) -> None:
    """Guards the comparisons above against a loop that does nothing."""
    untrained = train_tiny(tmp_path, 4, 1, "--steps", "1")
    differences = [
        (single["weights"][k] - untrained["weights"][k]).abs().max().item()
        for k in single["weights"]
    ]
    assert max(differences) > 1e-3


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_from_a_gathered_checkpoint(strategy: str, tmp_path: Path) -> None:
    """Killed after the step-2 checkpoint, restarted: the same weights as the uninterrupted
    run, with dropout on (each rank's RNG restored). Rank 0 alone reads the checkpoint."""
    common = ("--strategy", strategy, "--dropout", "0.1")
    straight = train_tiny(tmp_path / "straight", 2, 2, *common)
    args = (*common, "--checkpoints", str(tmp_path / "ckpt"))
    assert train_tiny(tmp_path / "a", 2, 2, *args, "--crash-at", "3", check=False) is None
    resumed = train_tiny(tmp_path / "b", 2, 2, *args)
    assert resumed["resumed_from"] == 2
    for name, tensor in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name


def test_rank_0_decides_the_best_step_for_every_rank(tmp_path: Path) -> None:
    """Ranks whose val losses disagree still take the collective `best` save together (a
    rank deciding alone would wait in it for ever: the run is given 2 minutes)."""
    done = train_tiny(tmp_path, 2, 2, "--strategy", "fsdp", "--skewed-eval",
                      "--checkpoints", str(tmp_path / "ckpt"))  # fmt: skip
    assert done["best_steps"] == [4, 4]


def test_adalora_under_fsdp2_is_refused_before_the_first_step(tmp_path: Path) -> None:
    """AdaLoRA's rank allocator ranks every singular value of the model against one budget,
    which FSDP2 shards (its penalty crashed on DTensors at step 1): both processes stop
    before training, naming the method, the key and the way out. DDP trains it."""
    done = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", WORKER,
                str(tmp_path / "fsdp"), "--batch-size", "2", "--strategy", "fsdp",
                "--peft", "adalora"], REPO, check=False, timeout=120)  # fmt: skip
    assert done.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: lmpipe.runs.config.ConfigError: AdaLora cannot train under " \
               "hardware.strategy=fsdp" in done.stderr, done.stderr[-3000:]  # fmt: skip
    assert "use hardware.strategy=ddp" in done.stderr
    assert "DTensor" not in done.stderr
    ddp = train_tiny(tmp_path / "ddp", 2, 2, "--strategy", "ddp", "--peft", "adalora")
    assert ddp["world_size"] == 2 and ddp["ranks"]


@pytest.fixture(scope="module")
def grpo_single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return train_tiny(tmp_path_factory.mktemp("grpo") / "one", 4, 1, "--objective", "grpo")


GRPO_VALUES = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
               "completions/clipped_ratio", "clip_ratio/region_mean"]  # fmt: skip


def test_grpo_on_two_processes_matches_one_with_the_doubled_batch(
    grpo_single: dict, tmp_path: Path
) -> None:
    """Each process samples the groups of its own problems (seeded per group): the same
    replies, loss, weights and TRL values as one process with the doubled batch."""
    double = train_tiny(tmp_path, 2, 2, "--objective", "grpo")
    assert double["world_size"] == 2
    assert grpo_single["tokens"] == double["tokens"]
    # At ratio 1 a group's advantages sum to 0: the loss is float noise around 0, so it is
    # compared in absolute terms; the gradients it carries are not noise (the weights).
    assert double["losses"] == pytest.approx(grpo_single["losses"], abs=1e-6)
    for name, tensor in grpo_single["weights"].items():
        torch.testing.assert_close(double["weights"][name], tensor, rtol=1e-5, atol=1e-6)
    for one, two in zip(grpo_single["logged"], double["logged"], strict=True):
        for name in GRPO_VALUES:
            assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
    rewards = [row["reward"] for row in grpo_single["logged"]]
    assert any(0 < r < 1 for r in rewards)  # groups with something to learn from
    assert all(row["grad_norm"] > 1e-3 for row in grpo_single["logged"])


def test_grpo_resumed_after_sigkill_equals_the_uninterrupted_run(
    grpo_single: dict, tmp_path: Path
) -> None:
    """Killed at step 3 (its checkpoint of step 2 on disk) and rerun: the replies sampled
    after the resume are the uninterrupted run's, and so are the weights."""
    import signal

    command = [sys.executable, WORKER, str(tmp_path / "out"), "--batch-size", "4",
               "--objective", "grpo", "--checkpoints", str(tmp_path / "checkpoints")]  # fmt: skip
    killed = run([*command, "--sigkill-at", "3"], REPO, check=False, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train_tiny(tmp_path / "out", 4, 1, "--objective", "grpo", "--checkpoints",
                         str(tmp_path / "checkpoints"))  # fmt: skip
    assert resumed["resumed_from"] == 2
    for name, tensor in grpo_single["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name
