"""The data stages' distributed engine: datatrove's executors run our steps as numbered tasks.

`clean.executor=local` runs the tasks in a process pool on this machine (`clean.workers`
at a time); `slurm` submits them as one job array per step and waits for it, so `dvc repro`
works unchanged from a login node. Either way a task is done when datatrove has written its
completion file: a rerun after an interruption skips the tasks already done. What a task
writes depends only on its rank and the number of tasks, never on where or beside what it
ran, which is what makes the outputs byte-identical for any executor and worker count.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dill
import pyarrow
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from lmpipe.runs.config import CleanConfig

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm")
# Lines of a failed task's log quoted in the error.
ERROR_LINES = 12
POLL_SECONDS = 2.0
# Less input than this runs in the stage's own process (with the local executor): starting
# a pool of workers would cost more than the work.
INLINE_BYTES = 32_000_000


class EngineError(RuntimeError):
    """Some tasks of a step failed; the message names them and quotes their errors."""


class _SlurmWithoutStatsJob(SlurmPipelineExecutor):
    """datatrove's SLURM executor, less its stats-merging job: that job waits for the array
    to succeed (afterok) and so would stay queued forever after a failure. The stage merges
    the task stats itself."""

    def launch_merge_stats(self) -> None:
        return None

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        # no partition: the cluster's default one (datatrove would write a bare --partition)
        args = super().get_sbatch_args(max_array)
        if not args.get("partition"):
            args.pop("partition", None)
        return args


def check_settings(settings: CleanConfig) -> None:
    if settings.executor not in EXECUTORS:
        raise ValueError(f"clean.executor={settings.executor!r}: expected one of {EXECUTORS}")


def run_step(
    name: str,
    steps: Sequence[PipelineStep],
    tasks: int,
    settings: CleanConfig,
    logging_dir: Path,
    inline: bool = False,
) -> None:
    """Run `steps` as tasks 0..tasks-1 on the configured executor and wait for all of them.
    `inline`: little work, so the local executor runs the tasks in this process, one after
    another (the same tasks, so the same output). Raises EngineError naming every failed
    task, with the end of its log."""
    check_settings(settings)
    logging_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    error: Exception | None = None
    if settings.executor == "local":
        error = _run_local(steps, tasks, 1 if inline else settings.workers, logging_dir)
    else:
        _run_slurm(name, steps, tasks, settings, logging_dir)
    incomplete = incomplete_tasks(logging_dir, tasks)
    if incomplete:
        raise EngineError(failure_message(name, incomplete, logging_dir)) from error
    log.info("%s: %d tasks done in %.1f s", name, tasks, time.perf_counter() - start)


def incomplete_tasks(logging_dir: Path, tasks: int) -> list[int]:
    return [r for r in range(tasks) if not (logging_dir / "completions" / f"{r:05d}").exists()]


def failure_message(name: str, incomplete: list[int], logging_dir: Path) -> str:
    """Tasks whose logs show an error failed; the other incomplete ones were stopped or never
    ran (a local pool stops at the first failure)."""
    failed = [r for r in incomplete if _errored(logging_dir, r)] or incomplete
    lines = [f"{name}: {len(failed)} task(s) failed: {', '.join(map(str, failed))}"]
    if len(incomplete) > len(failed):
        lines[0] += f" ({len(incomplete) - len(failed)} more did not finish)"
    for rank in failed[:5]:
        lines.append(f"--- task {rank} ({_task_log(logging_dir, rank) or 'no log'}):")
        lines.extend(_error_tail(logging_dir, rank))
    return "\n".join(lines)


# What a task's log (datatrove's loguru format) or its SLURM output shows when it failed.
_ERROR_MARKS = ("| ERROR", "Traceback (most recent call last)", "srun: error", "CANCELLED")


def _errored(logging_dir: Path, rank: int) -> bool:
    return any(
        any(mark in path.read_text(errors="replace") for mark in _ERROR_MARKS)
        for path in _task_logs(logging_dir, rank)
    )


def _task_logs(logging_dir: Path, rank: int) -> list[Path]:
    """The task's own log, then its SLURM output files."""
    own = [p for p in (_task_log(logging_dir, rank),) if p is not None]
    return own + sorted((logging_dir / "slurm_logs").glob(f"*_{rank}.out"))


