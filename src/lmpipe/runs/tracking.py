"""MLflow bookkeeping: where the store is, one run per stage execution, params, metrics, lineage.

The store defaults to `sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts`.
`<project>` is `$DVC_ROOT` when DVC runs a queued experiment in a temporary copy, so every
experiment lands in the real project's store; `MLFLOW_TRACKING_URI` points elsewhere (a server).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import queue
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lmpipe.runs import lineage, outbox
from lmpipe.runs.config import find_project_root
from lmpipe.runs.lineage import TAG_STAGE

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
TAG_DVC_EXP = "lmpipe.dvc_exp"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value


def store_root() -> Path:
    """The project directory that owns the tracking store (DVC_ROOT under `dvc exp run`)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return find_project_root()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow at the project's store; returns the URI."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    # MLflow retries an unreachable server 7 times with growing backoff (minutes per call).
    # A stage waits ~15 s at most before it saves to the outbox; the env vars still win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return uri


def project_outbox() -> outbox.Outbox:
    """Where writes the store did not take are saved (next to the default store)."""
    return outbox.Outbox(store_root())


def replay_outbox() -> None:
    """Send what earlier runs could not; a store still down only leaves it saved."""
    saved = project_outbox()
    pending = saved.pending()
    if pending:
        log.info("sending %d saved run record(s) from %s", len(pending), saved.directory)
        saved.replay()


def send_or_save_metrics(run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    saved = project_outbox()
    outbox.send_or_save(
        f"{len(batch)} metric values",
        lambda: outbox.log_metrics(MlflowClient(), run_id, batch),
        lambda: saved.save_metrics(run_id, batch),
        saved.directory,
    )


def send_or_save_artifact(
    run_id: str, path: Path, artifact_path: str | None, send: Callable[[], None] | None = None
) -> None:
    """Log the file `path` as an artifact, or save it for replay. `send` replaces the plain
    upload (e.g. mlflow.log_table, which also tags the run), with the file as the fallback."""
    saved = project_outbox()
    outbox.send_or_save(
        f"artifact {path.name}",
        send or (lambda: MlflowClient().log_artifact(run_id, str(path), artifact_path)),
        lambda: saved.save_artifact(run_id, path, artifact_path),
        saved.directory,
    )


def ensure_experiment(name: str) -> str:
    """Get or create the experiment, with artifacts in `mlartifacts/` beside a SQLite store.

    The artifact location is fixed at creation, so it is always the real project root
    (never a DVC temp copy), whichever process creates it first.
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A SQLite store keeps its artifacts beside it (a server decides for itself). Never
    # MLflow's default ./mlruns: relative to the cwd, a DVC temp copy would own them.
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another stage process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`, values cut to MLflow's param length."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)[:MAX_PARAM_LENGTH]

    walk("", container)
    return flat


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def read_run_file(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / RUN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# Set by lmpipe.runs.sweep.SweepCallback for the jobs of a multirun: their parent MLflow run.
SWEEP_PARENT_ENV = "LMPIPE_SWEEP_PARENT_RUN"


def end_abandoned_run(run_id: str) -> None:
    """Mark KILLED a run whose checkpoint will never be resumed (it was discarded or
    replaced), where it still shows RUNNING because its process was killed."""
    client = MlflowClient()
    try:
        status = client.get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return  # deleted, or in another store
    if status == "RUNNING":
        client.set_terminated(run_id, "KILLED")
        log.info("MLflow run %s, whose checkpoint is discarded, ended as KILLED", run_id)


@contextlib.contextmanager
def stage_run(
    stage: str,
    cfg: DictConfig,
    upstream: Mapping[str, Path],
    run_id: str | None = None,
    run_name: str | None = None,
    inputs: list[lineage.Input] | None = None,
    system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one stage execution; ends FAILED if the body raises.
    `inputs`: the stage's DVC deps with their md5s, where the caller has them already.
    `system_metrics`: MLflow samples CPU, memory (and GPU) into the run while it is open,
    every `tracking.system_metrics_interval` seconds.

    `upstream` maps upstream stage names to their output directories: their run.json gives
    the run ids tagged here, so the chain corpus -> model can be walked in the UI.
    """
    configure()
    outbox.reset()  # a new run tries the store again, whatever an earlier run in this process saw
    replay_outbox()
    experiment_id = ensure_experiment(cfg.tracking.experiment)
    tags = {TAG_STAGE: stage}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags[TAG_DVC_EXP] = os.environ["DVC_EXP_NAME"]
    upstream_runs = {name: read_run_file(directory) for name, directory in upstream.items()}
    tags |= lineage.upstream_tags(
        {name: record["run_id"] for name, record in upstream_runs.items() if record}
    )
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval)
    run = mlflow.start_run(
        log_system_metrics=system_metrics,
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else run_name or stage,
        tags=None if run_id else tags,
        # A job of a Hydra sweep: the child of the sweep's run (lmpipe.runs.sweep).
        parent_run_id=None if run_id else os.environ.get(SWEEP_PARENT_ENV) or None,
    )
    status = "FAILED"
    try:
        if run_id is None:
            mlflow.log_params(flatten_config(cfg))
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/params.yaml")
            if inputs is None:
                inputs = lineage.dvc_deps(stage, find_project_root())
            log_inputs(run.info.run_id, inputs)
        yield run
        status = "FINISHED"
    finally:
        # mlflow.end_run leaves the active run even when the store fails to take the status.
        saved = project_outbox()
        outbox.send_or_save(
            f"the run's end ({status})",
            lambda: mlflow.end_run(status),
            lambda: saved.save_end(run.info.run_id, status),
            saved.directory,
        )


