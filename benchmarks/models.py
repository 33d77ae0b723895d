"""What the fine-tuning benchmarks share: the config they compose, the base models they
start from (the demo's pretrained model, or SmolLM2-135M-Instruct saved once as a
transformers directory under benchmarks/.data), and how a paired difference is shown."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lmpipe.data.tokenizer import base_tokenizer
from lmpipe.runs.config import validate
from lmpipe.training.model import load_base, save_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / ".data"


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
