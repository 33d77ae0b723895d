"""A BERT encoder through the pipeline, as users run it: masked-LM pretraining, then
classification and its evaluation through `dvc repro`; SIGKILL and resume; a Hydra sweep
over model families."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import copy_project, run
from tests.test_training_stages import PRETRAIN, kill_pretrain_when, runs, weights

pytestmark = pytest.mark.slow

PARAMS = ["experiment=smoke", "model=bert-tiny", "finetune=classify", "pretrain.steps=80",
          "pretrain.checkpoint_every=20", "pretrain.eval_every=40"]  # fmt: skip


@pytest.fixture(scope="module")
def encoder_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("encoder") / "project")
    run(["lmpipe", "params", *PARAMS], project)
    run(["git", "commit", "-qam", "encoder params"], project)
    run(["dvc", "repro", "evaluate"], project, timeout=900)  # deploy: tested in test_pipeline
    return project


def test_encoder_pretrains_by_masked_lm_then_classifies(encoder_project: Path) -> None:
    out = encoder_project / "outputs"
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenize" / "tokenizer")
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.cls_token == "<|cls|>"
    pretrained = AutoModelForMaskedLM.from_pretrained(out / "pretrain" / "model")
    assert type(pretrained).__name__ == "BertForMaskedLM"
    pretrain = json.loads((out / "pretrain" / "metrics.json").read_text())
    # (That the objective beats the unigram baseline is checked at unit scale, in
    # test_masked_lm.py: 80 smoke steps are too few for it.)
    assert pretrain["steps"] == 80 and 0 < pretrain["unigram_loss"] < 10
    assert pretrain["val_loss_vs_unigram"] == pytest.approx(
        pretrain["val_loss"] / pretrain["unigram_loss"]
    )
    val_curve = (out / "pretrain" / "curves" / "val.csv").read_text().splitlines()
    assert {"val_loss", "val_accuracy", "val_unigram_loss"} <= set(val_curve[0].split(","))
    tuned = AutoModelForSequenceClassification.from_pretrained(out / "finetune" / "model")
    assert type(tuned).__name__ == "BertForSequenceClassification"
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert {"finetuned_macro_f1", "tfidf_macro_f1", "baseline_macro_f1", "pretrained_val_loss",
            "finetuned_macro_f1_vs_tfidf", "int8_macro_f1_change"} <= set(metrics)  # fmt: skip
    assert metrics["tfidf_accuracy"] > 0.6  # the baseline is a real classifier
    header = (out / "evaluate" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert {"actual", "finetuned_predicted", "tfidf_predicted"} <= set(header)


def test_masked_lm_pretraining_killed_and_resumed_ends_bit_identical(
    encoder_project: Path,
) -> None:
    straight = weights(encoder_project)
    # held right after the checkpoint of step 40 (tests/instrument), killed there
    killed = kill_pretrain_when(encoder_project, force=True, after_checkpoint=40)
    assert killed["step"] == 40 and not killed.get("finished")
    # --force: DVC would otherwise restore the first run's outputs from its run-cache;
    # --single-item: rerunning clean and tokenize would make the checkpoint another input's.
    run(["dvc", "repro", "--force", "--single-item", "pretrain"], encoder_project, timeout=600)
    metrics = json.loads((encoder_project / PRETRAIN / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 40
    assert runs(encoder_project, "pretrain")[-1] == (killed["run_id"], "FINISHED")
    resumed = weights(encoder_project)
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_a_sweep_over_model_families(encoder_project: Path) -> None:
    """`python -m stages.pretrain -m model=tiny,bert-tiny`: one job per family, each with the
    objective of its family, under one parent run."""
    run(["python", "-m", "stages.pretrain", "-m", "experiment=smoke", "model=tiny,bert-tiny",
         "pretrain.steps=4"], encoder_project, timeout=600)  # fmt: skip
    with sqlite3.connect(encoder_project / "mlflow.db") as db:
        names = [name for (name,) in db.execute(
            "SELECT name FROM runs WHERE name LIKE 'pretrain %model=%'")]  # fmt: skip
    assert sorted("model=bert-tiny" in name for name in names) == [False, True]
    sweep = sorted((encoder_project / "multirun" / "pretrain").iterdir())[-1]
    families = {
        json.loads((job / "outputs" / "pretrain" / "metrics.json").read_text()).keys()
        >= {"unigram_loss"}
        for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    }
    assert families == {True, False}  # one masked-LM job, one causal-LM job
