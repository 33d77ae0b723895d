"""The champion behind a real `mlflow models serve --env-manager local` on 127.0.0.1."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pytest

from lmpipe.deploy.release import deploy
from lmpipe.runs.config import DeployConfig, GateConfig, QuantizeConfig
from lmpipe.tasks.finetuning import finetuning_task
from lmpipe.training.model import load_classifier, save_model
from tests.servers import post, sequential_latency, serve

log = logging.getLogger(__name__)
pytestmark = pytest.mark.slow

MALFORMED = [
    (b"{not json", "application/json"),
    (json.dumps({"dataframe_records": [{"wrong_column": "x"}]}).encode(), "application/json"),
    (json.dumps({"unknown_format": [1, 2]}).encode(), "application/json"),
    (b"prompt\nhello", "text/plain"),
]


@pytest.mark.parametrize("task", ["sft", "classify"])
def test_served_champion_answers_rejects_malformed_and_stays_up(
    task: str, mlflow_store: str, tmp_path: Path, tiny_model, tiny_tokenizer
) -> None:
    model_dir = tmp_path / "model"
    if task == "classify":
        save_model(tiny_model, tiny_tokenizer, tmp_path / "base")
        classifier = load_classifier(tmp_path / "base", ["noun.animal", "noun.food"])
        save_model(classifier, tiny_tokenizer, model_dir)
    else:
        save_model(tiny_model, tiny_tokenizer, model_dir)
    name = f"served-{task}"
    cfg = DeployConfig(registered_model_name=name, gates={task: GateConfig("score", "max", 0.0)},
                       quantize=QuantizeConfig(variants=[]), max_new_tokens=4)  # fmt: skip
    with mlflow.start_run():
        deploy(model_dir, finetuning_task(task), {"score": 1.0}, cfg, {}, [])

    column = "text" if task == "classify" else "prompt"
    good = {"dataframe_records": [{column: "a small dog"}, {column: "an apple pie"}]}
    if task == "sft":
        good["params"] = {"max_new_tokens": 4}
    with serve(f"models:/{name}@champion", mlflow_store, tmp_path / "serve.log") as url:
        answer = post(f"{url}/invocations", good)
        assert answer.status == 200, answer.body
        predictions = answer.body["predictions"]
        assert len(predictions) == 2
        if task == "classify":
            assert {p["label"] for p in predictions} <= {"noun.animal", "noun.food"}
            assert all(0 < p["confidence"] <= 1 for p in predictions)
        else:
            assert all(isinstance(p, str) for p in predictions)
            # Chat messages in a row answer as the same single user turn as a prompt does.
            chat = {"dataframe_records": [{"messages": [{"role": "user",
                                                         "content": "a small dog"}]}],
                    "params": {"max_new_tokens": 4}}  # fmt: skip
            answer = post(f"{url}/invocations", chat)
            assert answer.status == 200, answer.body
            assert answer.body["predictions"] == predictions[:1]

        for body, content_type in MALFORMED:
            bad = post(f"{url}/invocations", body, content_type)
            assert 400 <= bad.status < 500, (body, bad.status, bad.body)
        assert post(f"{url}/invocations", good).status == 200  # still up and answering

        single = {"dataframe_records": [{column: "what is a tiger?"}]}
        if task == "sft":
            single["params"] = {"max_new_tokens": 4}
        report = sequential_latency(url, single, 200)
    log.info("%s over HTTP: %s", task, report)
    (tmp_path / "latency.json").write_text(json.dumps(vars(report)))
    assert report.requests == 200 and report.errors == 0
    assert 0 < report.p50_ms <= report.p95_ms
