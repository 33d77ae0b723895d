"""Quality gate (threshold and champion), registry aliases, the int8 variant, and the pyfunc
through the Model Registry with tiny models."""

from __future__ import annotations

from dataclasses import asdict
from math import comb
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from lmpipe.deploy import registry
from lmpipe.deploy.quantize import quantize_dynamic_int8, state_size_bytes
from lmpipe.deploy.release import check_gate, deploy, gate_reason
from lmpipe.evaluation.intervals import paired_ratio_difference_interval
from lmpipe.evaluation.paired import score_table
from lmpipe.runs.config import ConfigError, DeployConfig, GateConfig, QuantizeConfig, validate
from lmpipe.tasks.finetuning import finetuning_task
from lmpipe.training.model import load_classifier, save_model


@pytest.mark.parametrize(
    ("mode", "threshold", "passed"),
    [("min", 5.0, True), ("min", 3.0, False), ("min", 4.0, True),
     ("max", 5.0, False), ("max", 3.0, True), ("max", 4.0, True)],
)  # fmt: skip
def test_gate(mode: str, threshold: float, passed: bool) -> None:
    result = check_gate({"loss": 4.0}, GateConfig(metric="loss", mode=mode, threshold=threshold))
    assert result.passed is passed and result.value == 4.0


@pytest.mark.parametrize(
    ("task", "gate", "metric", "mode", "threshold"),
    [
        ("sft", GateConfig(), "finetuned_sft_test_loss", "min", 6.0),  # the task's own
        ("classify", GateConfig(), "finetuned_macro_f1", "max", 0.3),
        ("preference", GateConfig(threshold=5.0), "finetuned_sft_test_loss", "min", 5.0),
        ("sft", GateConfig("finetuned_exact_match", "max", 0.5), "finetuned_exact_match", "max",
         0.5),
        # The reviewer's case: a metric without a mode takes the metric's direction, not the
        # task default's min (and no threshold of another metric).
        ("sft", GateConfig("finetuned_exact_match"), "finetuned_exact_match", "max", None),
        ("classify", GateConfig("finetuned_sft_test_loss"), "finetuned_sft_test_loss", "min",
         None),
    ],
)  # fmt: skip
def test_a_gate_takes_the_tasks_metric_and_the_metrics_direction(
    task: str, gate: GateConfig, metric: str, mode: str, threshold: float | None
) -> None:
    composed = validate({"deploy": {"gates": {task: asdict(gate)}}}).deploy  # as stages see it
    for deploy_config in (DeployConfig(gates={task: gate}), composed):
        resolved = finetuning_task(task).gate(deploy_config)
        assert (resolved.metric, resolved.mode) == (metric, mode)
        assert resolved.threshold == threshold


def test_a_mode_that_contradicts_the_metric_is_refused() -> None:
    sft = finetuning_task("sft")
    with pytest.raises(ConfigError, match=r"deploy\.gates\.sft\.mode.*'min' contradicts "
                       r"finetuned_exact_match.*'max'"):  # fmt: skip
        sft.gate(DeployConfig(gates={"sft": GateConfig("finetuned_exact_match", "min")}))
    with pytest.raises(ConfigError, match=r"deploy\.gates\.sft\.mode' must be set"):
        sft.gate(DeployConfig(gates={"sft": GateConfig("my_score")}))
    custom = sft.gate(DeployConfig(gates={"sft": GateConfig("my_score", "max")}))
    assert custom.mode == "max"  # a metric declared nowhere: the configured mode


def test_checkable_answers_gate_on_exact_match_against_the_champion() -> None:
    verifiable = {"dataset": "reasoning_gym"}  # the demo's
    config = validate({"finetune": verifiable})
    sft = finetuning_task("sft")
    gate = sft.gate(config.deploy, config.finetune)
    assert (gate.metric, gate.mode, gate.significance) == ("finetuned_exact_match", "max", 0.05)
    assert gate.baseline == "retrieval_exact_match" and gate.threshold is None
    chat = validate({"finetune": {"dataset": "chatterbot"}})
    assert sft.gate(chat.deploy, chat.finetune).metric == "finetuned_sft_test_loss"
    unbaselined = validate({"finetune": verifiable,
                            "deploy": {"gates": {"sft": {"baseline": "none"}}}})  # fmt: skip
    assert sft.gate(unbaselined.deploy, unbaselined.finetune).baseline is None
    # An explicit other metric takes none of exact match's defaults.
    other_metric = {"sft": {"metric": "finetuned_sft_test_loss"}}
    loss = validate({"finetune": verifiable, "deploy": {"gates": other_metric}})
    assert sft.gate(loss.deploy, loss.finetune).significance is None


