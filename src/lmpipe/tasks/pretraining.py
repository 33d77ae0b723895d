"""The pretraining objective of a model family (`model.family`)."""

from __future__ import annotations

from lmpipe.runs.config import ConfigError, PretrainConfig
from lmpipe.tasks.base import PretrainingTask
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.tasks.masked_lm import MaskedLM


def pretraining_task(family: str, p: PretrainConfig, seed: int) -> PretrainingTask:
    """The pretraining objective of a model family."""
    if family == MaskedLM.family:
        return MaskedLM(p.mlm, seed)
    if family == CausalLM.family:
        return CausalLM()
    raise ConfigError(f"invalid value for 'model.family': {family!r}")
