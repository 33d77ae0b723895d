"""Preference optimisation: learn from pairs of a preferred (chosen) and a dispreferred
(rejected) reply to the same prompt.

The loss (`finetune.preference.loss`: DPO, IPO, SLiC, rDPO, SimPO, ORPO, each optionally
with RPO's NLL term) is lmpipe.training.pair_losses's.
The reference is the starting model, frozen: its log-probs are computed once, before
training, and cached with the pairs (so LoRA needs no second model and no adapter
switching). Log-probs are fp32. A pair's two replies share a micro-batch, and the loop
weighs every pair the same across accumulation and processes (target = pair).

Pairs (`finetune.preference.pairs`): `spin` and `verifier` are built from the starting
model's own replies (lmpipe.feedback.pairs); `files` reads users' .jsonl
(lmpipe.taskdata.pairs). Either way the table, with the reference's log-probs, is cached
per starting model and written to pairs.parquet. Held out, spin and verifier models are
scored on every held-out problem of the dataset (answer accuracy where answers are
checkable), not only on those that made a pair.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Mapping, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data.batches import ordered_examples, shuffled_examples
from lmpipe.evaluation.lm_metrics import eval_mode
from lmpipe.evaluation.plots import preference_figure
from lmpipe.feedback.pairs import spin_pairs, verifier_pairs
from lmpipe.runs.config import (
    ConfigError,
    EvaluateConfig,
    FinetuneConfig,
    HardwareConfig,
    PreferenceConfig,
)
from lmpipe.runs.keys import directory_digest, keyed_path
from lmpipe.runs.processes import DistEnv
from lmpipe.selection.candidates import Candidate
from lmpipe.taskdata import conversations
from lmpipe.taskdata import pairs as pref
from lmpipe.tasks.base import (
    FinetuningTask,
    Report,
    TrainingSetup,
    cached_table,
    chosen,
    reference_by_split,
)
from lmpipe.tasks.sft import (
    SFT,
    VERIFIABLE_DATASETS,
    conversation_splits,
    selection_candidate,
    sft_phase_config,
)
from lmpipe.training.logprobs import reference_logps, reply_logps
from lmpipe.training.loop import policy_numerics
from lmpipe.training.model import load_model, model_device
from lmpipe.training.pair_losses import (
    PreferenceLoss,
    pair_loss,
    pair_metrics,
    preference_losses,
    reward_accuracy,
)

log = logging.getLogger(__name__)

# Where pair tables are cached (outputs/finetune/...): outside DVC's outs, so a change of
# beta or lr reuses the generated replies and the reference's log-probs.
CACHE_DIR = "finetune/pairs-cache"
PAIRS_FILE = "pairs.parquet"
# Bump when what a cached table holds changes meaning.
PAIRS_VERSION = 3  # 2: pairs keep their checkable answer; 3: samples seeded per batch


def encoded_splits(
    tokenizer: PreTrainedTokenizerBase, splits: Mapping[str, Sequence[pref.Pair]], max_len: int
) -> dict[str, list[pref.PairExample]]:
    return {split: pref.encode_pairs(tokenizer, pairs, max_len) for split, pairs in splits.items()}


def _cache_path(
    cache_dir: Path, base: Path, f: FinetuneConfig | DictConfig, seed: int,
    numerics: Mapping[str, object],
) -> Path:  # fmt: skip
    """The cached pairs of one starting model and one way of building them: the reference's
    log-probs also depend on how the policy is computed (`numerics`) and on the training's
    micro-batch size (the shapes they are computed in)."""
    p = f.preference
    files = []
    if p.pairs == "files":
        files = [hashlib.md5(path.read_bytes()).hexdigest()
                 for path in pref.expand_paths(p.files)]  # fmt: skip
    key = {
        "version": PAIRS_VERSION,
        "pairs": p.pairs,
        "files": files,
        "max_pairs": p.max_pairs,
        "max_held_out_pairs": p.max_held_out_pairs,
        "max_new_tokens": p.max_new_tokens,
        "max_len": f.max_len,
        "val_fraction": f.val_fraction,
        "test_fraction": f.test_fraction,
        "batch_size": f.batch_size,
        "numerics": dict(numerics),
    }
    if p.pairs != "files":  # the conversations the pairs are built from
        key |= {"dataset": f.dataset, "language": f.language}
        if f.dataset == "reasoning_gym":
            key["reasoning_gym"] = OmegaConf.to_container(OmegaConf.structured(f.reasoning_gym))
    if p.pairs == "verifier":
        key |= {"samples": p.samples, "temperature": p.temperature, "seed": seed}
    if not pair_loss(p.loss).needs_reference:  # a table without the reference's log-probs
        key["reference"] = False
    return keyed_path(cache_dir, {"base": directory_digest(base), **key}, ".parquet")


def held_out_conversations(
    f: FinetuneConfig | DictConfig, pairs: Mapping[str, Sequence[pref.Pair]]
) -> dict[str, list[conversations.Conversation]]:
    """What SFT's metrics score: with checkable answers, every problem of finetune.dataset
    when the pairs were built from it (spin, verifier), also those that made no pair, so
    that dropping the problems the model always solves cannot inflate its accuracy; else
    the pairs' prompts with their chosen replies."""
    if Preference().answers_checkable(f):
        return conversation_splits(f)
    return {name: [p.conversation for p in items] for name, items in pairs.items()}