def test_gate_on_unknown_metric_names_it() -> None:
    with pytest.raises(ConfigError, match=r"deploy\.gates: metric 'acc'"):
        check_gate({"loss": 1.0}, GateConfig(metric="acc"))


@pytest.mark.parametrize(
    ("mode", "value", "baseline", "margin", "passed"),
    [
        ("max", 0.85, 0.80, 0.0, True),  # beats TF-IDF
        ("max", 0.80, 0.80, 0.0, True),  # ties it: no margin asked for
        ("max", 0.82, 0.80, 0.05, False),  # beats it, but not by the margin
        ("max", 0.55, 0.80, 0.0, False),  # the demo decoder against TF-IDF
        ("min", 3.0, 3.5, 0.2, True),  # a loss: lower by the margin
        ("min", 3.4, 3.5, 0.2, False),
    ],
)
def test_gate_can_require_beating_a_baseline_by_a_margin(
    mode: str, value: float, baseline: float, margin: float, passed: bool
) -> None:
    gate = GateConfig("score", mode, 100.0 if mode == "min" else 0.0, "tfidf_score", margin)
    result = check_gate({"score": value, "tfidf_score": baseline}, gate)
    assert result.passed_threshold and result.passed is passed
    assert result.beat_baseline is passed and result.baseline_value == baseline
    if not passed:
        assert "does not beat tfidf_score" in gate_reason(result)


def test_gate_on_unknown_baseline_names_it() -> None:
    gate = GateConfig("f1", "max", 0.0, baseline="tfidf_f1")
    with pytest.raises(ConfigError, match=r"baseline 'tfidf_f1' is not an evaluate metric"):
        check_gate({"f1": 0.9}, gate)


@pytest.mark.parametrize(
    ("mode", "value", "champion", "tolerance", "passed"),
    [
        ("min", 4.0, 4.5, 0.0, True),  # better than the champion
        ("min", 4.5, 4.5, 0.0, True),  # as good
        ("min", 4.6, 4.5, 0.0, False),  # worse
        ("min", 4.6, 4.5, 0.2, True),  # worse, but within the tolerance
        ("min", 4.8, 4.5, 0.2, False),  # worse, beyond the tolerance
        ("max", 0.8, 0.7, 0.0, True),  # the classifier's mode: better
        ("max", 0.7, 0.7, 0.0, True),  # as good
        ("max", 0.6, 0.7, 0.0, False),  # worse
        ("max", 0.65, 0.7, 0.1, True),  # worse, but within the tolerance
        ("max", 0.5, 0.7, 0.1, False),  # worse, beyond the tolerance
        ("min", 4.6, 4.5, None, True),  # no champion check
        ("max", 0.6, 0.7, None, True),
    ],
)
def test_gate_must_not_be_worse_than_the_champion(
    mode: str, value: float, champion: float, tolerance: float | None, passed: bool
) -> None:
    incumbent = registry.RegisteredVersion("m", "3", "run", {"score": champion})
    gate = GateConfig(metric="score", mode=mode, threshold=100.0 if mode == "min" else 0.0)
    result = check_gate({"score": value}, gate, incumbent, tolerance)
    assert result.passed is passed and result.passed_threshold
    if tolerance is not None:
        assert result.champion_version == "3" and result.champion_value == champion


EXACT = "finetuned_exact_match"
LOSS = "finetuned_sft_test_loss"


def hits_table(hits: np.ndarray, metric: str = EXACT) -> pd.DataFrame:
    return score_table(metric, "max", [f"q{i}" for i in range(len(hits))], hits)


def exact_gate(level: float = 0.05) -> GateConfig:
    return GateConfig(EXACT, "max", 0.0, significance=level)


CHAMPION_HITS = (np.random.default_rng(0).random(400) < 0.6).astype(float)


def flipped(hits: np.ndarray, right: int, wrong: int, seed: int = 1) -> np.ndarray:
    """`hits` with `right` of its misses made right and `wrong` of its hits made wrong."""
    rng, out = np.random.default_rng(seed), hits.copy()
    out[rng.choice(np.flatnonzero(hits == 0), right, replace=False)] = 1
    out[rng.choice(np.flatnonzero(hits == 1), wrong, replace=False)] = 0
    return out


