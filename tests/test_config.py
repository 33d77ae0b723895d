"""conf/ -> params.yaml composition, schema validation, stale-params detection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lmpipe.runs.config import (
    ConfigError,
    compose_params,
    conf_digest,
    stale_params_message,
    validate,
)
from lmpipe.stage import CONFIG_BASE_ENV, is_sweep, prepare_cli, split_argv
from lmpipe.tasks.finetuning import checked_task
from tests.conftest import REPO


def test_committed_params_equal_composition_of_conf(tmp_path: Path) -> None:
    composed = compose_params(REPO, output=tmp_path / "params.yaml")
    assert composed.read_text() == (REPO / "params.yaml").read_text(), (
        "params.yaml is stale: run `make params` and commit it"
    )


def test_params_record_the_digest_of_conf() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["conf_digest"] == conf_digest(REPO / "conf")
    assert stale_params_message(REPO) is None


def test_group_override_recomposes(tmp_path: Path) -> None:
    out = compose_params(REPO, ["model=llama-125m", "finetune.optim.lr=0.01"], tmp_path / "p.yaml")
    params = yaml.safe_load(out.read_text())
    assert params["model"]["preset"] == "llama-125m"
    assert params["model"]["hidden_size"] == 768
    assert params["finetune"]["optim"]["lr"] == 0.01


def test_committed_params_validate() -> None:
    cfg = validate(OmegaConf.load(REPO / "params.yaml"))
    assert cfg.finetune.optim.lr > 0


def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("finetune", "optim", {"lrr": 1e-3}, r"finetune\.optim\.lrr"),  # unknown key
        ("pretrain", "steps", "many", r"pretrain\.steps"),  # wrong type
        ("hardware", "precision", "fp8", r"hardware\.precision"),  # not an allowed choice
        ("clean", "dedup", {"threshold": 1.5}, r"clean\.dedup\.threshold.*\(0, 1\]"),  # range
        ("clean", "quality", {"max_top_ngram_fraction": {"two": 0.2}}, r"top_ngram.*\.two"),
        ("data", "text_unit", "sentence", r"data\.text_unit"),
        ("tokenize", "val_fraction", 0.0, r"tokenize\.val_fraction"),
        ("hardware", "strategy", "zero3", r"hardware\.strategy"),
        ("hardware", "launcher", "kubernetes", r"hardware\.launcher"),
        ("hardware", "peak_flops", -1.0, r"hardware\.peak_flops"),
        ("pretrain", "steps", -1, r"pretrain\.steps.*>= 0"),
        ("finetune", "steps", 0, r"finetune\.steps.*>= 1"),
        ("finetune", "grad_accum", 0, r"finetune\.grad_accum"),
        ("finetune", "early_stopping_patience", 0, r"early_stopping_patience"),
        ("finetune", "final_weights", "median", r"finetune\.final_weights"),
        ("finetune", "task", "regress", r"finetune\.task"),
        ("finetune", "dataset", "wordnet", r"finetune\.dataset.*not a sft dataset"),
        ("finetune", "dataset", "gsm8k", r"finetune\.dataset"),
        ("finetune", "reasoning_gym", {"generator": "sudoku"}, r"reasoning_gym\.generator"),
        ("finetune", "reasoning_gym", {"test_size": 0}, r"reasoning_gym\.test_size"),
        ("evaluate", "wikitext", {"max_bytes": 10}, r"evaluate\.wikitext\.max_bytes"),
        ("deploy", "gates", {"sft": {"significance": "high"}}, r"significance"),
        ("deploy", "gates", {"sft": {"significance": 0.7}}, r"gates\.sft\.significance.*0\.5"),
        ("finetune", "peft", {"r": 0}, r"finetune\.peft\.r"),
        ("finetune", "freeze_layers", -1, r"finetune\.freeze_layers"),
        ("finetune", "max_per_class", 1, r"finetune\.max_per_class"),
        ("deploy", "gates", {"sft": {"mode": "median"}}, r"deploy\.gates\.sft\.mode"),
        ("deploy", "champion_tolerance", -0.1, r"deploy\.champion_tolerance"),
        (
            "deploy",
            "sparsity",
            {"methods": ["magnitude", "random"]},
            r"deploy\.sparsity\.methods.*'random'",
        ),
    ],
)
def test_bad_value_fails_naming_the_key(section: str, key: str, value, named: str) -> None:
    bad = params()
    if isinstance(value, dict):
        bad[section][key].update(value)
    else:
        bad[section][key] = value
    with pytest.raises(ConfigError, match=named):
        checked_task(validate(bad))  # the schema's rules, then the task's (as stages run them)


def test_missing_required_value_fails_naming_key() -> None:
    bad = params()
    bad["data"]["paths"] = "???"
    with pytest.raises(ConfigError, match=r"data\.paths"):
        validate(bad)


def test_stale_params_name_the_fixing_command(project_copy: Path) -> None:
    tiny = project_copy / "conf" / "tokenize" / "default.yaml"
    tiny.write_text(tiny.read_text().replace("vocab_size: 8192", "vocab_size: 4096"))
    message = stale_params_message(project_copy)
    assert message is not None
    assert "make params" in message and "dvc exp run" in message
    compose_params(project_copy)
    assert stale_params_message(project_copy) is None
    assert (
        yaml.safe_load((project_copy / "params.yaml").read_text())["tokenize"]["vocab_size"] == 4096
    )


def test_prepare_cli_adds_hydra_dirs_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    argv = ["prog", "finetune.optim.lr=0.1", "hydra.run.dir=custom"]
    prepare_cli("finetune", argv)
    assert "hydra.run.dir=custom" in argv
    assert sum(a.startswith("hydra.run.dir=") for a in argv) == 1
    assert any(a.startswith("hydra.sweep.dir=multirun/finetune/") for a in argv)
    assert "hydra.job.name=finetune" in argv


@pytest.mark.parametrize(
    ("args", "flags", "overrides"),
    [
        (["model=x", "--cfg", "job"], ["--cfg", "job"], ["model=x"]),
        (["--cfg", "job", "model=x"], ["--cfg", "job"], ["model=x"]),
        (["-m", "model=a,b", "--info", "config"], ["-m", "--info", "config"], ["model=a,b"]),
        (["--info", "model=x"], ["--info"], ["model=x"]),
        (["--cfg=job", "a=1", "--resolve", "b=2"], ["--cfg=job", "--resolve"], ["a=1", "b=2"]),
    ],
)
def test_flags_go_before_the_overrides(args, flags, overrides) -> None:
    assert split_argv(args) == (flags, overrides)


def test_overrides_compose_from_conf_and_none_read_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(CONFIG_BASE_ENV, "unset")  # restored after the test
    argv = ["prog", "model=bert-tiny", "--cfg", "job"]
    prepare_cli("pretrain", argv)
    assert argv[1:3] == ["--cfg", "job"]
    assert argv[argv.index("--config-path") + 1] == str(REPO / "conf")
    assert argv[argv.index("--config-name") + 1] == "config"
    assert os.environ[CONFIG_BASE_ENV].startswith("conf/")
    argv = ["prog", "hydra.run.dir=x", "--cfg", "job"]  # Hydra's own settings only
    prepare_cli("pretrain", argv)
    assert "--config-path" not in argv and os.environ[CONFIG_BASE_ENV] == "params.yaml"


def test_a_direct_run_resolves_its_config_as_dvc_exp_run_would(tmp_path: Path) -> None:
    """`python -m stages.pretrain <overrides> --cfg job` prints what `dvc exp run -S` with the
    same overrides composes into params.yaml: group switches included."""
    import subprocess
    import sys

    overrides = ["model=bert-tiny", "finetune=classify", "pretrain.steps=7",
                 "data=local", "data.paths=[/data/*.txt]"]  # fmt: skip
    printed = subprocess.run(
        [sys.executable, "-m", "stages.pretrain", *overrides, "--cfg", "job", "--resolve"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    composed = compose_params(REPO, overrides, output=tmp_path / "params.yaml")
    assert yaml.safe_load(printed) == yaml.safe_load(composed.read_text())
    assert yaml.safe_load(printed)["model"]["family"] == "encoder"


@pytest.mark.parametrize("flag", ["--help", "--hydra-help"])
def test_help_lists_conf_groups_in_seconds(flag: str) -> None:
    """Help reads conf/, not params.yaml's directory (the project root), whose .venv and
    .git Hydra walked as config groups for minutes before printing anything."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "stages.clean", flag]
    printed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True,
                             timeout=60).stdout  # fmt: skip
    groups = "model: bert-base, bert-tiny, llama-125m" if flag == "--help" else "hydra/launcher:"
    assert groups in printed


def test_sweep_jobs_are_named_by_their_swept_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv(CONFIG_BASE_ENV, "unset")
    argv = ["prog", "-m", "experiment=smoke", "data.paths=[a,b]", "finetune.optim.lr=1e-3,4e-3"]
    prepare_cli("finetune", argv)
    assert "hydra.job.config.override_dirname.exclude_keys=[data.paths,experiment]" in argv
    assert [is_sweep(v) for v in ("1e-3,4e-3", "[a,b]", "range(1,4)", "'a,b'", "x")] == [
        True, False, True, False, False,
    ]  # fmt: skip


def test_an_old_lora_key_on_the_command_line_names_its_new_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"finetune\.peft\.method=lora"):
        prepare_cli("finetune", ["finetune.py", "finetune.lora.enabled=true"])