class Preference(SFT):
    """Preference optimisation of a causal LM; evaluated like SFT (held-out response loss,
    chrF and ROUGE-L of greedy replies) plus reward accuracy and margin on held-out pairs.

    Its data are pairs that may derive from the starting model (spin, verifier), so the task
    is made with them: `prepare` (finetune) builds them and `held_out` (evaluate, deploy)
    reads them back, each returning a Preference made with its pairs and the loss whose
    rewards are reported; `Preference()` alone is the task before it has any."""

    name = "preference"
    data_file = PAIRS_FILE
    data_cache = CACHE_DIR

    def __init__(
        self,
        pairs: Mapping[str, list[pref.Pair]] | None = None,
        loss: PreferenceConfig | DictConfig | None = None,
    ) -> None:
        self.pairs = dict(pairs) if pairs is not None else None
        self.loss = loss if loss is not None else PreferenceConfig()

    def answers_checkable(self, f: FinetuneConfig | DictConfig) -> bool:
        """Pairs built from a verifiable dataset (spin, verifier) are scored on its problems;
        pairs from files on their prompts and chosen replies."""
        return f.preference.pairs != "files" and f.dataset in VERIFIABLE_DATASETS

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        f = cfg.finetune
        p, key = f.preference, "finetune.preference"
        if p.pairs == "files" and not p.files:
            raise ConfigError(f"'{key}.pairs' is files but '{key}.files' lists none")
        if p.pairs != "files" and p.files:
            raise ConfigError(f"'{key}.files' is set but '{key}.pairs' is {p.pairs}: set "
                              f"{key}.pairs=files to train on them")  # fmt: skip
        if p.pairs == "verifier" and f.dataset not in VERIFIABLE_DATASETS:
            raise ConfigError(f"'{key}.pairs' is verifier, which needs answers a program can "
                              f"check: finetune.dataset={f.dataset} has none (allowed: "
                              f"{VERIFIABLE_DATASETS})")  # fmt: skip
        pair_loss(p.loss)  # names the key and the known losses when unknown
        if f.packing:
            raise ConfigError(
                "finetune.packing: preference pairs are not packed (a pair's two replies "
                "share a micro-batch); set finetune.packing=false"
            )

    def supervised_task(self) -> FinetuningTask:
        """SFT on the same conversations: a pair loss needs a reference for every reply."""
        return SFT()

    def sft_first(self, f: FinetuneConfig | DictConfig) -> DictConfig | None:
        """`sft_steps` of SFT at `sft_lr` (lmpipe.tasks.sft.sft_phase_config)."""
        return sft_phase_config(f, f.preference.sft_steps, f.preference.sft_lr)

    def disables_dropout(self, f: FinetuneConfig) -> bool:
        # policy = reference at step 0: no random forward passes (TRL does the same)
        return f.preference.disable_dropout

    # -- data ------------------------------------------------------------------------------

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
    ) -> tuple[Preference, pd.DataFrame]:
        """Build (or read from the cache) the pairs with the reference's log-probs of the
        starting model `base`, computed as `hardware` computes the policy: the task made
        with them, and their table for pairs.parquet. `seed` draws the verifier's samples."""
        hardware = hardware or HardwareConfig()
        table = cached_table(
            _cache_path(cache_dir, base, f, seed, policy_numerics(hardware, device)),
            lambda: pref.pairs_table(self._build(f, base, tokenizer, device, hardware, seed)),
            env, "preference: pairs and reference log-probs",
        )  # fmt: skip
        pairs = pref.pairs_from_table(table)
        log.info("preference: %s pairs", ", ".join(f"{len(v)} {k}" for k, v in pairs.items()))
        return Preference(pairs, f.preference), table

    def _build(
        self,
        f: FinetuneConfig | DictConfig,
        base: Path,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        hardware: HardwareConfig,
        seed: int,
    ) -> dict[str, list[pref.Pair]]:
        p = f.preference
        model = load_model(base).to(device)
        if p.pairs == "files":
            pairs, bad = pref.read_pair_files(list(p.files))
            splits = pref.split_pairs(pairs, f.val_fraction, f.test_fraction)
            splits["train"] = pref.stable_sample(splits["train"], p.max_pairs)
            log.info("preference: %d pairs read, %d bad records skipped", len(pairs),
                     sum(bad.values()))  # fmt: skip
        elif p.pairs == "verifier":
            splits = verifier_pairs(model, tokenizer, SFT.splits(self, f), p, device, seed)
        else:
            splits = spin_pairs(model, tokenizer, SFT.splits(self, f), p, device)
        if not pair_loss(p.loss).needs_reference:
            return splits  # the reference log-probs stay empty
        encoded = encoded_splits(tokenizer, splits, f.max_len)
        compute = partial(reference_logps, batch_size=f.batch_size,
                          pad_id=tokenizer.pad_token_id, device=device,
                          width=pref.fixed_width(*encoded.values()))  # fmt: skip
        return reference_by_split(model, hardware, device, encoded, compute)

    def splits(self, f: FinetuneConfig) -> dict[str, list[pref.Pair]]:
        if self.pairs is None:
            raise RuntimeError("Preference() has no pairs: use the task that prepare "
                               "(finetune) or held_out (evaluate) returns")  # fmt: skip
        return self.pairs

    def held_out(self, f: FinetuneConfig, finetune_dir: Path) -> Preference:
        return Preference(pref.read_pairs_table(finetune_dir / PAIRS_FILE), f.preference)

    def candidates(self, f: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> list[Candidate]:
        """Selection judges a pair by its prompt and chosen reply."""
        found = (selection_candidate(tokenizer, pair.conversation, f.max_len)
                 for pair in self.splits(f)["train"])  # fmt: skip
        return [c for c in found if c is not None]

    # -- training --------------------------------------------------------------------------

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
        encoded = encoded_splits(tokenizer, self.splits(f), f.max_len)
        train = chosen(encoded["train"], train_ids)
        val = encoded["val"]
        p = f.preference
        # The shapes the reference's log-probs were computed in (`_build`).
        collate = partial(pref.collate_pairs, pad_id=tokenizer.pad_token_id,
                          with_reference=pair_loss(p.loss).needs_reference,
                          width=pref.fixed_width(*encoded.values()))  # fmt: skip

        def validate(m: torch.nn.Module) -> dict[str, float]:
            batches = ordered_examples(val, f.batch_size, collate)
            return pair_metrics(m, (b for _, b in zip(range(f.eval_batches), batches,
                                                        strict=False)), p, device)  # fmt: skip

        batches = shuffled_examples(train, f.batch_size, collate, seed, rank, world_size)
        counts = {"train_pairs": len(train), "val_pairs": len(val)}
        return TrainingSetup(model, batches, PreferenceLoss(p), validate if val else None, counts)

    # -- evaluation ------------------------------------------------------------------------

    def predict(
        self,
        models: Mapping[str, PreTrainedModel],
        tokenizer: PreTrainedTokenizerBase,
        splits: Mapping[str, Sequence[pref.Pair]],
        f: FinetuneConfig,
        e: EvaluateConfig,
    ) -> pd.DataFrame:
        """SFT's table on the held-out pairs' prompts and chosen replies (response loss,
        greedy replies, the retrieval baseline), plus each model's log-probs of both replies
        of every pair beside the reference's."""
        frame = super().predict(models, tokenizer, held_out_conversations(f, splits), f, e)
        by_id = {p.id: p for p in splits["test"]}
        # A held-out problem without a pair (the model solved it in every sample) is scored
        # like any other; its pair cells stay empty.
        pair_of = [by_id.get(i) for i in frame["id"]]
        examples = pref.encode_pairs(tokenizer, [p for p in pair_of if p is not None], f.max_len)
        index = {ex.pair.id: row for row, ex in enumerate(examples)}
        rows = [index.get(i) for i in frame["id"]]
        for column, field in (("rejected", "rejected"), ("ref_chosen_logp", "ref_chosen"),
                              ("ref_rejected_logp", "ref_rejected")):  # fmt: skip
            frame[column] = [getattr(p, field) if p is not None else None for p in pair_of]
        collate = partial(pref.collate_pairs, pad_id=tokenizer.pad_token_id, with_reference=False)
        for label, model in models.items():
            columns = {"chosen_logp": [], "rejected_logp": [], "chosen_tokens": [],
                       "rejected_tokens": []}  # fmt: skip
            device = model_device(model)
            with torch.no_grad(), eval_mode(model):
                for batch in ordered_examples(examples, e.batch_size, collate):
                    logps, tokens = reply_logps(model, {k: v.to(device) for k, v in batch.items()})
                    half = len(logps) // 2
                    columns["chosen_logp"] += logps[:half].tolist()
                    columns["rejected_logp"] += logps[half:].tolist()
                    columns["chosen_tokens"] += tokens[:half].tolist()
                    columns["rejected_tokens"] += tokens[half:].tolist()
            for name, values in columns.items():
                target = f"{label}_{name}" if "logp" in name else name
                frame[target] = [np.nan if r is None else values[r] for r in rows]
        return frame

    def score(
        self, frame: pd.DataFrame, models: Sequence[str], splits: Mapping[str, list]
    ) -> dict[str, float]:
        """SFT's metrics, and per model on the held-out pairs: reward accuracy (the share of
        pairs whose chosen reply earns the higher reward, ties counting half) and mean
        margin, under the training loss's own rewards, and how often the model gives the
        chosen reply the higher log-prob itself (no reference); beside them the accuracy of
        preferring the shorter reply."""
        metrics = super().score(frame, models, splits)
        # A pair with a reply cut away by max_len has empty cells (the CSV keeps them empty),
        # and so do the reference's log-probs for a loss that needs none.
        references = pair_loss(self.loss.loss).needs_reference
        names = [
            *(["ref_chosen_logp", "ref_rejected_logp"] if references else []),
            "chosen_tokens",
            "rejected_tokens",
            *(f"{m}_{side}_logp" for m in models for side in ("chosen", "rejected")),
        ]
        numbers = frame[names].apply(pd.to_numeric, errors="coerce").dropna()  # fmt: skip
        metrics["preference_test_pairs"] = len(numbers)
        if numbers.empty:
            raise ValueError("no held-out preference pair fits finetune.max_len")

        def column(name: str) -> torch.Tensor:
            if name not in numbers:  # an empty reference column: never read by the loss
                return torch.zeros(len(numbers), dtype=torch.float64)
            return torch.tensor(numbers[name].to_numpy(dtype=np.float64))

        # The skeptic's baseline: prefer the shorter reply (ties half), no model at all.
        metrics["shorter_reply_accuracy"] = reward_accuracy(
            column("rejected_tokens") - column("chosen_tokens")
        )

        for label in models:
            _, chosen_rewards, rejected_rewards = preference_losses(
                self.loss, column(f"{label}_chosen_logp"),
                column(f"{label}_rejected_logp"), column("ref_chosen_logp"),
                column("ref_rejected_logp"), column("chosen_tokens"), column("rejected_tokens"),
            )  # fmt: skip
            margins = chosen_rewards - rejected_rewards
            metrics[f"{label}_reward_accuracy"] = reward_accuracy(margins)
            metrics[f"{label}_reward_margin"] = float(margins.mean())
            metrics[f"{label}_logp_accuracy"] = float(
                (numbers[f"{label}_chosen_logp"] > numbers[f"{label}_rejected_logp"]).mean()
            )
        return metrics

    def report(
        self,
        frame: pd.DataFrame,
        metrics: Mapping[str, float],
        models: Sequence[str],
        e: EvaluateConfig,
    ) -> Report:
        report = super().report(frame, metrics, models, e)
        report.figures["preference_tradeoff.png"] = preference_figure(metrics, models)
        return report
