"""Work the processes share (lmpipe.training.distributed.map_batches): SPIN generation and
verifier sampling, the reference's log-probs and selection scoring. Two gloo processes must
compute what one does, each doing half of it; an error on one must end both at once."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, run

pytestmark = pytest.mark.distributed

WORKER = str(REPO / "tests" / "sharded_worker.py")


def launch(out: Path, processes: int, *extra: str, check: bool = True):
    if processes == 1:
        cmd = [sys.executable, WORKER]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={processes}", WORKER]
    return run([*cmd, str(out), *extra], REPO, check, timeout=180)


def results(out: Path, rank: int) -> list:
    return json.loads((out / f"result-{rank}.json").read_text())


def test_two_processes_share_the_batches_and_both_return_all_results(tmp_path: Path) -> None:
    launch(tmp_path / "one", 1)
    launch(tmp_path / "two", 2)
    alone = results(tmp_path / "one", 0)
    both = [results(tmp_path / "two", rank) for rank in (0, 1)]
    assert [r["value"] for r in alone] == [x * x for x in range(20)]
    assert both[0] == both[1]  # every process holds every result, in order
    assert [r["value"] for r in both[0]] == [r["value"] for r in alone]
    # 7 batches of 3, dealt round robin: each process computed only its own
    calls = [json.loads((tmp_path / "two" / f"calls-{rank}.json").read_text()) for rank in (0, 1)]
    assert calls == [[0, 2, 4, 6], [1, 3, 5]]
    assert {r["batch"]: r["rank"] for r in both[0]} == {b: b % 2 for b in range(7)}


def test_an_error_on_one_process_ends_both_promptly_naming_it(tmp_path: Path) -> None:
    """Process 1 fails at its second batch while process 0 still has 18 batches of 0.2 s to
    go: both stop at that round (not after their work, nor at the group's 30 min timeout),
    and both name the error and the process it happened on."""
    start = time.monotonic()
    done = launch(tmp_path, 2, "--fail-rank", "1", "--items", "120", "--delay", "0.2",
                  check=False)  # fmt: skip
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    for rank in (0, 1):
        error = (tmp_path / f"error-{rank}.txt").read_text()
        assert "process 1 of 2" in error and "scorer broke on batch 3" in error, error
        assert not (tmp_path / f"result-{rank}.json").exists()
    calls = json.loads((tmp_path / "calls-0.json").read_text())
    assert calls == [0, 2], calls  # rank 0 stopped at the round of the failure


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Selection scores and sampled replies, by one process and by two (one launch each)."""
    out = tmp_path_factory.mktemp("scored")
    launch(out / "one", 1, "--scores", "--rollouts")
    launch(out / "two", 2, "--scores", "--rollouts")
    return out


def test_selection_scores_from_two_processes_equal_one(scored: Path) -> None:
    alone = results(scored / "one", 0)
    for rank in (0, 1):
        shared = results(scored / "two", rank)
        assert len(shared) == len(alone) == 37
        for a, b in zip(alone, shared, strict=True):
            assert a["conditional_loss"] == pytest.approx(b["conditional_loss"], rel=1e-6)
            assert a["response_loss"] == pytest.approx(b["response_loss"], rel=1e-6)
            assert a["embedding"] == pytest.approx(b["embedding"], rel=1e-5, abs=1e-6)


def test_rollouts_from_two_processes_equal_one(scored: Path) -> None:
    """Sampled replies are seeded per batch, so two processes draw exactly what one does,
    even where a batch splits a prompt's group across processes."""

    def drawn(run: str, rank: int) -> list:
        return json.loads((scored / run / f"rollouts-{rank}.json").read_text())

    alone = drawn("one", 0)
    assert len(alone) == 7 and all(len(group) == 3 for group in alone)
    assert len({tuple(reply[1]) for group in alone for reply in group}) > 7  # really sampled
    for rank in (0, 1):
        assert drawn("two", rank) == alone