@pytest.mark.parametrize(
    ("right", "wrong", "significant"),
    [
        (40, 5, True),  # better: +35 answers of 400 (+8.8 points), most of them one way
        (12, 12, False),  # noise: as many new errors as fixes
        (10, 5, False),  # +1.25 points on 15 changed answers: p = 0.15
        (5, 40, False),  # worse
        (4, 0, False),  # the reviewer's case: exact one-sided p = 0.0625 (the bootstrap passed it)
        (9, 1, True),  # p = 0.0107
    ],
)
def test_significance_gate_promotes_only_a_challenger_better_beyond_the_noise(
    right: int, wrong: int, significant: bool
) -> None:
    challenger = flipped(CHAMPION_HITS, right, wrong)
    incumbent = registry.RegisteredVersion("m", "3", "run", {EXACT: CHAMPION_HITS.mean()})
    result = check_gate({EXACT: challenger.mean()}, exact_gate(), incumbent, None,
                        hits_table(challenger), hits_table(CHAMPION_HITS))  # fmt: skip
    assert result.significantly_better is significant and result.passed is significant
    assert result.shared_examples == 400 and result.test == "mcnemar"
    exact = sum(comb(right + wrong, i) for i in range(right, right + wrong + 1))
    assert result.p_value == pytest.approx(exact / 2 ** (right + wrong))
    low, high = result.difference_interval
    assert low <= (right - wrong) / 400 <= high
    assert (low > 0) is significant  # the interval at 90% agrees with the test at 5%
    if not significant:
        assert "not significantly better" in gate_reason(result)


def test_the_gates_level_is_one_sided() -> None:
    # 9 right and 2 wrong of 400: one-sided p = 0.0327, two-sided 0.065.
    challenger = flipped(CHAMPION_HITS, 9, 2)
    incumbent = registry.RegisteredVersion("m", "3", "run", {EXACT: CHAMPION_HITS.mean()})
    tables = (hits_table(challenger), hits_table(CHAMPION_HITS))
    passed = check_gate({EXACT: challenger.mean()}, exact_gate(0.05), incumbent, None, *tables)
    assert passed.passed and passed.p_value == pytest.approx(67 / 2048)
    assert passed.difference_interval[0] > 0  # two-sided at 90%: at 95% it holds 0
    assert not check_gate({EXACT: challenger.mean()}, exact_gate(0.025), incumbent, None,
                          *tables).passed  # fmt: skip
    # A loss: the interval is two-sided at 1 - 2 level (90% for 5%), from the same resamples.
    rng = np.random.default_rng(11)
    tokens = rng.integers(5, 30, 300).astype(float)
    champion = score_table(LOSS, "min", [f"e{i}" for i in range(300)],
                           tokens * rng.uniform(2.0, 3.0, 300), tokens)  # fmt: skip
    model = champion.assign(value=champion["value"] * rng.uniform(0.9, 1.08, 300))
    gate = GateConfig(LOSS, "min", 100.0, significance=0.05)
    result = check_gate({LOSS: 2.5}, gate, registry.RegisteredVersion("m", "3", "run", {}), None,
                        model, champion)  # fmt: skip
    expected = paired_ratio_difference_interval(
        (model["value"].to_numpy(), tokens),
        (champion["value"].to_numpy(), tokens),
        confidence=0.90,
    )
    assert result.test == "bootstrap" and result.difference_interval == expected
    assert result.significantly_better is (expected[1] < 0)


def test_significance_gate_pairs_examples_by_id_and_handles_a_loss() -> None:
    rng = np.random.default_rng(3)
    tokens = rng.integers(5, 30, 200).astype(float)
    champion = score_table(LOSS, "min", [f"e{i}" for i in range(200)],
                           tokens * rng.uniform(2.0, 3.0, 200), tokens)  # fmt: skip
    lower = champion.assign(value=champion["value"] * 0.9).iloc[::-1]  # other order, by id
    incumbent = registry.RegisteredVersion("m", "3", "run", {LOSS: 2.5})
    gate = GateConfig(LOSS, "min", 100.0, significance=0.05)
    assert check_gate({LOSS: 2.25}, gate, incumbent, None, lower, champion).passed
    same = champion.assign(value=champion["value"] * rng.uniform(0.97, 1.03, 200))
    assert not check_gate({LOSS: 2.5}, gate, incumbent, None, same, champion).passed


