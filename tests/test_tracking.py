"""Tracking store location, stage runs (tags, params, FAILED), batched metric logging."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lmpipe import tracking
from lmpipe.config import validate
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
    assert stored.data.tags[tracking.TAG_STAGE] == "tokenize"
    assert stored.data.tags[f"{tracking.TAG_UPSTREAM}clean"] == "abc123"
    assert stored.data.params["finetune.optim.lr"] == str(cfg.finetune.optim.lr)
    experiment = MlflowClient().get_experiment(stored.info.experiment_id)
    assert experiment.name == "lmpipe"


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


def test_unreachable_store_warns_but_keeps_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = tracking.MetricLogger("no-such-run", csv_dir=tmp_path, flush_every=1, retries=2)
    logger._client = MlflowClient(tracking_uri="http://127.0.0.1:9")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="lmpipe.tracking"):
        logger.log({"train_loss": 1.5}, 1)
        logger.close()
    assert logger.failed_batches == 1
    assert "did not accept" in caplog.text
    assert (tmp_path / "train.csv").read_text().splitlines()[1] == "1,1.5"
