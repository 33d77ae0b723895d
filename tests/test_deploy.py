"""Quality gate, and the pyfunc through the Model Registry with a tiny model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmpipe.config import ConfigError, DeployConfig, GateConfig
from lmpipe.deploy import check_gate, deploy
from lmpipe.model import save_model


@pytest.mark.parametrize(
    ("mode", "threshold", "passed"), [("min", 5.0, True), ("min", 3.0, False), ("max", 5.0, False)]
)
def test_gate(mode: str, threshold: float, passed: bool) -> None:
    result = check_gate({"loss": 4.0}, GateConfig(metric="loss", mode=mode, threshold=threshold))
    assert result.passed is passed and result.value == 4.0


def test_gate_on_unknown_metric_names_it() -> None:
    with pytest.raises(ConfigError, match=r"deploy\.gate\.metric: 'acc'"):
        check_gate({"loss": 1.0}, GateConfig(metric="acc"))


def test_deploy_registers_gates_and_serves(
    mlflow_store: str, tmp_path: Path, tiny_model, tiny_tokenizer
) -> None:
    model_dir = tmp_path / "model"
    save_model(tiny_model, tiny_tokenizer, model_dir)
    cfg = DeployConfig(
        registered_model_name="test-chat",
        gate=GateConfig(metric="loss", threshold=5.0),
        max_new_tokens=4,
    )
    with mlflow.start_run():
        passed = deploy(model_dir, {"loss": 4.0}, cfg, {"lmpipe.run.finetune": "r1"})
    with mlflow.start_run():
        failed = deploy(model_dir, {"loss": 9.0}, cfg, {})
    client = MlflowClient()
    assert passed.alias == "champion" and failed.alias is None
    assert str(client.get_model_version_by_alias("test-chat", "champion").version) == passed.version
    assert client.get_model_version("test-chat", passed.version).tags["lmpipe.run.finetune"] == "r1"
    assert failed.model_uri == f"models:/test-chat/{failed.version}"
    served = mlflow.pyfunc.load_model("models:/test-chat@champion")
    replies = served.predict(pd.DataFrame({"prompt": ["hi", "bye"]}), params={"max_new_tokens": 3})
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert served.metadata.signature.inputs.input_names() == ["prompt"]