@pytest.mark.parametrize(
    ("model_ids", "champion_ids", "refusal"),
    [
        # No shared example (other test splits): refused with the counts, not a crash.
        ([f"x{i}" for i in range(50)], [f"q{i}" for i in range(50)],
         "share 0 held-out example(s) of finetuned_exact_match (the model has 50, the "
         "champion 50); at least 2"),
        (["q0", *(f"x{i}" for i in range(49))], [f"q{i}" for i in range(50)],
         "share 1 held-out example(s)"),
        # An id twice in a table: refused, never cross-joined.
        (["q0", "q0", "q1", *(f"q{i}" for i in range(3, 50))], [f"q{i}" for i in range(50)],
         "the model's per-example scores of finetuned_exact_match hold 1 id(s) more than once"),
        ([f"q{i}" for i in range(50)], ["q0", "q1", "q1", *(f"q{i}" for i in range(3, 50))],
         "the champion's per-example scores of finetuned_exact_match hold 1 id(s)"),
    ],
)  # fmt: skip
def test_a_comparison_that_cannot_be_made_fails_the_gate_with_its_reason(
    model_ids: list[str], champion_ids: list[str], refusal: str
) -> None:
    incumbent = registry.RegisteredVersion("m", "3", "run", {EXACT: 0.2})
    model = score_table(EXACT, "max", model_ids, np.ones(len(model_ids)))  # all right
    champion = score_table(EXACT, "max", champion_ids, np.zeros(len(champion_ids)))
    result = check_gate({EXACT: 1.0}, exact_gate(), incumbent, None, model, champion)
    assert not result.passed and result.significantly_better is False
    assert refusal in result.comparison_refused
    assert refusal in gate_reason(result) and "champion version 3" in gate_reason(result)


def test_scores_of_another_metric_are_never_compared() -> None:
    # The reviewer's case: the champion saved per-example losses; the gate is on exact match.
    ids = [f"q{i}" for i in range(400)]
    rng = np.random.default_rng(5)
    champion_hits, challenger_hits = rng.random(400) < 0.7, rng.random(400) < 0.3
    losses = score_table(LOSS, "min", ids, rng.uniform(0.5, 1.0, 400) * 20, 20.0)
    incumbent = registry.RegisteredVersion("m", "3", "run", {EXACT: 0.7})
    challenger = hits_table(challenger_hits)
    result = check_gate({EXACT: 0.3}, exact_gate(), incumbent, None, challenger, losses)
    assert not result.passed
    assert ("the champion's per-example scores are of finetuned_sft_test_loss, not of the gate "
            "metric finetuned_exact_match") in result.comparison_refused  # fmt: skip
    # With both metrics saved, the gate reads the champion's exact-match rows.
    both = pd.concat([losses, hits_table(champion_hits)])
    result = check_gate({EXACT: 0.3}, exact_gate(), incumbent, None, challenger, both)
    assert result.comparison_refused is None and result.significantly_better is False
    assert result.difference_interval[1] < 0  # shown worse, not better
    # A table saved before rows named their metric is refused, not guessed at.
    legacy = hits_table(champion_hits)[["id", "value", "weight"]]
    result = check_gate({EXACT: 0.3}, exact_gate(), incumbent, None, challenger, legacy)
    assert not result.passed and "name no metric" in result.comparison_refused


def test_template_clusters_are_resampled_whole_in_the_gate() -> None:
    rng = np.random.default_rng(9)
    ids = [f"q{i}" for i in range(240)]
    clusters = np.repeat([f"t{i}" for i in range(8)], 30)
    champion = score_table(EXACT, "max", ids, rng.random(240) < 0.5, 1.0, clusters)
    model = champion.assign(value=np.where(rng.random(240) < 0.15, 1.0, champion["value"]))
    incumbent = registry.RegisteredVersion("m", "3", "run", {EXACT: 0.5})
    result = check_gate({EXACT: 0.6}, exact_gate(), incumbent, None, model, champion)
    assert result.test == "cluster bootstrap" and result.p_value is None
    few = check_gate({EXACT: 0.6}, exact_gate(), incumbent, None, model.iloc[:90],
                     champion.iloc[:90])  # fmt: skip
    assert not few.passed and "at least 5 clusters" in few.comparison_refused


