"""Self-correction from words back: the model learns to revise a first attempt after a
second user turn, from its own revisions that the answer checker verifies (ILF, Scheurer et
al. 2023, with the verifier's words as the feedback; the two-turn setting of SCoRe, Kumar et
al. 2024). The turns themselves are lmpipe.feedback.revisions'.

A round (`finetune.self_correction`, R rounds in one finetune stage, run as rejection
sampling's):
1. the current model answers each training problem `samples` times (never a val or test
   problem); the judge gives each first attempt its verdict;
2. each first attempt that gets a second turn (`feedback`: outcome or step words after a
   wrong one; retry after every one) is answered `revisions` times more, in the
   conversation question, attempt, words;
3. the distinct correct revisions (at most `max_per_problem` per problem) become two-turn
   training conversations whose loss is on the revision alone, after the reference
   solutions (`references`), which keep the first attempt trained too. With
   `reference_revisions`, a first attempt no revision fixed gets the reference solution
   as its revision (STaR's rationalization, for the second turn).

Held out, the model is scored as SFT's (exact match at the first attempt), and then
answered again after each kind of second turn: accuracy at attempt 2, Δi→c and Δc→i with
their intervals, with the verifier's words (outcome, step) and without them (retry).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.feedback import revisions, rollouts
from lmpipe.feedback.judge import judge
from lmpipe.runs.config import (
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    SelfCorrectionConfig,
)
from lmpipe.taskdata.conversations import Conversation
from lmpipe.tasks.base import Report
from lmpipe.tasks.rejection_sampling import RejectionSampling
from lmpipe.tasks.sft import RETRIEVAL, clusters_of, conversation_splits
from lmpipe.training.model import model_device

log = logging.getLogger(__name__)

KEY = "finetune.self_correction"
# The revisions draw from a stream of their own, apart from the round's first attempts.
REVISION_SEED_OFFSET = 1 << 21
COLUMNS = ["round", "id", "prompt", "answer", "cluster", "sample", "first", "first_correct",
           "turn", "revised", "revision", "correct", "distinct", "kept"]  # fmt: skip


def judged_revisions(
    problems: Sequence[Conversation],
    firsts: Sequence[Sequence[rollouts.Completion]],
    kind: str,
    revised: Sequence[Sequence[rollouts.Completion]],
    max_per_problem: int | None,
    check_steps: bool = False,
) -> pd.DataFrame:
    """One row per revision of a first attempt that got a second turn (`revised`: their
    groups, in the order of `problems` and their first attempts), and one per first attempt
    that got none (`revised` false): whether the revision is correct (its stated steps too,
    with `check_steps`; the first attempt is judged by its answer, as held out), the first
    of its (attempt, revision) among its problem's, and kept for training."""
    rows, groups = [], iter(revised)
    for problem, group in zip(problems, firsts, strict=True):
        seen: set[tuple[str, str]] = set()
        kept = 0
        for index, first in enumerate(group):
            verdict = judge(first.text, problem.answer)
            turn = revisions.second_turn(verdict, kind)
            row = {"id": problem.id, "prompt": problem.prompt, "answer": problem.answer,
                   "cluster": problem.cluster or "", "sample": index, "first": first.text,
                   "first_correct": verdict.correct, "turn": turn or "",
                   "revised": turn is not None}  # fmt: skip
            if turn is None:
                rows.append(row | {"revision": "", "correct": False, "distinct": False,
                                   "kept": False})  # fmt: skip
                continue
            for revision in next(groups):
                text = (" ".join(first.text.split()), " ".join(revision.text.split()))
                correct = judge(revision.text, problem.answer, check_steps).correct
                distinct = text not in seen
                seen.add(text)
                keep = correct and distinct and (max_per_problem is None
                                                 or kept < max_per_problem)  # fmt: skip
                kept += keep
                rows.append(row | {"revision": revision.text, "correct": correct,
                                   "distinct": distinct, "kept": keep})  # fmt: skip
    if next(groups, None) is not None:
        raise ValueError("more revision groups than first attempts with a second turn")
    return pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "round"])


def _share(values: pd.Series) -> float:
    return float(values.astype(bool).mean()) if len(values) else 0.0