def log_inputs(run_id: str, inputs: list[lineage.Input], attempts: int = 5) -> None:
    """Record what a run read as MLflow dataset inputs (see lmpipe.runs.lineage).

    MLflow's SQL store looks up which datasets exist and inserts the rest, so parallel jobs
    (a joblib sweep) that log the same new dataset race, and the later insert breaks the
    store's unique key. Logging inputs is idempotent: a retry finds the rows the other job
    wrote and links this run to them.
    """
    if not inputs:
        return
    datasets = lineage.dataset_inputs(inputs)
    client = MlflowClient()
    retried(
        lambda: client.log_inputs(run_id, datasets=datasets),
        attempts,
        # random pauses desynchronise the racing jobs
        pause=lambda attempt: random.uniform(0.0, 0.05 * attempt),
    )


def retried(call: Callable[[], Any], attempts: int, pause: Callable[[int], float]) -> Any:
    """`call()`, tried up to `attempts` times, sleeping `pause(attempt)` after a failure."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as err:
            if attempt == attempts:
                raise
            log.debug("attempt %d of %d failed, trying again: %r", attempt, attempts, err)
            time.sleep(pause(attempt))
    raise ValueError(f"attempts must be at least 1, not {attempts}")


class MetricLogger:
    """Step metrics to MLflow (batched, sent from a background thread) and to CSVs for DVC.

    Each `series` ("train", "val") becomes `<csv_dir>/<series>.csv`, a DVC plot.

    Logging must never slow or kill training: one sender thread does the sends, a failing
    batch is retried, and then it and every later batch go to the outbox (lmpipe.runs.outbox),
    with one warning, while the CSVs keep every value. Without a `run_id` (a non-main
    process of a distributed run) nothing is sent or written.
    """

    def __init__(
        self,
        run_id: str | None,
        csv_dir: Path | None = None,
        flush_every: int = 50,
        retries: int = 2,  # on top of MLflow's own HTTP retries and SQLite's busy timeout
        prefix: str = "",  # before every metric name, e.g. a training phase's "sft_phase/"
    ) -> None:
        self.run_id = run_id
        self.prefix = prefix
        self.csv_dir = csv_dir
        self.flush_every = flush_every
        self.retries = retries
        self._pending: list[Metric] = []
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._queue: queue.SimpleQueue[list[Metric] | None] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._client = MlflowClient() if run_id is not None else None
        self.saved_batches = 0  # batches that went to the outbox instead of the store
        self._stored_up_to: dict[str, int] = {}  # a resumed run: last step the store has

    def log(self, metrics: Mapping[str, float], step: int, series: str = "train") -> None:
        metrics = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        self._queue_unstored(metrics, step)
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._rows.setdefault(series, []).append(row)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def _queue_unstored(self, metrics: Mapping[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if k != "step" and step > self._stored_up_to.get(k, -1)
        )

    def state_dict(self) -> dict[str, list[dict[str, Any]]]:
        """The rows logged so far: a resumed run's CSVs then hold the whole history."""
        return {series: list(rows) for series, rows in self._rows.items()}

    def load_state_dict(self, rows: Mapping[str, list[dict[str, Any]]]) -> None:
        """Continue from a checkpoint's rows, so that the run holds every step once.

        Sending lags behind training, so an interrupted run's store may lack some rows
        of its checkpoint (they are sent now), or hold steps past it, which the resumed run
        repeats bit for bit (they are not sent again). The CSVs are rebuilt from the rows.
        """
        self._rows = {series: list(r) for series, r in rows.items()}
        stored = self._steps_in_store()
        if stored is None:
            return
        self._stored_up_to = stored
        for series_rows in self._rows.values():
            for row in series_rows:
                self._queue_unstored(row, row["step"])
        self.flush()

    def _steps_in_store(self) -> dict[str, int] | None:
        """Per metric key, the last step the run already holds; None if the store can't be
        asked (then nothing is re-sent, and a repeated step may appear twice in MLflow)."""
        if self._client is None:
            return None
        try:
            keys = self._client.get_run(self.run_id).data.metrics
            return {
                key: max(m.step for m in history)
                for key in keys
                if (history := self._client.get_metric_history(self.run_id, key))
            }
        except (MlflowException, OSError) as error:  # OSError: requests' connection errors
            log.warning("metrics: could not read run %s's history (%s): resumed steps may be "
                        "logged twice", self.run_id, error)  # fmt: skip
            return None

    def flush(self) -> None:
        if not self._pending or self.run_id is None:
            self._pending = []
            return
        batch, self._pending = self._pending, []
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, daemon=True)
            self._sender.start()
        self._queue.put(batch)

    def _send_loop(self) -> None:
        # Linux schedules threads separately: at the lowest priority the store's work (about
        # 0.25 ms of CPU per value in MLflow's SQL store) yields the cores to training.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        saved = project_outbox()
        while (batch := self._queue.get()) is not None:
            sent = outbox.send_or_save(
                f"{len(batch)} metric values",
                lambda batch=batch: self._send(batch),
                lambda batch=batch: saved.save_metrics(self.run_id, batch),
                saved.directory,
            )
            self.saved_batches += not sent

    def _send(self, batch: list[Metric]) -> None:
        # A busy or unreachable store: retry, then give up on it (the outbox keeps the batch).
        retried(
            lambda: outbox.log_metrics(self._client, self.run_id, batch),
            self.retries,
            pause=lambda attempt: 0.5 * attempt,
        )

    def close(self) -> None:
        self.flush()
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join()
            self._sender = None
        if self.csv_dir is not None:
            self.write_csvs(self.csv_dir)

    def write_csvs(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for series, rows in self._rows.items():
            columns = ["step", *sorted({k for row in rows for k in row} - {"step"})]
            tmp = directory / f".{series}.csv.tmp"
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            tmp.replace(directory / f"{series}.csv")


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def run_status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status
