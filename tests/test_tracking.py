"""Tracking store location, stage runs (tags, params, FAILED), batched metric logging."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lmpipe.runs import lineage, tracking
from lmpipe.runs.config import validate
from tests.conftest import REPO


@pytest.fixture
def cfg():
    return validate(OmegaConf.load(REPO / "params.yaml"))


def test_store_is_the_project_root_or_dvc_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(REPO / "conf")
    assert tracking.tracking_uri() == f"sqlite:///{REPO / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri() == "http://127.0.0.1:5999"


def test_flatten_config_cuts_long_values() -> None:
    flat = tracking.flatten_config({"a": {"b": 1, "c": [1, 2]}, "long": "x" * 10000})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]"
    assert len(flat["long"]) == tracking.MAX_PARAM_LENGTH


def test_stage_run_tags_params_and_upstream(mlflow_store: str, cfg, tmp_path: Path) -> None:
    upstream = tmp_path / "clean"
    upstream.mkdir()
    (upstream / tracking.RUN_FILE).write_text('{"run_id": "abc123"}')
    with tracking.stage_run("tokenize", cfg, {"clean": upstream}) as run:
        run_id = run.info.run_id
    stored = MlflowClient().get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.tags[lineage.TAG_STAGE] == "tokenize"
    assert stored.data.tags[f"{lineage.TAG_UPSTREAM}clean"] == "abc123"
    assert stored.data.params["finetune.optim.lr"] == str(cfg.finetune.optim.lr)
    experiment = MlflowClient().get_experiment(stored.info.experiment_id)
    assert experiment.name == "lmpipe"
    # Artifacts beside the SQLite store, not in MLflow's cwd-relative ./mlruns.
    store_dir = Path(mlflow_store.removeprefix("sqlite:///")).parent
    assert experiment.artifact_location == (store_dir / "mlartifacts").as_uri()


def test_stage_run_that_raises_ends_failed(mlflow_store: str, cfg) -> None:
    with pytest.raises(RuntimeError), tracking.stage_run("clean", cfg, {}) as run:
        run_id = run.info.run_id
        raise RuntimeError("boom")
    assert tracking.run_status(run_id) == "FAILED"
    assert mlflow.active_run() is None


def test_metric_logger_batches_to_mlflow_and_csv(mlflow_store: str, tmp_path: Path) -> None:
    with mlflow.start_run() as run:
        logger = tracking.MetricLogger(run.info.run_id, csv_dir=tmp_path / "curves", flush_every=7)
        for step in range(1, 21):
            logger.log({"train_loss": 1.0 / step, "lr": 0.1}, step)
        logger.log({"val_loss": 0.5}, 20, series="val")
        logger.close()
    history = MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    train_csv = (tmp_path / "curves" / "train.csv").read_text().splitlines()
    assert train_csv[0] == "step,lr,train_loss" and len(train_csv) == 21
    assert (tmp_path / "curves" / "val.csv").read_text().splitlines() == ["step,val_loss", "20,0.5"]


@pytest.mark.parametrize(("sent", "checkpoint"), [(8, 5), (3, 5)])
def test_a_resumed_run_holds_every_step_once(
    sent: int, checkpoint: int, mlflow_store: str, tmp_path: Path
) -> None:
    """Killed with steps 1-`sent` in MLflow and rows 1-`checkpoint` in the checkpoint. Ahead
    (8, 5): the resumed run repeats steps 6-8 bit for bit and must not send them again.
    Behind (3, 5), as when sending lags: rows 4-5 reach MLflow from the checkpoint."""
    with mlflow.start_run() as run:
        first = tracking.MetricLogger(run.info.run_id, flush_every=1)
        for step in range(1, max(sent, checkpoint) + 1):
            if step <= sent:
                first.log({"train_loss": 1.0 / step}, step)
            else:  # logged, but not yet sent when the process was killed
                first._rows["train"].append({"step": step, "train_loss": 1.0 / step})
            if step == checkpoint:
                checkpoint_rows = first.state_dict()
        first.close()
        resumed = tracking.MetricLogger(run.info.run_id, csv_dir=tmp_path, flush_every=1)
        resumed.load_state_dict(checkpoint_rows)
        for step in range(checkpoint + 1, 11):
            resumed.log({"train_loss": 1.0 / step}, step)
            if step == 9:
                resumed.log({"val_loss": 0.5}, step, "val")  # a key new since the kill
        resumed.close()
    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [9]
    assert len((tmp_path / "train.csv").read_text().splitlines()) == 1 + 10


class DownClient:
    """A store that refuses every write, counting the attempts."""

    def __init__(self) -> None:
        self.calls = 0

    def log_batch(self, run_id, metrics) -> None:
        self.calls += 1
        raise ConnectionError("connection refused")


def test_unreachable_store_warns_once_saves_for_replay_and_keeps_csvs(
    mlflow_store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    logger = tracking.MetricLogger(run_id, csv_dir=tmp_path / "curves", flush_every=2)
    down = logger._client = DownClient()
    with caplog.at_level(logging.WARNING, logger="lmpipe.runs.outbox"):
        for step in range(1, 11):
            logger.log({"train_loss": 10.0 / step, "lr": 0.1}, step)
        logger.close()
    # The first batch is tried `retries` times; after that the store is known to be down.
    assert down.calls == logger.retries and logger.saved_batches == 10
    assert caplog.text.count("tracking store unreachable") == 1
    assert len((tmp_path / "curves" / "train.csv").read_text().splitlines()) == 11
    saved = tracking.project_outbox()
    assert [p.stem for p in saved.pending()] == [run_id]

    # The store is back (here: the real client): replay sends everything, in order, once.
    assert saved.replay() == 1 and saved.pending() == []
    history = MlflowClient().get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert saved.replay() == 0  # nothing left to send twice


def test_replay_keeps_what_it_could_not_send(mlflow_store: str, tmp_path: Path) -> None:
    """An outbox replayed while the store is still down stays whole for the next try."""
    from mlflow.entities import Metric

    with mlflow.start_run() as run:
        run_id = run.info.run_id
    saved = tracking.project_outbox()
    saved.save_metrics(run_id, [Metric("loss", 1.0, 0, 1)])
    (tmp_path / "log.txt").write_text("hello")
    saved.save_artifact(run_id, tmp_path / "log.txt", "logs")
    saved.save_end(run_id, "FAILED")
    assert saved.replay(DownClient()) == 0
    lines = saved.pending()[0].read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["metrics", "artifact", "end"]
    (tmp_path / "log.txt").unlink()  # the outbox holds its own copy of the artifact
    assert saved.replay() == 1 and not saved.directory.joinpath(f"{run_id}.files").exists()
    stored = MlflowClient().get_run(run_id)
    assert stored.data.metrics == {"loss": 1.0} and stored.info.status == "FAILED"
    assert [a.path for a in MlflowClient().list_artifacts(run_id, "logs")] == ["logs/log.txt"]


def test_a_replay_in_progress_elsewhere_is_left_alone(mlflow_store: str) -> None:
    from mlflow.entities import Metric

    with mlflow.start_run() as run:
        run_id = run.info.run_id
    saved = tracking.project_outbox()
    saved.save_metrics(run_id, [Metric("loss", 1.0, 0, 1)])
    with saved._locked():  # as another process replaying (or writing) would hold it
        assert saved.replay() == 0
    assert [p.stem for p in saved.pending()] == [run_id]
    assert saved.replay() == 1 and MlflowClient().get_run(run_id).data.metrics == {"loss": 1.0}


def test_stage_run_records_dvc_deps_as_inputs_with_dvc_md5(mlflow_store: str, cfg) -> None:
    with tracking.stage_run("tokenize", cfg, {}) as run:
        run_id = run.info.run_id
    inputs = {
        d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags})
        for d in MlflowClient().get_run(run_id).inputs.dataset_inputs
    }
    source = REPO / "stages" / "tokenize.py"
    digest, tags = inputs["stages/tokenize.py"]
    assert digest == hashlib.md5(source.read_bytes()).hexdigest()  # DVC 3's md5 of a file
    assert tags["mlflow.data.context"] == "code"


def test_a_stage_dvc_yaml_does_not_define_records_no_deps() -> None:
    assert lineage.dvc_deps("no-such-stage", REPO) == []
    assert "stages/tokenize.py" in {d.name for d in lineage.dvc_deps("tokenize", REPO)}


def _log_the_same_inputs(experiment_id: str, rounds: int, barrier, results) -> None:
    """A sweep job: one run per round, all jobs logging the same new datasets at once."""
    client = MlflowClient()
    for round_ in range(rounds):
        run_id = client.create_run(experiment_id).info.run_id
        inputs = [
            lineage.Input(f"data/{round_}/{i}", f"md5-{i}", "code", f"file:///data/{i}")
            for i in range(12)
        ]
        barrier.wait()
        try:
            tracking.log_inputs(run_id, inputs)
            results.put((run_id, None))
        except Exception as err:
            results.put((run_id, str(err)[:200]))


def test_parallel_jobs_logging_the_same_new_inputs_all_succeed(mlflow_store: str) -> None:
    # MLflow's store checks which datasets exist, then inserts: without the retry in
    # tracking.log_inputs about half of these jobs failed on the datasets' unique key.
    experiment_id = tracking.ensure_experiment("race")
    context = multiprocessing.get_context("fork")
    jobs, rounds = 4, 4
    barrier, results = context.Barrier(jobs), context.Queue()
    processes = [
        context.Process(target=_log_the_same_inputs, args=(experiment_id, rounds, barrier, results))
        for _ in range(jobs)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in range(jobs * rounds)]
    for process in processes:
        process.join(timeout=60)
    assert [error for _, error in outcomes if error] == []
    client = MlflowClient()
    for run_id, _ in outcomes:
        assert len(client.get_run(run_id).inputs.dataset_inputs) == 12
