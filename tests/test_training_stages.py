"""The training stages as users run them: `dvc repro` after a SIGKILL, torchrun with two
processes, the submitit launcher, and a packaged GGUF model as the base."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import BIN, copy_project, hold_env, run, tool_env

pytestmark = pytest.mark.slow

PRETRAIN = "outputs/pretrain"
# The project's overrides, repeated by direct stage runs: with overrides a stage composes
# conf/ with them, as `dvc exp run -S` does.
PARAMS = ["experiment=smoke", "pretrain.steps=100", "pretrain.log_every=1",
          "pretrain.checkpoint_every=20", "pretrain.eval_every=50"]  # fmt: skip


def weights(project: Path, stage: str = "pretrain") -> dict[str, torch.Tensor]:
    return load_file(project / "outputs" / stage / "model" / "model.safetensors")


def runs(project: Path, stage: str) -> list[tuple[str, str]]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute(
            "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'lmpipe.stage' AND t.value = ? ORDER BY r.start_time",
            (stage,),
        ).fetchall()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smoke data cleaned and tokenized; pretrain long enough to be killed mid-way."""
    project = copy_project(tmp_path_factory.mktemp("train") / "project")
    run(["lmpipe", "params", *PARAMS], project)
    run(["git", "commit", "-qam", "params"], project)
    run(["dvc", "repro", "tokenize"], project, timeout=600)
    return project


def stored_steps(project: Path, run_id: str) -> list[int]:
    """The train_loss steps the run holds in MLflow, repeats included."""
    with sqlite3.connect(project / "mlflow.db") as db:
        rows = db.execute(
            "SELECT step FROM metrics WHERE run_uuid = ? AND key = 'train_loss' AND step >= 1 "
            "ORDER BY step", (run_id,)
        ).fetchall()  # fmt: skip
    return [step for (step,) in rows]


