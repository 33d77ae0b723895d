"""Supervised fine-tuning: a causal LM with the loss on the assistant's turns only (prompt
tokens are labelled -100), on chat pairs (`finetune.dataset=chatterbot`) or on problems with
checkable answers (`reasoning_gym`).

Held-out replies are scored by what the data allows: exact-match accuracy of the final
answer where a program can check it (with bootstrap intervals, beside the most frequent
training answer and the answer of the most similar training question), else chrF and
ROUGE-L against the reference reply (beside the retrieved reply)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.evaluation.answers import final_answer, is_correct, normalize
from lmpipe.evaluation.baselines import retrieval_replies
from lmpipe.evaluation.intervals import proportion_interval, ratio_interval
from lmpipe.evaluation.lm_metrics import mean_loss, perplexity
from lmpipe.evaluation.paired import score_table
from lmpipe.evaluation.plots import loss_comparison_figure
from lmpipe.evaluation.scoring import example_losses, reply_scores
from lmpipe.feedback.rollouts import generate_replies
from lmpipe.runs.config import DeployConfig, EvaluateConfig, FinetuneConfig, GateConfig
from lmpipe.selection.candidates import Candidate
from lmpipe.taskdata import chatterbot, conversations, noise, reasoning_gym
from lmpipe.taskdata.conversations import Conversation
from lmpipe.tasks.base import (
    FinetuningTask,
    Report,
    Serving,
    SmokeRequest,
    TrainingSetup,
    chosen,
)
from lmpipe.tasks.causal_lm import NextTokenLoss
from lmpipe.training.model import load_model, model_device


def selection_candidate(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_len: int
) -> Candidate | None:
    """The conversation as data selection judges it; None if it has no target in max_len."""
    example = conversations.encode_conversation(tokenizer, conversation.messages, max_len,
                                                conversation.last_turn_only)  # fmt: skip
    if example is None:
        return None
    turns = tuple(m["content"] for m in conversation.messages)
    exchanges = tuple(
        (m["content"], reply["content"])
        for m, reply in zip(conversation.messages, conversation.messages[1:], strict=False)
        if m["role"] == "user" and reply["role"] == "assistant"
    )
    alone = conversations.responses_alone(tokenizer, conversation.messages, example)
    return Candidate(conversation.id, turns, exchanges, example, alone)


# The baselines' column prefixes in the predictions table and their metrics: the reply to
# the most similar training prompt, and (checkable answers) the most frequent training answer.
RETRIEVAL = "retrieval"
MOST_FREQUENT = "most_frequent"
# The gate metric where answers are checkable.
EXACT_MATCH_GATE = "finetuned_exact_match"


# The datasets of conversations whose replies end in an answer a program can check
# (lmpipe.evaluation.answers): scored by exact match, and judged by the verifier's pairs.
VERIFIABLE_DATASETS = ("reasoning_gym",)


def _reasoning_gym(f: FinetuneConfig, every_problem: bool = False) -> dict[str, list[Conversation]]:
    g = f.reasoning_gym
    sizes = {"train": g.train_size, "val": g.val_size, "test": g.test_size}
    splits = reasoning_gym.load_splits(g.generator, sizes, g.seed, g.options, f.val_fraction,
                                       f.test_fraction, g.worked)  # fmt: skip
    if g.noise_share:
        splits["train"] = noise.with_noise(splits["train"], g.noise_share, g.noise_kind, g.seed)
    if g.demonstrations is not None and not every_problem:
        splits["train"] = splits["train"][: g.demonstrations]
    return splits


def _chatterbot(f: FinetuneConfig) -> dict[str, list[Conversation]]:
    return conversations.split_conversations(chatterbot.load_chatterbot(f.language),
                                             f.val_fraction, f.test_fraction)  # fmt: skip


# finetune.dataset -> its train/val/test conversations, disjoint by prompt (chatterbot) or
# by question and template (reasoning_gym).
CONVERSATION_SOURCES = {"chatterbot": _chatterbot, "reasoning_gym": _reasoning_gym}


def conversation_splits(f: FinetuneConfig) -> dict[str, list[Conversation]]:
    """train/val/test conversations of `f.dataset`."""
    return CONVERSATION_SOURCES[f.dataset](f)


def problem_splits(f: FinetuneConfig | DictConfig) -> dict[str, list[Conversation]]:
    """conversation_splits with every training problem in train: what the methods that
    sample replies and judge them by the answer alone draw from. Under
    finetune.reasoning_gym.demonstrations SFT's train split keeps only the first N worked
    replies, and these methods learn from the remaining problems through the checker (their
    reference replies are never read: methods that fall back on them, the verifier pairs
    and KTO, draw from conversation_splits)."""
    if f.dataset == "reasoning_gym":
        return _reasoning_gym(f, every_problem=True)
    return conversation_splits(f)


# finetune.* groups of one task's own settings: an SFT phase before that task leaves them
# out, so that a change to them reuses the phase (and tasks with one phase share it).
TASK_SETTINGS = ("preference", "kto", "rejection_sampling", "grpo", "self_correction")


def sft_phase_config(f: FinetuneConfig | DictConfig, steps: int, lr: float) -> DictConfig | None:
    """`steps` of SFT at `lr` on finetune.dataset, the rest of finetune.* shared, before a
    task that learns from its own replies (lmpipe.tasks FinetuningTask.sft_first); None
    for no steps."""
    if not steps:
        return None
    settings = OmegaConf.to_container(OmegaConf.structured(f), resolve=True)
    for group in TASK_SETTINGS:
        settings.pop(group, None)
    settings |= {"task": "sft", "steps": steps, "epochs": None}
    settings["selection"]["steps"] = []
    settings["optim"]["lr"] = lr
    return OmegaConf.create(settings)


def most_frequent_answer(conversations: Sequence[Conversation]) -> str:
    """The commonest normalised answer of `conversations` (ties: the smallest, for a
    deterministic pick)."""
    counts = Counter(normalize(c.answer) for c in conversations if c.answer is not None)
    if not counts:
        raise ValueError("no answers in the training split to take the most frequent of")
    return min(counts, key=lambda answer: (-counts[answer], answer))


def clusters_of(frame: pd.DataFrame) -> pd.Series | None:
    """The predictions' cluster per row (the template a problem came from), or None where
    problems are independent."""
    if "cluster" not in frame or not (frame["cluster"].astype(str) != "").any():
        return None
    return frame["cluster"].astype(str)


def exact_match_scores(frame: pd.DataFrame, labels: Sequence[str]) -> dict[str, float]:
    """Per label (a model or a baseline, its replies in `<label>_reply`): the share of rows
    whose reply's final answer is the row's answer, and its 95% interval (`_low`, `_high`):
    exact (Clopper–Pearson) for independent problems, a cluster bootstrap over templates
    where the problems came from a few; for all but the most frequent answer, the share of
    replies with an answer."""
    answers = frame["answer"].astype(str).tolist()
    clusters = clusters_of(frame)
    metrics: dict[str, float] = {}
    for label in labels:
        replies = frame[f"{label}_reply"].astype(str).tolist()
        hits = np.array([is_correct(r, a) for r, a in zip(replies, answers, strict=True)], float)
        if clusters is None:
            low, high = proportion_interval(hits)
        else:
            low, high = ratio_interval(hits, np.ones(len(hits)), clusters)
        metrics |= {
            f"{label}_exact_match": float(hits.mean()),
            f"{label}_exact_match_low": low,
            f"{label}_exact_match_high": high,
        }
        if label != MOST_FREQUENT:
            parsed = [final_answer(r) is not None for r in replies]
            metrics[f"{label}_answered"] = float(np.mean(parsed))
    return metrics


class SFT(NextTokenLoss, FinetuningTask):
    name = "sft"
    datasets = tuple(CONVERSATION_SOURCES)
    gate_metric = "finetuned_sft_test_loss"
    gate_threshold = 6.0
    serving = Serving("prompt", generates=True, output_example=["a reply"])
    before_tuning_is_comparable = True

    def serve(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: list[Any],
        params: Mapping[str, Any],
    ) -> list[str]:
        """One reply per prompt (a single user turn, or a list of chat messages), as
        `params` set the generation."""
        return generate_replies(
            model,
            tokenizer,
            texts,
            max_new_tokens=int(params["max_new_tokens"]),
            do_sample=bool(params["do_sample"]),
            temperature=float(params["temperature"]),
            top_p=float(params["top_p"]),
            min_new_tokens=int(params["min_new_tokens"]),
        )

    def splits(self, f: FinetuneConfig) -> dict[str, list[Conversation]]:
        return conversation_splits(f)

    def answers_checkable(self, f: FinetuneConfig | DictConfig) -> bool:
        """Whether the held-out replies are scored by exact match of a checkable answer."""
        return f.dataset in VERIFIABLE_DATASETS

    def default_gate(self, f: FinetuneConfig | DictConfig | None) -> GateConfig:
        """With checkable answers: exact match, better than the retrieval baseline and
        significantly better than the champion (McNemar, one-sided 5%); else the held-out
        response loss at most 6 nats."""
        if f is not None and self.answers_checkable(f):
            return GateConfig(EXACT_MATCH_GATE, baseline=f"{RETRIEVAL}_exact_match",
                              significance=0.05)  # fmt: skip
        return super().default_gate(f)

    def candidates(self, f: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> list[Candidate]:
        found = (selection_candidate(tokenizer, c, f.max_len) for c in self.splits(f)["train"])
        return [c for c in found if c is not None]

    def scoring_model(self, base: Path) -> PreTrainedModel:
        return load_model(base)  # with its LM head: IFD scores responses

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
        model = load_model(base)
        splits = self.splits(f)
        train = chosen(splits["train"], train_ids)
        train_examples = conversations.encode_all(tokenizer, train, f.max_len)
        val_examples = conversations.encode_all(tokenizer, splits["val"], f.max_len)
        pad = tokenizer.pad_token_id

        def val_loss(m: torch.nn.Module) -> float:
            val_batches = conversations.ordered_batches(val_examples, f.batch_size, pad)
            return mean_loss(m, val_batches, device, f.eval_batches)[0]

        batches = conversations.shuffled_batches(
            train_examples, f.batch_size, pad, seed, rank, world_size,
            packing_len=f.max_len if f.packing else None,
        )  # fmt: skip
        counts = {"train_examples": len(train_examples), "val_examples": len(val_examples)}
        if f.packing:
            counts["train_rows"] = batches.num_items
        return TrainingSetup(model, batches, self, val_loss, counts)

    def load(self, path: Path) -> PreTrainedModel:
        return load_model(path)

    def predict(
        self,
        models: Mapping[str, PreTrainedModel],
        tokenizer: PreTrainedTokenizerBase,
        splits: Mapping[str, Sequence[Conversation]],
        f: FinetuneConfig,
        e: EvaluateConfig,
    ) -> pd.DataFrame:
        """Per test conversation: each model's summed response loss and, for the first
        `e.num_generations` (all by default), its greedy reply to the opening prompt beside
        the retrieval baseline's (the reply to the most similar training prompt) and, with
        checkable answers, the most frequent training answer. Each model runs on the device
        it is on (an int8 variant on the CPU beside a model on a GPU)."""
        test = splits["test"]
        encode = conversations.encode_conversation
        pairs = [(c, encode(tokenizer, c.messages, f.max_len)) for c in test]
        pairs = [(c, ex) for c, ex in pairs if ex is not None]
        if not pairs:
            raise ValueError("no held-out SFT examples with a response within finetune.max_len")
        examples = [ex for _, ex in pairs]
        frame = pd.DataFrame(
            {
                "id": [c.id for c, _ in pairs],
                "prompt": [c.prompt for c, _ in pairs],
                "reference": [c.messages[1]["content"] for c, _ in pairs],
            }
        )
        if all(c.answer is not None for c, _ in pairs):
            frame["answer"] = [c.answer for c, _ in pairs]
        if any(c.cluster for c, _ in pairs):  # problems drawn from templates
            frame["cluster"] = [c.cluster or "" for c, _ in pairs]
        answered = len(frame) if e.num_generations is None else min(e.num_generations, len(frame))
        frame["generated"] = np.arange(len(frame)) < answered
        prompts = frame["prompt"].tolist()[:answered]
        generation = {"max_new_tokens": e.max_new_tokens, "do_sample": e.do_sample,
                      "temperature": e.temperature, "top_p": e.top_p,
                      "batch_size": e.batch_size}  # fmt: skip
        for label, model in models.items():
            device = model_device(model)
            sums, counts = example_losses(
                model,
                conversations.ordered_batches(examples, e.batch_size, tokenizer.pad_token_id),
                device,
            )
            frame[f"{label}_loss"] = sums
            frame["target_tokens"] = counts
            replies = generate_replies(model, tokenizer, prompts, device=device, **generation)
            frame[f"{label}_reply"] = replies + [""] * (len(frame) - len(replies))
        train = splits["train"]
        replies_to = [c.messages[1]["content"] for c in train]
        retrieved = retrieval_replies([c.prompt for c in train], replies_to, prompts)
        frame[f"{RETRIEVAL}_reply"] = retrieved + [""] * (len(frame) - len(retrieved))
        if "answer" in frame:
            frame[f"{MOST_FREQUENT}_reply"] = most_frequent_answer(train)
        return frame

    def score(
        self, frame: pd.DataFrame, models: Sequence[str], splits: Mapping[str, list]
    ) -> dict[str, float]:
        """Token-weighted held-out response loss (and perplexity) of each model; then, with
        checkable answers, each model's and each baseline's exact-match accuracy with its
        interval, else chrF and ROUGE-L of the replies (over every held-out prompt and over
        the distinct ones, `*_distinct`)."""
        tokens = frame["target_tokens"].sum()
        answered = frame[frame["generated"]]
        metrics: dict[str, float] = {"sft_test_examples": len(frame),
                                     "sft_test_generations": len(answered)}  # fmt: skip
        for label in models:
            loss = float(frame[f"{label}_loss"].sum() / tokens)
            metrics[f"{label}_sft_test_loss"] = loss
            metrics[f"{label}_sft_test_perplexity"] = perplexity(loss)
        if "answer" in frame:
            return metrics | exact_match_scores(answered, [*models, RETRIEVAL, MOST_FREQUENT])
        # The held-out split repeats conversations (121 of chatterbot's 194 test prompts are
        # one prompt): *_distinct scores each distinct prompt once, its first reply against
        # every reference it has.
        distinct = answered.groupby("prompt", sort=False)
        references = distinct["reference"].agg(lambda refs: list(dict.fromkeys(refs)))
        metrics["sft_test_distinct_prompts"] = len(references)
        for label in [*models, RETRIEVAL]:
            scores = reply_scores(answered[f"{label}_reply"].tolist(),
                                  answered["reference"].tolist())  # fmt: skip
            metrics |= {f"{label}_{name}": value for name, value in scores.items()}
            first = distinct[f"{label}_reply"].first()
            scores = reply_scores(first.tolist(), references.loc[first.index].tolist())
            metrics |= {f"{label}_{name}_distinct": value for name, value in scores.items()}
        return metrics

    def example_scores(self, frame: pd.DataFrame, metric: str) -> pd.DataFrame | None:
        """A model's answer right (1) or not per answered problem (`<model>_exact_match`),
        clustered by template where the problems came from templates; or its summed
        response loss over its target tokens per example (`<model>_sft_test_loss`)."""
        if metric.endswith("_exact_match") and "answer" in frame:
            rows = frame[frame["generated"]]
            replies = rows[f"{metric.removesuffix('_exact_match')}_reply"].astype(str)
            hits = [is_correct(r, str(a)) for r, a in zip(replies, rows["answer"], strict=True)]
            return score_table(metric, "max", rows["id"], hits, 1.0, clusters_of(rows))
        if metric.endswith("_sft_test_loss"):
            losses = frame[f"{metric.removesuffix('_sft_test_loss')}_loss"]
            return score_table(metric, "min", frame["id"], losses, frame["target_tokens"],
                               clusters_of(frame))  # fmt: skip
        return None

    def example_metrics(self, frame: pd.DataFrame) -> list[str]:
        return ["finetuned_sft_test_loss", *([EXACT_MATCH_GATE] if "answer" in frame else [])]

    def smoke_request(self, frame: pd.DataFrame, d: DeployConfig | DictConfig) -> SmokeRequest:
        """With checkable answers, the first held-out problem, its answer checked."""
        if "answer" not in frame or frame.empty:
            return super().smoke_request(frame, d)
        first = frame.iloc[0]
        return SmokeRequest(str(first["prompt"]), str(first["answer"]))

    def report(
        self,
        frame: pd.DataFrame,
        metrics: Mapping[str, float],
        models: Sequence[str],
        e: EvaluateConfig,
    ) -> Report:
        """Each model's per-example response loss, and the first replies side by side."""
        per_example = {m: frame[f"{m}_loss"] / frame["target_tokens"] for m in models}
        figure = loss_comparison_figure(per_example, "Held-out response loss per example")
        shown = frame[frame["generated"]].head(e.shown_generations)
        columns = ["prompt", "reference", *(["answer"] if "answer" in frame else []),
                   *(f"{m}_reply" for m in [*models, RETRIEVAL])]  # fmt: skip
        return Report({"sft_test_loss.png": figure}, {"generations.json": shown[columns]})