def _task_log(logging_dir: Path, rank: int) -> Path | None:
    path = logging_dir / "logs" / f"task_{rank:05d}.log"
    return path if path.exists() else None


def _error_tail(logging_dir: Path, rank: int) -> list[str]:
    """The end of the task's own log, else of its SLURM output (a task that died before
    datatrove could log: killed, out of memory, a broken environment on the node)."""
    for path in _task_logs(logging_dir, rank):
        text = path.read_text(errors="replace").strip().splitlines()
        if text:
            return text[-ERROR_LINES:]
    return ["(no output)"]


def _run_local(
    steps: Sequence[PipelineStep], tasks: int, workers: int | None, logging_dir: Path
) -> Exception | None:
    """Run the tasks; the first task error, if any (the caller reports every failed task).

    One worker: the tasks run here, one after another. Several: datatrove's pool runs in a
    process of its own (`python -m lmpipe.data.engine`), forked into workers from there, so
    a worker holds the data libraries only, not what the stage process has loaded (MLflow,
    Hydra): it starts sooner and costs less memory per core."""
    workers = max(1, min(workers or os.cpu_count() or 1, tasks))
    executor = LocalPipelineExecutor(
        pipeline=list(steps),
        tasks=tasks,
        workers=workers,
        logging_dir=str(logging_dir),
        skip_completed=True,
        start_method="fork",  # from the small engine process, which has no threads yet
    )
    if workers == 1:
        for rank in executor.get_incomplete_ranks():
            try:
                executor._run_for_rank(rank)
            except Exception as exc:  # the task's log has it; the caller names the task
                return exc
        return None
    pickled = logging_dir / "executor.pik"
    with pickled.open("wb") as handle:
        dill.dump(executor, handle)
    pool = subprocess.run([sys.executable, "-m", "lmpipe.data.engine", str(pickled)], check=False)
    if pool.returncode != 0:
        return RuntimeError(f"the local executor exited with status {pool.returncode}")
    return None


def _run_slurm(
    name: str,
    steps: Sequence[PipelineStep],
    tasks: int,
    settings: CleanConfig,
    logging_dir: Path,
) -> None:
    slurm = settings.slurm
    sbatch_args: dict[str, Any] = dict(slurm.sbatch_args)
    if slurm.account:
        sbatch_args["account"] = slurm.account
    activate = Path(sys.prefix) / "bin" / "activate"
    executor = _SlurmWithoutStatsJob(
        pipeline=list(steps),
        tasks=tasks,
        time=slurm.time,
        partition=slurm.partition,
        cpus_per_task=slurm.cpus_per_task,
        mem_per_cpu_gb=slurm.mem_per_cpu_gb,
        workers=settings.workers or -1,
        job_name=f"lmpipe-{name.replace('/', '-')}",
        qos=slurm.qos,
        logging_dir=str(logging_dir),
        slurm_logs_folder=str(logging_dir / "slurm_logs"),
        skip_completed=True,
        # the nodes run this venv (the project must sit on a filesystem they share)
        venv_path=str(activate) if activate.exists() else None,
        sbatch_args=sbatch_args,
        max_array_size=slurm.max_array_size,
    )
    executor.run()
    job = executor.job_id
    if job in (None, -1):  # every task was already complete
        return
    log.info("%s: SLURM job %s submitted (%d tasks); waiting", name, job, tasks)
    wait_for_job(str(job))


def wait_for_job(job: str) -> None:
    """Block until no task of the SLURM job is pending or running."""
    while True:
        queued = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True
        )
        if queued.returncode != 0 and "Invalid job id" not in queued.stderr:
            raise EngineError(f"squeue -j {job} failed: {queued.stderr.strip()}")
        if not queued.stdout.strip():
            return
        time.sleep(POLL_SECONDS)


def main() -> None:
    """`python -m lmpipe.data.engine <executor.pik>`: run a pickled local executor's pool."""
    # Arrow's default mimalloc keeps the pages it freed for reuse, about 50 MB per worker
    # over a Parquet pass; the system allocator gives them back (measured on the write step).
    pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    with open(sys.argv[1], "rb") as handle:
        executor = dill.load(handle)
    executor.run()


if __name__ == "__main__":
    main()