def kill_pretrain_when(project: Path, ready=None, force: bool = False, **hold: int) -> dict:
    """`dvc repro pretrain` (with `force`: `--force --single-item`, pretrain alone rerun),
    SIGKILLed (the whole process group) once `ready(state)` holds for the last checkpoint's
    state.json, or, with `hold` (after_checkpoint=N, after_step=N: tests/hold), once the
    training process holds there; returns the last checkpoint's state."""
    marker = project / "held-at"
    marker.unlink(missing_ok=True)
    process = subprocess.Popen(
        ["dvc", "repro", *(["--force", "--single-item"] if force else []), "pretrain"],
        cwd=project,
        env=hold_env(project, marker, **hold) if hold else tool_env(project),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    state_file = project / PRETRAIN / "checkpoints" / "last" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if hold and marker.exists():
            break
        with contextlib.suppress(OSError, ValueError, sqlite3.Error):
            if not hold and ready(json.loads(state_file.read_text())):
                break
        time.sleep(0.02)
    assert process.poll() is None, "pretrain ended before the moment to kill it came"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return json.loads(state_file.read_text())


def test_sigkill_mid_training_then_dvc_repro_resumes_to_identical_weights(project: Path):
    """Killed twice: right after a checkpoint, then in the middle of a checkpoint interval
    (each run held there, tests/instrument, so the kill lands where it should on any machine). The
    resumed run ends bit-identical and its MLflow history holds every step once (metric
    sending lags training, so at a kill the store may hold fewer steps than the checkpoint,
    or more)."""
    killed_at = kill_pretrain_when(project, after_checkpoint=40)
    assert killed_at["step"] == 40 and not killed_at.get("finished")
    assert not (project / PRETRAIN / "model").exists()  # killed before the end
    assert runs(project, "pretrain") == [(killed_at["run_id"], "RUNNING")]
    run_id = killed_at["run_id"]

    # Resumed from step 40, killed after step 70: 10 steps past the checkpoint of step 60.
    killed_again = kill_pretrain_when(project, after_step=70)
    assert killed_again["run_id"] == run_id and not killed_again.get("finished")
    assert killed_again["step"] == 60 and (project / "held-at").read_text() == "70"

    # --force reruns clean and tokenize too: they reproduce the same files, so the
    # checkpoint (keyed by its inputs' content, not by the upstream runs) still resumes
    run(["dvc", "repro", "--force", "pretrain"], project, timeout=600)
    record = json.loads((project / PRETRAIN / "run.json").read_text())
    assert record["run_id"] == killed_at["run_id"]  # the same MLflow run, continued
    assert runs(project, "pretrain") == [(killed_at["run_id"], "FINISHED")]
    metrics = json.loads((project / PRETRAIN / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 60 and metrics["steps"] == 100
    assert stored_steps(project, run_id) == list(range(1, 101))  # each step once
    curve = (project / PRETRAIN / "curves" / "train.csv").read_text().splitlines()
    assert len(curve) == 1 + 100  # the whole history, not just the resumed part
    resumed = weights(project)

    # uninterrupted (pretrain alone: clean and tokenize were just shown to reproduce)
    run(["dvc", "repro", "--force", "--single-item", "pretrain"], project, timeout=600)
    assert json.loads((project / PRETRAIN / "run.json").read_text())["run_id"] != record["run_id"]
    assert "resumed_from_step" not in json.loads((project / PRETRAIN / "metrics.json").read_text())
    straight = weights(project)
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name

    # a checkpoint another config replaces will never resume: its run ends KILLED
    abandoned = kill_pretrain_when(project, force=True, after_checkpoint=20)
    assert dict(runs(project, "pretrain"))[abandoned["run_id"]] == "RUNNING"
    run(["python", "-m", "stages.pretrain", *PARAMS, "pretrain.steps=4"], project)
    statuses = dict(runs(project, "pretrain"))
    assert statuses[abandoned["run_id"]] == "KILLED"
    assert list(statuses.values()).count("RUNNING") == 0


def metric_keys(project: Path, run_id: str) -> set[str]:
    with sqlite3.connect(project / "mlflow.db") as db:
        rows = db.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid = ?", (run_id,))
        return {key for (key,) in rows}


def test_torchrun_two_processes_match_one_with_the_doubled_batch(project: Path):
    """... and the training run carries MLflow's system metrics unless they are turned off."""
    common = [*PARAMS, "pretrain.steps=6", "pretrain.eval_every=3"]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m"]
    before = len(runs(project, "pretrain"))
    run([*torchrun, "stages.pretrain", "pretrain.batch_size=2", *common,
         "tracking.system_metrics_interval=0.1"], project, timeout=600)  # fmt: skip
    two = weights(project)
    assert len(runs(project, "pretrain")) == before + 1  # rank 0 alone tracks
    assert not [p for p in (project / PRETRAIN).iterdir() if p.name.startswith(".tmp-")]
    two_metrics = json.loads((project / PRETRAIN / "metrics.json").read_text())
    keys = metric_keys(project, runs(project, "pretrain")[-1][0])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys

    off = ["tracking.system_metrics=false", "tracking.system_metrics_interval=0.1"]
    run(["python", "-m", "stages.pretrain", "pretrain.batch_size=4", *common, *off], project)
    keys = metric_keys(project, runs(project, "pretrain")[-1][0])
    assert "train_loss" in keys and not any(key.startswith("system/") for key in keys)
    one = weights(project)
    one_metrics = json.loads((project / PRETRAIN / "metrics.json").read_text())
    assert two_metrics["tokens"] == one_metrics["tokens"]
    assert two_metrics["val_loss"] == pytest.approx(one_metrics["val_loss"], rel=1e-5)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-6)


def test_submitit_local_launcher_runs_the_stage_as_a_job(project: Path):
    before = len(runs(project, "pretrain"))
    result = run(
        ["python", "-m", "stages.pretrain", *PARAMS, "hardware.launcher=submitit_local",
         "pretrain.steps=4"], project, timeout=600,
    )  # fmt: skip
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    job_logs = list((project / "multirun" / "pretrain").glob("*/.submitit/*/*_0_log.*"))
    assert "stage pretrain done" in "".join(log.read_text() for log in job_logs)
    # A single launched job writes the DVC-tracked outputs, like a plain run.
    assert json.loads((project / PRETRAIN / "metrics.json").read_text())["steps"] == 4
    assert [status for _, status in runs(project, "pretrain")[before:]] == ["FINISHED"]


def test_slurm_launcher_config_reads_hardware_slurm(project: Path):
    """A group switch on the command line picks the launcher, with --cfg after the overrides."""
    result = run(
        ["python", "-m", "stages.pretrain", "experiment=smoke", "hardware=slurm",
         "hardware.slurm.partition=gpu-long", "--cfg", "all", "--resolve"], project,
    )  # fmt: skip
    launcher = result.stdout.split("\n  launcher:\n", 1)[1].split("\n  sweeper:", 1)[0]
    assert "SlurmLauncher" in launcher
    assert "partition: gpu-long" in launcher and "tasks_per_node: 8" in launcher
    # A stage that does not train asks for one task on one node with one GPU.
    result = run(["python", "-m", "stages.deploy", "experiment=smoke", "hardware=slurm",
                  "hardware.slurm.nodes=2", "--cfg", "all", "--resolve"], project)  # fmt: skip
    launcher = result.stdout.split("\n  launcher:\n", 1)[1].split("\n  sweeper:", 1)[0]
    assert "SlurmLauncher" in launcher
    for setting in ("nodes: 1", "tasks_per_node: 1", "gpus_per_node: 1"):
        assert f"    {setting}\n" in launcher, launcher


def test_packaged_smollm2_is_a_base_for_finetune(tmp_path: Path):
    """model.init_from=smollm2-135m: tokenize keeps SmolLM2's tokenizer, pretrain with 0 steps
    passes the dequantized GGUF weights through as safetensors, finetune trains on top (LoRA,
    merged into the saved weights: full fine-tuning's Adam state and checkpoints of a 135M
    model cost 15 s more here)."""
    project = copy_project(tmp_path / "project")
    run(["lmpipe", "params", "experiment=smoke", "model.init_from=smollm2-135m",
         "pretrain.steps=0", "finetune.steps=2", "finetune.eval_every=1",
         "finetune.batch_size=2", "finetune.final_weights=last", "finetune.peft.method=lora"],
        project)  # fmt: skip
    run(["git", "commit", "-qam", "smollm2 base"], project)
    run(["dvc", "repro", "finetune"], project, timeout=900)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(project / "outputs" / "tokenize" / "tokenizer")
    assert len(tokenizer) == 49152 and "{% generation %}" in tokenizer.chat_template
    index = json.loads((project / "outputs/tokenize/tokens/index.json").read_text())
    assert index["vocab_size"] == 49152
    base = weights(project, "pretrain")
    assert sum(t.numel() for t in base.values()) > 130e6  # SmolLM2-135M, tied embeddings
    pretrain = json.loads((project / PRETRAIN / "metrics.json").read_text())
    assert pretrain["steps"] == 0 and pretrain["val_loss"] < 6  # a trained model, not random
    finetune = json.loads((project / "outputs/finetune/metrics.json").read_text())
    assert finetune["steps"] == 2 and finetune["val_loss"] < 6
    tuned = weights(project, "finetune")
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
