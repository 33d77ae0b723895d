"""Selection for a fine-tuning task: its candidates, the starting model's cached scores,
then the configured steps (lmpipe.selection.steps)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.runs.processes import DistEnv
from lmpipe.selection.candidates import Candidate
from lmpipe.selection.scoring import ScoreCache, cached_scores, score_candidates
from lmpipe.selection.steps import Selection, needs_scores, select_examples
from lmpipe.training.loop import device_numerics


class SelectableTask(Protocol):
    """What selection needs of a fine-tuning task (lmpipe.tasks.base.FinetuningTask)."""

    def candidates(self, f: DictConfig, tokenizer: PreTrainedTokenizerBase) -> list[Candidate]: ...

    def scoring_model(self, base: Path) -> PreTrainedModel: ...


# Where the scores of starting models are cached, under the outputs directory: outside
# DVC's outs (a rerun of finetune keeps them) and shared by the jobs of a sweep.
CACHE_DIR = "finetune/selection-scores"


def select_for_task(
    task: SelectableTask,
    f: DictConfig,
    base: Path,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
    seed: int,
    cache_dir: Path,
    env: DistEnv,
) -> Selection:
    """The task's training examples as `f.selection` selects them (all of them when it is
    off). Scores of the starting model `base` are cached in `cache_dir`."""
    s = f.selection
    candidates = task.candidates(f, tokenizer)
    cache = ScoreCache(cache_dir, base, device_numerics(device)) if needs_scores(s) else None

    def score(chosen: Sequence[Candidate], losses: bool) -> pd.DataFrame:
        model = task.scoring_model(base).to(device)
        return score_candidates(model, chosen, s.batch_size, tokenizer.pad_token_id, device,
                                losses)  # fmt: skip

    def cached(chosen: Sequence[Candidate], losses: bool) -> pd.DataFrame:
        assert cache is not None
        return cached_scores(chosen, losses, cache, score, env.is_main)

    return select_examples(candidates, s, cached, seed)
