"""Rejection-sampling fine-tuning, also called expert iteration: the model learns from its own
replies that the answer checker verifies (STaR, Zelikman et al. 2022; RFT, Yuan et al. 2023;
ReST-EM, Singh et al. 2023).

A round (`finetune.rejection_sampling`, R rounds in one finetune stage):
1. the current model answers each training problem `samples` times (lmpipe.feedback.
   rollouts: seeded, batched, shared by the processes); never a val or test problem;
2. the judge (lmpipe.feedback.judge) keeps the distinct correct replies (their stated steps
   right too, under `check_steps`), at most `max_per_problem` per problem; with `hints`
   (STaR's rationalization) a problem no sample solved gets one more attempt with its
   answer in the prompt, and a correct reply is kept as the reply to the question without
   the hint;
3. SFT on the kept replies (with the reference solutions too under `references`: RFT) for
   finetune.steps steps, from the current model, or from the starting model each round
   under `restart=base` (ReST-EM).

The stage runs the rounds (stages/finetune.py): every round but the last trains into a
cached phase of its own, resumable like any training, and the samples of each round are
cached per sampling model, so a stage killed mid-round resumes there. The samples of every
round are saved to samples.parquet, and each round's solve rate, kept examples, distinct
correct replies per problem and hint share go to MLflow at step = round.
Held out, the model is scored as SFT's: exact match on every test problem.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.feedback import rollouts
from lmpipe.feedback.judge import judge
from lmpipe.runs.config import (
    ConfigError,
    FinetuneConfig,
    HardwareConfig,
    RejectionSamplingConfig,
)
from lmpipe.runs.keys import directory_digest, keyed_path
from lmpipe.runs.processes import DistEnv
from lmpipe.taskdata import pairs as pref
from lmpipe.taskdata.conversations import Conversation
from lmpipe.tasks.base import TrainingSetup, cached_table
from lmpipe.tasks.sft import (
    SFT,
    VERIFIABLE_DATASETS,
    conversation_splits,
    problem_splits,
    sft_phase_config,
)
from lmpipe.training.model import load_model

log = logging.getLogger(__name__)

KEY = "finetune.rejection_sampling"
CACHE_DIR = "finetune/samples-cache"
SAMPLES_FILE = "samples.parquet"
SAMPLES_VERSION = 2  # bump when what a cached table holds changes meaning
RESTARTS = ("current", "base")
# The hinted attempts draw from a stream of their own, apart from the round's samples.
HINT_SEED_OFFSET = 1 << 20
COLUMNS = ["round", "id", "prompt", "reply", "answer", "cluster", "sample", "correct",
           "distinct", "kept", "hinted"]  # fmt: skip


def hinted_prompt(question: str, answer: str) -> str:
    """STaR's rationalization prompt: the question with its answer given."""
    return f"{question}\n\n(The answer is {answer}. Show the working that leads to it.)"


def judged_samples(
    problems: Sequence[Conversation],
    groups: Sequence[Sequence[rollouts.Completion]],
    max_per_problem: int | None,
    check_steps: bool = False,
) -> pd.DataFrame:
    """One row per sampled reply: whether it is correct (its stated steps too, with
    `check_steps`), the first of its text among its problem's replies, and kept for training
    (correct, distinct, within the cap)."""
    rows = []
    for problem, group in zip(problems, groups, strict=True):
        seen: set[str] = set()
        kept = 0
        for index, completion in enumerate(group):
            text = " ".join(completion.text.split())
            correct = judge(completion.text, problem.answer, check_steps).correct
            distinct = text not in seen
            seen.add(text)
            keep = correct and distinct and (max_per_problem is None or kept < max_per_problem)
            kept += keep
            rows.append({"id": problem.id, "prompt": problem.prompt, "reply": completion.text,
                         "answer": problem.answer, "cluster": problem.cluster or "",
                         "sample": index, "correct": correct, "distinct": distinct,
                         "kept": keep, "hinted": False})  # fmt: skip
    return pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "round"])


def round_metrics(table: pd.DataFrame) -> dict[str, float]:
    """A round's figures: the share of problems with a correct sample (solve rate), of
    samples correct, kept examples, distinct correct replies per problem and the share of
    kept examples that came from a hinted attempt."""
    samples = table[~table["hinted"]]
    per_problem = samples.groupby("id", sort=False)
    kept = table[table["kept"]]
    distinct_correct = samples[samples["correct"] & samples["distinct"]].groupby("id").size()
    problems = per_problem.size().index
    return {
        "solve_rate": float(per_problem["correct"].any().mean()),
        "sample_accuracy": float(samples["correct"].mean()),
        "kept_examples": float(len(kept)),
        "distinct_correct_per_problem": float(
            distinct_correct.reindex(problems, fill_value=0).mean()
        ),
        "hint_share": float(kept["hinted"].mean()) if len(kept) else 0.0,
    }


