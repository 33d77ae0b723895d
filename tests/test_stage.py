"""The Stage context: atomic outputs, run.json, failure handling, missing inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmpipe.runs import tracking
from lmpipe.runs.config import ConfigError
from lmpipe.stage import MissingInputError, Stage
from tests.conftest import REPO


@pytest.fixture
def cfg(tmp_path: Path):
    params = OmegaConf.load(REPO / "params.yaml")
    params.outputs_dir = str(tmp_path / "outputs")
    return params


def test_success_renames_outputs_and_writes_run_json(mlflow_store: str, cfg) -> None:
    with Stage("clean", cfg) as stage:
        (stage.output("corpus")).mkdir()
        (stage.output("stats.json")).write_text("{}")
        stage.log_metrics({"docs_out": 3})
    out = Path(cfg.outputs_dir) / "clean"
    assert sorted(p.name for p in out.iterdir()) == ["corpus", "run.json", "stats.json"]
    record = json.loads((out / "run.json").read_text())
    assert record["run_id"] == stage.run_id
    assert tracking.run_status(stage.run_id) == "FINISHED"


def test_failure_keeps_previous_outputs_and_leaves_no_temp(mlflow_store: str, cfg) -> None:
    with Stage("clean", cfg) as stage:
        stage.output("stats.json").write_text('{"version": 1}')
    with pytest.raises(RuntimeError, match="interrupted"), Stage("clean", cfg) as failing:
        failing.output("stats.json").write_text('{"version": 2, "half')
        raise RuntimeError("interrupted")
    out = Path(cfg.outputs_dir) / "clean"
    assert json.loads((out / "stats.json").read_text()) == {"version": 1}
    assert json.loads((out / "run.json").read_text())["run_id"] == stage.run_id
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert tracking.run_status(failing.run_id) == "FAILED"


def test_declared_but_unwritten_output_fails_the_stage(mlflow_store: str, cfg) -> None:
    with pytest.raises(RuntimeError, match="never wrote"), Stage("clean", cfg) as stage:
        stage.output("corpus")
    assert tracking.run_status(stage.run_id) == "FAILED"


def test_missing_upstream_output_names_the_stage_to_run(mlflow_store: str, cfg) -> None:
    with (
        pytest.raises(MissingInputError, match=r"dvc repro clean"),
        Stage("tokenize", cfg) as stage,
    ):
        stage.input("clean", "corpus")


def test_bad_config_fails_before_any_run(mlflow_store: str, cfg) -> None:
    cfg.pretrain.stepz = 3
    with pytest.raises(ConfigError, match=r"pretrain\.stepz"):
        Stage("pretrain", cfg)


def test_leftovers_of_a_killed_run_are_tidied(mlflow_store: str, cfg) -> None:
    out = Path(cfg.outputs_dir) / "clean"
    out.mkdir(parents=True)
    (out / ".tmp-1a2b3c4d-corpus").mkdir()  # a killed run's half-written output
    (out / ".tmp-1a2b3c4d-corpus" / "part-00000.parquet").write_text("half")
    (out / ".old-5e6f7a8b-stats.json").write_text('{"version": 1}')  # killed mid-commit
    (out / ".old-9c0d1e2f-run.json").write_text("{}")  # superseded: run.json is there
    (out / "run.json").write_text('{"run_id": "x"}')
    with Stage("clean", cfg):
        assert sorted(p.name for p in out.iterdir()) == ["run.json", "stats.json"]
        assert json.loads((out / "stats.json").read_text()) == {"version": 1}


def logged_files(run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found, folders = set(), [None]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop()):
            (folders.append(item.path) if item.is_dir else found.add(item.path))
    return found


def stage_artifacts(stage: Stage) -> None:
    import matplotlib.pyplot as plt
    import pandas as pd

    predictions = stage.output("predictions.csv")
    predictions.write_text("a,b\n1,2\n")
    stage.log_artifact(predictions, "predictions")
    stage.log_dict({"x": 1}, "samples.json")
    stage.log_figure(plt.figure(), "histogram.png")
    stage.log_table(pd.DataFrame({"prompt": ["hi"], "reply": ["hello"]}), "generations.json")


def test_artifacts_are_logged_under_their_final_names(mlflow_store: str, cfg) -> None:
    with Stage("clean", cfg) as stage:
        stage_artifacts(stage)
    files = logged_files(stage.run_id)
    # A pending output is logged as predictions.csv, never as its temporary name.
    expected = {"predictions/predictions.csv", "samples.json", "histogram.png", "generations.json"}
    assert expected <= files


def test_a_store_down_mid_stage_saves_every_write_and_the_stage_still_succeeds(
    mlflow_store: str, cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmpipe.runs import outbox

    with Stage("clean", cfg) as stage:
        monkeypatch.setattr(outbox, "_unreachable", "the server went away")  # as after a failure
        stage_artifacts(stage)
        stage.log_metrics({"docs_out": 3})
        stage.output("stats.json").write_text("{}")
    assert (Path(cfg.outputs_dir) / "clean" / "stats.json").is_file()
    saved = tracking.project_outbox()
    lines = saved.pending()[0].read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds.count("artifact") >= 4 and "metrics" in kinds and kinds[-1] == "end"
    assert tracking.run_status(stage.run_id) == "RUNNING"  # the store never heard the end
    outbox.reset()  # the store is back
    assert saved.replay() == 1
    assert tracking.run_status(stage.run_id) == "FINISHED"
    expected = {"predictions/predictions.csv", "samples.json", "histogram.png", "generations.json"}
    assert expected <= logged_files(stage.run_id)