def test_significance_gate_without_a_champion_or_its_scores() -> None:
    better = hits_table(flipped(CHAMPION_HITS, 40, 0))
    first = check_gate({EXACT: 0.7}, exact_gate(), None, None, better)
    assert first.passed and first.significantly_better is None  # nothing to beat yet
    assert first.significance == 0.05  # the level asked for is recorded all the same
    incumbent = registry.RegisteredVersion("m", "3", "run", {EXACT: 0.6})
    unscored = check_gate({EXACT: 0.7}, exact_gate(), incumbent, None, better, None)
    assert unscored.significantly_better is False and not unscored.passed
    assert "has no per-example scores" in unscored.comparison_refused
    with pytest.raises(ConfigError, match="significance needs per-example scores of 'finetuned"):
        check_gate({EXACT: 0.7}, exact_gate(), incumbent, None, None, None)
    losses_only = hits_table(CHAMPION_HITS, LOSS)
    with pytest.raises(ConfigError, match="significance needs per-example scores"):
        check_gate({EXACT: 0.7}, exact_gate(), incumbent, None, losses_only, None)


def test_a_runs_table_artifact_reads_back(mlflow_store: str) -> None:
    table = hits_table(CHAMPION_HITS[:5])
    with mlflow.start_run() as run:
        mlflow.log_text(table.to_csv(index=False), "gate/examples.csv")
    pd.testing.assert_frame_equal(registry.run_table(run.info.run_id, "gate/examples.csv"),
                                  table)  # fmt: skip
    assert registry.run_table(run.info.run_id, "gate/none.csv") is None
    assert registry.run_table("", "gate/examples.csv") is None


def deploy_config(name: str, **kwargs) -> DeployConfig:
    gates = {"sft": GateConfig("loss", "min", 5.0), "classify": GateConfig("f1", "max", 0.5)}
    return DeployConfig(registered_model_name=name, gates=gates, max_new_tokens=4,
                        latency_requests=3, **kwargs)  # fmt: skip


def test_champion_challenger_and_int8_variant(
    mlflow_store: str, tmp_path: Path, tiny_model, tiny_tokenizer
) -> None:
    model_dir = tmp_path / "model"
    save_model(tiny_model, tiny_tokenizer, model_dir)
    cfg = deploy_config("test-chat")
    requests = ["hi", "what is AI?", "bye"]

    def run(metrics: dict[str, float], tags: dict[str, str]):
        with mlflow.start_run():
            mlflow.log_metrics(metrics)  # as the deploy stage does: the version's run has them
            return deploy(model_dir, finetuning_task("sft"), metrics, cfg, tags, requests)

    first = run({"loss": 4.0, "int8_loss": 4.01, "int8_loss_low": 3.9, "int8_loss_high": 4.2},
                {"lmpipe.run.finetune": "r1"})  # fmt: skip
    worse = run({"loss": 4.5}, {})  # passes the threshold, worse than the champion
    failed = run({"loss": 9.0}, {})  # fails the threshold
    better = run({"loss": 3.5}, {})
    client = MlflowClient()
    assert [d.alias for d in (first, worse, failed, better)] == [
        "champion",
        "challenger",
        "challenger",
        "champion",
    ]
    assert worse.gate["not_worse_than_champion"] is False and worse.gate["champion_version"] == "1"
    assert str(client.get_model_version_by_alias("test-chat", "champion").version) == "4"
    assert registry.aliased("test-chat", registry.CHALLENGER) is None  # the winner cleared it
    assert client.get_model_version("test-chat", "1").tags["lmpipe.run.finetune"] == "r1"
    assert client.get_model_version("test-chat", "2").tags["gate_passed"] == "False"
    assert registry.aliased("test-chat").metrics["loss"] == 3.5

    quantized, fp32 = first.variants["int8"], first.variants["fp32"]
    assert quantized["model_name"] == "test-chat-int8" and quantized["alias"] == "champion"
    assert 0 < quantized["size_bytes"] < fp32["size_bytes"]
    assert fp32["request_p50_seconds"] > 0 and quantized["request_p50_seconds"] > 0
    assert quantized["quality"] == 4.01 and quantized["quality_change"] == pytest.approx(0.01)
    assert (quantized["quality_low"], quantized["quality_high"]) == (3.9, 4.2)
    assert worse.variants["int8"]["alias"] == "challenger"  # no int8 score of its own
    int8 = mlflow.pyfunc.load_model("models:/test-chat-int8@champion")
    up_proj = int8.unwrap_python_model().model.model.layers[0].mlp.up_proj
    assert type(up_proj.weight).__name__ == "Int8Tensor"  # torchao's weight-only int8
    replies = int8.predict(pd.DataFrame({"prompt": ["hi"]}), params={"max_new_tokens": 3})
    assert len(replies) == 1 and isinstance(replies[0], str)

    served = mlflow.pyfunc.load_model("models:/test-chat@champion")
    replies = served.predict(pd.DataFrame({"prompt": ["hi", "bye"]}), params={"max_new_tokens": 3})
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert served.metadata.signature.inputs.input_names() == ["prompt", "messages"]