def round_metrics(table: pd.DataFrame) -> dict[str, float]:
    """A round's figures: the share of first attempts right, of revisions right after a
    wrong and after a right first attempt, the kept examples and the share of problems with
    one."""
    firsts = table.drop_duplicates(["id", "sample"])
    revised = table[table["revised"].astype(bool)]
    first_right = revised["first_correct"].astype(bool)
    kept = table[table["kept"].astype(bool)]
    return {
        "first_attempt_accuracy": _share(firsts["first_correct"]),
        "revisions": float(len(revised)),
        "revision_accuracy_after_wrong": _share(revised.loc[~first_right, "correct"]),
        "revision_accuracy_after_right": _share(revised.loc[first_right, "correct"]),
        "kept_examples": float(len(kept)),
        "problems_with_kept_revision": kept["id"].nunique() / max(table["id"].nunique(), 1),
    }


def reference_revisions(
    table: pd.DataFrame, problems: Sequence[Conversation]
) -> list[Conversation]:
    """For each distinct first attempt that got a second turn and no kept revision, the
    conversation question, attempt, words back, with the problem's reference solution as
    the revision (STaR's rationalization, for the second turn: what the model could not yet
    write itself), trained on that revision alone."""
    reference = {p.id: p.messages[-1]["content"] for p in problems}
    revised = table[table["revised"].astype(bool)]
    kept = revised[revised["kept"].astype(bool)]
    seen = {(i, " ".join(first.split())) for i, first in zip(kept["id"], kept["first"],
                                                            strict=True)}  # fmt: skip
    out = []
    for row in revised.drop_duplicates(["id", "sample"]).itertuples():
        text = (row.id, " ".join(row.first.split()))
        if text in seen or row.id not in reference:
            continue
        seen.add(text)
        out.append(Conversation(
            f"{row.id}:scr{row.sample}",
            [*revisions.revision_messages(row.prompt, row.first, row.turn),
             {"role": "assistant", "content": reference[row.id]}],
            answer=row.answer, cluster=row.cluster or None, last_turn_only=True,
        ))  # fmt: skip
    return out


