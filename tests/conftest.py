"""Shared fixtures: an isolated MLflow store per test, tiny tokenizers/models, project copies."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def threads_per_worker() -> int:
    """An equal share of this machine's cores for each xdist worker, the stage processes it
    starts included (they inherit OMP_NUM_THREADS). torch's default, every core in every
    process, oversubscribes: on CI's 2 cores with 2 workers, tests/test_encoders.py and
    tests/test_training_stages.py took 270 s with it and 205 s with one thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // workers)


# In each xdist worker, before torch is imported there (the controller runs no tests and
# sets nothing: its workers would inherit it); a value set by the caller is kept.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker()))

# Ordinary prose, long enough for the word and repetition rules and for MinHash.
PROSE = (
    "The committee met on Tuesday to review the budget for the coming year. Members raised "
    "questions about road repairs, school funding and the new library, and agreed to publish "
    "a summary of the discussion before the next meeting in the spring."
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """In the GPU check (LMPIPE_GPU_CHECK=1, scripts/gpu_check.sh) a GPU test that skips
    fails, saying why: a check that did not run proved nothing. Only what needs more GPUs
    than the machine has may skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("LMPIPE_GPU_CHECK") == "1" and report.skipped and "gpu" in item.keywords:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        if "GPUs; this machine has" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped in the GPU check, which counts as a failure: {reason}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with the most slow or distributed tests first, each module's tests in their
    order. xdist (`--dist loadfile --no-loadscope-reorder`) hands whole modules to workers in
    this order: the longest start at once, instead of arriving last (xdist's own order puts
    the modules with the most tests first) at one worker while the other idles."""
    heavy = Counter(item.path for item in items if {"slow", "distributed"} & set(item.keywords))
    first_seen = {path: index for index, path in enumerate(dict.fromkeys(i.path for i in items))}
    items.sort(key=lambda item: (-heavy[item.path], first_seen[item.path]))


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file in a directory: equal dicts mean byte-identical outputs."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private SQLite store (and outbox), so tests never touch the project's mlflow.db."""
    import mlflow

    from lmpipe.runs import outbox, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setattr(tracking, "store_root", lambda: tmp_path)
    mlflow.set_tracking_uri(uri)
    outbox.reset()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    outbox.reset()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from lmpipe.data.tokenizer import load_tokenizer, train_tokenizer

    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "What is AI? Artificial intelligence is the study of thinking machines.",
        "Hello, how are you today? I am fine, thank you.",
        "The state of the union is strong, said the president to the congress.",
    ] * 50
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=400).save_pretrained(path)
    return load_tokenizer(path)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from lmpipe.runs.config import ModelConfig
    from lmpipe.training.loop import seed_everything
    from lmpipe.training.model import build_model

    seed_everything(0)
    cfg = ModelConfig(
        preset="test",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=64,
        max_seq_len=64,
    )
    return build_model(cfg, tiny_tokenizer)


@pytest.fixture
def saved_model(tiny_model, tiny_tokenizer, tmp_path: Path) -> Path:
    """tiny_model and its tokenizer saved as a model directory (a task's starting model)."""
    from lmpipe.training.model import save_model

    save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    return tmp_path / "model"


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files: the project as a fresh clone would have it."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in out.stdout.splitlines() if (REPO / line).is_file()]


def tool_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Test-only instruments of stage processes (tests/instrument/sitecustomize.py), on PYTHONPATH.
INSTRUMENT = Path(__file__).parent / "instrument"


def hold_env(project: Path, marker: Path, **hold: int) -> dict[str, str]:
    """tool_env with a training process set to hold (after_checkpoint=N and/or after_step=N,
    tests/instrument/lmpipe_hold.py), writing the step it holds at to `marker`."""
    env = tool_env(project)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(INSTRUMENT), env.get("PYTHONPATH")]))
    env["LMPIPE_HOLD_MARKER"] = str(marker)
    env |= {f"LMPIPE_HOLD_{name.upper()}": str(step) for name, step in hold.items()}
    return env


def run(
    cmd: list[str], project: Path, check: bool = True, env: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, cwd=project, env=env or tool_env(project), capture_output=True, text=True, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def copy_project(dest: Path) -> Path:
    """The repository copied into a fresh git repo (DVC experiments need git)."""
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@lmpipe.local"],
        ["git", "config", "user.name", "lmpipe test"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "copy"],
    ):
        run(cmd, dest)
    return dest


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")