def test_classifier_deploys_and_answers_labels(
    mlflow_store: str, tmp_path: Path, tiny_model, tiny_tokenizer
) -> None:
    base = tmp_path / "base"
    save_model(tiny_model, tiny_tokenizer, base)
    model_dir = tmp_path / "classifier"
    save_model(load_classifier(base, ["noun.animal", "noun.food"]), tiny_tokenizer, model_dir)
    cfg = deploy_config(
        "test-classify", quantize=QuantizeConfig(variants=[]), champion_tolerance=0.05
    )

    def run(f1: float):
        with mlflow.start_run():
            mlflow.log_metrics({"f1": f1})  # the version's run has its metrics
            requests = ["a dog", "a pie"]
            return deploy(model_dir, finetuning_task("classify"), {"f1": f1}, cfg, {}, requests)

    result = run(0.7)
    assert result.alias == "champion" and result.smoke_output["label"] in ("noun.animal",
                                                                          "noun.food")  # fmt: skip
    # The classifier's gate is "max": higher is better, the tolerance counts downwards.
    worse, within, better = run(0.6), run(0.67), run(0.8)
    assert [worse.alias, within.alias, better.alias] == ["challenger", "champion", "champion"]
    assert worse.gate["not_worse_than_champion"] is False
    assert within.gate["champion_value"] == 0.7 and better.gate["champion_value"] == 0.67
    assert registry.aliased("test-classify").metrics["f1"] == 0.8
    served = mlflow.pyfunc.load_model("models:/test-classify@champion")
    out = served.predict(pd.DataFrame({"text": ["a small dog", "an apple pie"]}))
    assert list(out.columns) == ["label", "confidence"] and len(out) == 2
    assert set(out["label"]) <= {"noun.animal", "noun.food"}
    assert ((out["confidence"] > 0) & (out["confidence"] <= 1)).all()


def test_dynamic_int8_keeps_outputs_close_and_shrinks_linear_weights(tiny_model) -> None:
    import torch

    quantized = quantize_dynamic_int8(tiny_model)
    probe = torch.tensor([list(range(5, 21))])
    with torch.no_grad():
        reference, approx = tiny_model(input_ids=probe).logits, quantized(input_ids=probe).logits
    assert (reference - approx).abs().max() < 0.05 * reference.abs().max() + 1e-3
    assert state_size_bytes(quantized) < state_size_bytes(tiny_model)
    assert type(tiny_model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # a copy


def test_int8_variant_failing_its_own_threshold_is_only_the_challenger(
    mlflow_store: str, tmp_path: Path, tiny_model, tiny_tokenizer
) -> None:
    model_dir = tmp_path / "model"
    save_model(tiny_model, tiny_tokenizer, model_dir)
    with mlflow.start_run():
        result = deploy(model_dir, finetuning_task("sft"), {"loss": 3.0, "int8_loss": 7.0},
                        deploy_config("gated"), {}, ["hi"])  # fmt: skip
    assert result.alias == "champion" and result.variants["int8"]["alias"] == "challenger"
    assert registry.aliased("gated-int8", registry.CHAMPION) is None
    int8 = MlflowClient().get_model_version("gated-int8", result.variants["int8"]["version"])
    assert int8.tags["gate_passed"] == "False"


def test_the_smoke_request_is_a_held_out_problem_with_its_answer() -> None:
    from lmpipe.tasks.base import SmokeRequest

    frame = pd.DataFrame({"id": ["a", "b"], "prompt": ["1 + 2 =", "3 + 4 ="],
                          "answer": [3, 7], "generated": [True, True]})  # fmt: skip
    sft = finetuning_task("sft")
    assert sft.smoke_request(frame, DeployConfig()) == SmokeRequest("1 + 2 =", "3")
    chat = sft.smoke_request(frame.drop(columns="answer"), DeployConfig(smoke_prompt="Hi?"))
    assert chat == SmokeRequest("Hi?", None)  # nothing to check it against