def corrections_table(rounds: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Every round's judged revisions, with the round number (1-based), for samples.parquet."""
    if not rounds:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    frames = [t.assign(round=np.int64(i)) for i, t in enumerate(rounds, start=1)]
    return pd.concat(frames, ignore_index=True)[COLUMNS]


class SelfCorrection(RejectionSampling):
    """SFT on the model's own verified revisions after words back; scored as SFT's, then at
    a second attempt after each kind of second turn."""

    name = "self_correction"
    key = KEY

    def settings(self, f: FinetuneConfig | DictConfig) -> SelfCorrectionConfig:
        return f.self_correction

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        s = cfg.finetune.self_correction
        if s.revisions < 1:
            raise ConfigError(f"'{KEY}.revisions' must be at least 1, got {s.revisions}")
        if s.feedback not in revisions.TURN_KINDS:
            raise ConfigError(f"invalid value for '{KEY}.feedback': {s.feedback!r} "
                              f"(allowed: {list(revisions.TURN_KINDS)})")  # fmt: skip

    def saved_data(self, tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
        return corrections_table(tables)

    def round_metrics(self, table: pd.DataFrame) -> dict[str, float]:
        return round_metrics(table)

    def _sample(
        self, f: FinetuneConfig | DictConfig, base: Path, tokenizer: PreTrainedTokenizerBase,
        device: torch.device, seed: int,
    ) -> pd.DataFrame:  # fmt: skip
        s = self.settings(f)
        problems, model, sampling, firsts = self._draw(
            f, base, tokenizer, device, seed, "self-correction: first attempts"
        )
        log.info("self-correction: %d revisions after each %s turn", s.revisions, s.feedback)
        conversations = []
        for problem, group in zip(problems, firsts, strict=True):
            for first in group:
                turn = revisions.second_turn(judge(first.text, problem.answer), s.feedback)
                if turn is not None:
                    conversations.append(
                        revisions.revision_messages(problem.prompt, first.text, turn)
                    )
        revised = rollouts.sample(model, tokenizer, conversations, s.revisions, sampling,
                                  seed + REVISION_SEED_OFFSET, s.batch_size, device,
                                  "self-correction: revisions")  # fmt: skip
        table = judged_revisions(problems, firsts, s.feedback, revised, s.max_per_problem,
                                 s.check_steps)  # fmt: skip
        metrics = round_metrics(table)
        log.info("self-correction: %.1f%% of revisions after a wrong attempt right, %d kept",
                 100 * metrics["revision_accuracy_after_wrong"],
                 metrics["kept_examples"])  # fmt: skip
        return table

    def _kept(self, f: FinetuneConfig | DictConfig, table: pd.DataFrame) -> list[Conversation]:
        """Each kept revision as a two-turn conversation trained on its last turn, after the
        reference solutions under `references`."""
        kept = [
            Conversation(f"{row.id}:sc{row.sample}-{index}",
                         [*revisions.revision_messages(row.prompt, row.first, row.turn),
                          {"role": "assistant", "content": row.revision}],
                         answer=row.answer, cluster=row.cluster or None,
                         last_turn_only=True)
            for index, row in enumerate(table[table["kept"].astype(bool)].itertuples())
        ]  # fmt: skip
        if self.settings(f).reference_revisions:
            kept += reference_revisions(table, conversation_splits(f)["train"])
        return self._with_references(f, kept, table)

    def predict(
        self,
        models: Mapping[str, PreTrainedModel],
        tokenizer: PreTrainedTokenizerBase,
        splits: Mapping[str, Sequence[Conversation]],
        f: FinetuneConfig,
        e: EvaluateConfig,
    ) -> pd.DataFrame:
        """SFT's predictions, and each model's greedy second attempt after each kind of
        second turn (`<model>_<kind>_turn`, `<model>_<kind>_revision`)."""
        frame = super().predict(models, tokenizer, splits, f, e)
        answered = frame[frame["generated"]]
        sampling = rollouts.Sampling(e.max_new_tokens)
        for label, model in models.items():
            for kind in revisions.TURN_KINDS:
                attempts = revisions.two_attempts(
                    model, tokenizer, answered["prompt"].tolist(),
                    answered["answer"].astype(str).tolist(), kind, sampling, model_device(model),
                    e.batch_size, firsts=answered[f"{label}_reply"].tolist(),
                )  # fmt: skip
                rest = [""] * (len(frame) - len(attempts))
                frame[f"{label}_{kind}_turn"] = [a.turn or "" for a in attempts] + rest
                frame[f"{label}_{kind}_revision"] = [a.second for a in attempts] + rest
        return frame

    def score(
        self, frame: pd.DataFrame, models: Sequence[str], splits: Mapping[str, list]
    ) -> dict[str, float]:
        """SFT's scores, and per model and kind of second turn its attempt-1 and attempt-2
        accuracy, Δi→c and Δc→i with intervals (`<model>_<kind>_attempt2`, ...)."""
        metrics = super().score(frame, models, splits)
        answered = frame[frame["generated"]]
        answers = answered["answer"].astype(str).tolist()
        clusters = clusters_of(answered)
        for label in models:
            firsts = answered[f"{label}_reply"].astype(str).tolist()
            first = [judge(r, a).correct for r, a in zip(firsts, answers, strict=True)]
            for kind in revisions.TURN_KINDS:
                seconds = answered[f"{label}_{kind}_revision"].astype(str).tolist()
                second = [judge(r, a).correct for r, a in zip(seconds, answers, strict=True)]
                metrics |= revisions.correction_scores(
                    first, second, f"{label}_{kind}",
                    None if clusters is None else clusters.tolist())  # fmt: skip
        return metrics

    def report(
        self,
        frame: pd.DataFrame,
        metrics: Mapping[str, float],
        models: Sequence[str],
        e: EvaluateConfig,
    ) -> Report:
        """SFT's report, its generations table with each model's second attempts."""
        report = super().report(frame, metrics, models, e)
        shown = frame[frame["generated"]].head(e.shown_generations)
        columns = ["prompt", "answer", *(f"{m}_reply" for m in [*models, RETRIEVAL]),
                   *(f"{m}_{k}_{part}" for m in models for k in revisions.TURN_KINDS
                     for part in ("turn", "revision"))]  # fmt: skip
        report.tables["generations.json"] = shown[columns]
        return report
