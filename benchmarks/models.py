"""What the fine-tuning benchmarks share: the config they compose, the base models they
start from (the demo's pretrained model, or SmolLM2-135M-Instruct saved once as a
transformers directory under benchmarks/.data), a fine-tuning run cached by its config and
starting model, and how a paired difference is shown."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from lmpipe.data.tokenizer import base_tokenizer, load_tokenizer
from lmpipe.runs.config import validate
from lmpipe.runs.keys import directory_digest, key_of
from lmpipe.runs.processes import process_env
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.base import FinetuningTask
from lmpipe.tasks.finetuning import finetuning_task, prepare_finetuning
from lmpipe.tasks.sft import MOST_FREQUENT, RETRIEVAL, TASK_SETTINGS
from lmpipe.training.loop import seed_everything, train
from lmpipe.training.model import load_base, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / ".data"
CPU = torch.device("cpu")
log = logging.getLogger("benchmarks")


@dataclass
class Trained:
    """A fine-tuned model directory, the wall and CPU seconds it took (sampling included;
    those of its first run where it was reused), its training metrics' means, and the
    table of the data it derived from its starting model (judged samples), if any."""

    path: Path
    seconds: float
    cpu_seconds: float
    means: dict[str, float] = field(default_factory=dict)
    table: object = None


def trained(
    f: DictConfig, cfg: DictConfig, base: Path, home: Path, task: FinetuningTask
) -> Trained:
    """`task` trained by `f` from `base` (its data first derived from `base`, as the finetune
    stage does: preference pairs, a round's verified replies) into a directory under `home`
    named by the config and the starting model, reused when there."""
    settings = OmegaConf.to_container(f, resolve=True)
    for group in TASK_SETTINGS:  # other methods' settings: a change to them keeps the run
        if group != f.task:
            settings.pop(group, None)
    key = key_of({"f": settings, "seed": cfg.seed, "base": directory_digest(base),
                  "task": task.name})  # fmt: skip
    out = home / f"{f.task}-{f.steps}-{key}"
    record = out / "benchmark.json"
    tokenizer = load_tokenizer(base)
    if record.is_file():
        log.info("reusing %s", out)
        saved = json.loads(record.read_text())
        _, table = task.prepare(f, base, tokenizer, CPU, DATA / "derived-data", process_env(),
                                seed=cfg.seed)  # fmt: skip  # cached: read back
        return Trained(out, saved["seconds"], saved["cpu_seconds"], saved["means"], table)
    seed_everything(cfg.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    prepared, table = task.prepare(f, base, tokenizer, CPU, DATA / "derived-data",
                                   process_env(), seed=cfg.seed)  # fmt: skip
    setup = prepare_finetuning(f, base, tokenizer, cfg.seed, CPU, task=prepared)
    metrics = MetricLogger(None)
    train(setup.model, setup.batches, setup.config, cfg.hardware, CPU, metrics, setup.evaluate,
          desc=f"{f.task} {out.name}", objective=setup.objective,
          step_hook=setup.adapters.step_hook if setup.adapters else None)  # fmt: skip
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    save_model(setup.final_model(), tokenizer, out)
    rows = metrics.state_dict().get("train", [])
    names = {name for row in rows for name in row} - {"step"}
    means = {n: sum(r[n] for r in rows if n in r) / sum(n in r for r in rows) for n in names}
    record.write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                                  "means": means}))  # fmt: skip
    return Trained(out, seconds, cpu_seconds, means, table)


def config(overrides: list[str]) -> DictConfig:
    """conf/ composed with `overrides` and checked against the schema."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return validate(compose("config", overrides))


def base_model(name: str, cfg: DictConfig) -> Path:
    """The starting model as a transformers directory: `tiny` is the demo's pretrained model
    (outputs/pretrain/model), any other name `cfg.model.init_from`, saved once."""
    if name == "tiny":
        path = ROOT / "outputs" / "pretrain" / "model"
        if not path.is_dir():
            sys.exit("no outputs/pretrain/model: run `make demo` first")
        return path
    path = DATA / cfg.model.init_from
    if not (path / "model.safetensors").is_file():
        tokenizer = base_tokenizer(cfg.model.init_from)
        save_model(load_base(cfg.model.init_from), tokenizer, path)
    return path


def paired_cell(row: dict, name: str) -> str:
    """The paired difference `name` of a report row (lmpipe.evaluation.intervals.
    paired_binary_summary): its exact interval and McNemar's one-sided p that it is better."""
    if name not in row:
        return ""
    return (f"{row[name]:+.3f} [{row[name + '_low']:+.3f}, {row[name + '_high']:+.3f}], "
            f"p={row[name + '_p_better']:.3f}")  # fmt: skip


def scores(cfg: DictConfig, models: dict[str, Path]) -> tuple[dict, dict, pd.DataFrame]:
    """Exact match with interval of each model and baseline on the test split, each
    model's per-problem hits (for paired differences) and the predictions (SFT's)."""
    sft = finetuning_task("sft")
    f = cfg.finetune
    splits = sft.splits(f)
    tokenizer = load_tokenizer(next(iter(models.values())))
    loaded = {label: load_model(path) for label, path in models.items()}
    frame = sft.predict(loaded, tokenizer, splits, f, cfg.evaluate)
    metrics = sft.score(frame, list(models), splits)
    hits = {}
    for label in [*models, RETRIEVAL, MOST_FREQUENT]:
        per_problem = sft.example_scores(frame, f"{label}_exact_match")
        if per_problem is not None:
            hits[label] = per_problem["value"].to_numpy()
    table = {
        label: {key: metrics[f"{label}_exact_match{key}"] for key in ("", "_low", "_high")}
        for label in [*models, RETRIEVAL, MOST_FREQUENT]
    }
    return table, hits, frame