class RejectionSampling(SFT):
    """SFT on the model's own verified replies, round after round; scored as SFT's.

    `prepare` (finetune) samples and judges one round from the model it is given and returns
    the task made with the kept replies; `RejectionSampling()` alone is the task before any
    round, which evaluate and deploy score like SFT on the dataset's held-out problems."""

    name = "rejection_sampling"
    key = KEY  # where its settings are: the config errors name it
    data_file = SAMPLES_FILE
    data_cache = CACHE_DIR

    def __init__(self, kept: Sequence[Conversation] | None = None) -> None:
        self.kept = list(kept) if kept is not None else None

    def settings(self, f: FinetuneConfig | DictConfig) -> RejectionSamplingConfig:
        """The task's own settings group of finetune.*."""
        return f.rejection_sampling

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        f = cfg.finetune
        r, key = self.settings(f), self.key
        if f.dataset not in VERIFIABLE_DATASETS:
            raise ConfigError(f"finetune.task={self.name} keeps the replies an answer checker "
                              f"verifies: finetune.dataset={f.dataset} has no checkable answers "
                              f"(allowed: {VERIFIABLE_DATASETS})")  # fmt: skip
        for name in ("rounds", "samples", "max_new_tokens", "batch_size"):
            if r[name] < 1:
                raise ConfigError(f"'{key}.{name}' must be at least 1, got {r[name]}")
        for name in ("max_prompts", "max_per_problem"):
            if r[name] is not None and r[name] < 1:
                raise ConfigError(f"'{key}.{name}' must be at least 1 or null, got {r[name]}")
        if r.restart not in RESTARTS:
            raise ConfigError(f"invalid value for '{key}.restart': {r.restart!r} "
                              f"(allowed: {list(RESTARTS)})")  # fmt: skip
        if r.temperature <= 0:
            raise ConfigError(f"'{key}.temperature' must be > 0 (greedy replies repeat one "
                              f"reply k times), got {r.temperature}")  # fmt: skip

    def sft_first(self, f: FinetuneConfig | DictConfig) -> DictConfig | None:
        r = self.settings(f)
        return sft_phase_config(f, r.sft_steps, r.sft_lr)

    def saved_data(self, tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
        return samples_table(tables)

    def round_metrics(self, table: pd.DataFrame) -> dict[str, float]:
        return round_metrics(table)

    def rounds(self, f: FinetuneConfig | DictConfig) -> int:
        return self.settings(f).rounds

    def round_start(self, f: FinetuneConfig | DictConfig, start: Path, current: Path) -> Path:
        return start if self.settings(f).restart == "base" else current

    def splits(self, f: FinetuneConfig) -> dict[str, list[Conversation]]:
        splits = conversation_splits(f)
        if self.kept is not None:
            splits["train"] = self.kept
        return splits

    def setup(
        self,
        f: FinetuneConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        train_ids: Collection[str] | None = None,
    ) -> TrainingSetup:
        if self.kept is None:
            raise RuntimeError(f"{type(self).__name__}() has no round's data: train the task "
                               "that prepare (finetune) returns")  # fmt: skip
        return super().setup(f, base, tokenizer, seed, device, rank, world_size, train_ids)

    def prepare(
        self,
        f: FinetuneConfig | DictConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        cache_dir: Path,
        env: DistEnv,
        hardware: HardwareConfig | None = None,
        seed: int = 0,
    ) -> tuple[RejectionSampling, pd.DataFrame]:
        """A round sampled from `base` (cached per sampling model and settings): the task
        made with its kept replies, and the judged samples."""
        r = self.settings(f)
        key = {
            "version": SAMPLES_VERSION,
            "task": self.name,
            "model": directory_digest(base),
            "settings": OmegaConf.to_container(OmegaConf.structured(r), resolve=True),
            "dataset": f.dataset,
            "reasoning_gym": OmegaConf.to_container(OmegaConf.structured(f.reasoning_gym)),
            "val_fraction": f.val_fraction,
            "test_fraction": f.test_fraction,
            "seed": seed,
        }
        table = cached_table(keyed_path(cache_dir, key, ".parquet"),
                             lambda: self._sample(f, base, tokenizer, device, seed), env,
                             f"{self.name}: the round's judged samples")  # fmt: skip
        return type(self)(self._kept(f, table)), table

    def _sample(
        self, f: FinetuneConfig | DictConfig, base: Path, tokenizer: PreTrainedTokenizerBase,
        device: torch.device, seed: int,
    ) -> pd.DataFrame:  # fmt: skip
        r = self.settings(f)
        problems, model, sampling, groups = self._draw(f, base, tokenizer, device, seed,
                                                       "rejection sampling")  # fmt: skip
        table = judged_samples(problems, groups, r.max_per_problem, r.check_steps)
        if r.hints:
            solved = set(table.loc[table["correct"], "id"])
            unsolved = [p for p in problems if p.id not in solved]
            hinted = rollouts.sample(model, tokenizer,
                                     [hinted_prompt(p.prompt, p.answer) for p in unsolved], 1,
                                     sampling, seed + HINT_SEED_OFFSET, r.batch_size, device,
                                     "rejection sampling: hinted attempts")  # fmt: skip
            extra = judged_samples(unsolved, hinted, r.max_per_problem, r.check_steps)
            extra["hinted"] = True  # its prompt column is the question without the hint
            table = pd.concat([table, extra], ignore_index=True)
        metrics = round_metrics(table)
        log.info("rejection sampling: %.1f%% of problems solved, %d replies kept (%.1f%% from "
                 "hints)", 100 * metrics["solve_rate"], metrics["kept_examples"],
                 100 * metrics["hint_share"])  # fmt: skip
        return table

    def _draw(
        self, f: FinetuneConfig | DictConfig, base: Path, tokenizer: PreTrainedTokenizerBase,
        device: torch.device, seed: int, what: str,
    ) -> tuple[list[Conversation], PreTrainedModel, rollouts.Sampling,
               list[list[rollouts.Completion]]]:  # fmt: skip
        """A round's training problems (never val or test), the model that samples, how it
        samples, and its `samples` replies to each problem."""
        r = self.settings(f)
        problems = pref.stable_sample(problem_splits(f)["train"], r.max_prompts)
        model = load_model(base).to(device)
        sampling = rollouts.Sampling(r.max_new_tokens, r.temperature, r.top_p, min_new_tokens=1)
        log.info("%s: %d replies to each of %d training problems (temperature %g, %d tokens)",
                 what, r.samples, len(problems), r.temperature, r.max_new_tokens)  # fmt: skip
        groups = rollouts.sample(model, tokenizer, [p.prompt for p in problems], r.samples,
                                 sampling, seed, r.batch_size, device, what)  # fmt: skip
        return problems, model, sampling, groups

    def _kept(self, f: FinetuneConfig | DictConfig, table: pd.DataFrame) -> list[Conversation]:
        """The training conversations of a round: each kept reply as the reply to its
        problem, after the reference solutions under `references`."""
        kept = [
            Conversation(f"{row.id}:rs{'h' if row.hinted else ''}{row.sample}",
                         [{"role": "user", "content": row.prompt},
                          {"role": "assistant", "content": row.reply}],
                         answer=row.answer, cluster=row.cluster or None)
            for row in table[table["kept"]].itertuples()
        ]  # fmt: skip
        return self._with_references(f, kept, table)

    def _with_references(
        self, f: FinetuneConfig | DictConfig, kept: list[Conversation], table: pd.DataFrame
    ) -> list[Conversation]:
        """The reference solutions (under `references`) and then `kept`; none at all is
        refused, naming the keys that would give some."""
        references = conversation_splits(f)["train"] if self.settings(f).references else []
        if not kept and not references:
            key = self.key
            raise ConfigError(
                f"{self.name} kept no reply: none of the {table['id'].nunique()} problems' "
                f"{len(table)} samples was right, and '{key}.references' is false; start from "
                f"a model that solves some ('{key}.sft_steps'), sample more ('{key}.samples') "
                f"or train on the references too"
            )
        return [*references, *kept]


def samples_table(rounds: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Every round's judged samples, with the round number (1-based), for samples.parquet."""
    if not rounds:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    frames = [t.assign(round=np.int64(i)) for i, t in enumerate(rounds, start=1)]
    return pd.concat(frames, ignore_index=True)[COLUMNS]
