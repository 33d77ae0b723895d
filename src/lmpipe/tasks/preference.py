"""Preference optimisation: learn from pairs of a preferred (chosen) and a dispreferred
(rejected) reply to the same prompt.

Losses (`finetune.preference.loss`), with Δ = (log π(y_c) − log π_ref(y_c)) −
(log π(y_r) − log π_ref(y_r)) over each reply's summed token log-probs:
  sigmoid  DPO: −log σ(βΔ)
  hinge    SLiC / RSO: max(0, 1 − βΔ)
  ipo      IPO: (Δ̄ − 1/(2β))², Δ̄ from per-token averages (TRL's normalisation)
  robust   rDPO: (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε), ε = label_smoothing
  simpo    SimPO, reference-free: −log σ(β(ā_c − ā_r) − γ), ā = mean token log-prob
  orpo     ORPO, reference-free: −ā_c − β log σ(log odds(ā_c) − log odds(ā_r))
(PAIR_LOSSES: each a function, and whether it needs the reference)
each plus `sft_weight` × the chosen reply's mean token NLL (RPO) where that is set.
The reference is the starting model, frozen: its log-probs are computed once, before
training, and cached with the pairs (so LoRA needs no second model and no adapter
switching). Log-probs are fp32. A pair's two replies share a micro-batch, and the loop
weighs every pair the same across accumulation and processes (target = pair).

Pairs (`finetune.preference.pairs`): `spin` builds them from finetune.dataset's
conversations as SPIN does, chosen = the reference reply, rejected = the starting model's own
greedy reply; `verifier` (checkable answers) samples the starting model's replies and lets
the answer checker judge them, chosen = a correct reply of the model's own (the reference
solution where none is), rejected = a wrong one; `files` reads users' .jsonl
(lmpipe.taskdata.pairs). Either way the table, with the reference's log-probs, is cached
per starting model and written to pairs.parquet. Held out, spin and verifier models are
scored on every held-out problem of the dataset (answer accuracy where answers are
checkable), not only on those that made a pair.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data.batches import ordered_examples, shuffled_examples
from lmpipe.evaluation.answers import is_correct
from lmpipe.evaluation.lm_metrics import eval_mode, next_token_losses
from lmpipe.evaluation.plots import preference_figure
from lmpipe.evaluation.scoring import generate_replies
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
    Objective,
    Report,
    TrainingSetup,
    cached_table,
    chosen,
    reference_by_split,
)
from lmpipe.tasks.sft import SFT, VERIFIABLE_DATASETS, conversation_splits, selection_candidate
from lmpipe.training import distributed
from lmpipe.training.loop import policy_numerics
from lmpipe.training.model import load_model, model_device

log = logging.getLogger(__name__)

# Where pair tables are cached (outputs/finetune/...): outside DVC's outs, so a change of
# beta or lr reuses the generated replies and the reference's log-probs.
CACHE_DIR = "finetune/pairs-cache"
PAIRS_FILE = "pairs.parquet"
# Bump when what a cached table holds changes meaning.
PAIRS_VERSION = 3  # 2: pairs keep their checkable answer; 3: samples seeded per batch


# --- the losses ----------------------------------------------------------------------------


class PairLogps(NamedTuple):
    """A micro-batch's summed reply log-probs under the policy and the reference, per pair,
    and each reply's token count."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_ratio(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_ratio(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


# Per-pair losses, the chosen rewards and the rejected rewards (the last two detached).
LossValues = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PairLoss:
    """One `finetune.preference.loss`. `needs_reference`: it reads the frozen reference's
    log-probs (the DPO family); a reference-free loss rewards the policy's own mean token
    log-prob."""

    compute: Callable[[PairLogps, PreferenceConfig | DictConfig], LossValues]
    needs_reference: bool = True


def _ratio_rewards(x: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * x.chosen_ratio.detach(), beta * x.rejected_ratio.detach()


def _mean_rewards(x: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * x.chosen_mean.detach(), beta * x.rejected_mean.detach()


def dpo_loss(x: PairLogps, p: PreferenceConfig | DictConfig) -> LossValues:
    """DPO: −log σ(βΔ)."""
    delta = x.chosen_ratio - x.rejected_ratio
    return -F.logsigmoid(p.beta * delta), *_ratio_rewards(x, p.beta)


def hinge_loss(x: PairLogps, p: PreferenceConfig | DictConfig) -> LossValues:
    """SLiC / RSO: max(0, 1 − βΔ)."""
    delta = x.chosen_ratio - x.rejected_ratio
    return torch.relu(1 - p.beta * delta), *_ratio_rewards(x, p.beta)


def ipo_loss(x: PairLogps, p: PreferenceConfig | DictConfig) -> LossValues:
    """IPO: (Δ̄ − 1/(2β))², Δ̄ from per-token averages (TRL's normalisation)."""
    mean_delta = x.chosen_ratio / x.chosen_tokens.clamp(min=1) - \
        x.rejected_ratio / x.rejected_tokens.clamp(min=1)  # fmt: skip
    return (mean_delta - 1 / (2 * p.beta)) ** 2, *_ratio_rewards(x, p.beta)


def robust_loss(x: PairLogps, p: PreferenceConfig | DictConfig) -> LossValues:
    """rDPO: (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε), ε = label_smoothing."""
    delta, eps = x.chosen_ratio - x.rejected_ratio, p.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(p.beta * delta)
              + eps * F.logsigmoid(-p.beta * delta)) / (1 - 2 * eps)  # fmt: skip
    return losses, *_ratio_rewards(x, p.beta)


def simpo_loss(x: PairLogps, p: PreferenceConfig | DictConfig) -> LossValues:
    """SimPO: −log σ(β(ā_c − ā_r) − γ), ā = mean token log-prob."""
    losses = -F.logsigmoid(p.beta * (x.chosen_mean - x.rejected_mean) - p.simpo_gamma)
    return losses, *_mean_rewards(x, p.beta)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(x: PairLogps, p: PreferenceConfig | DictConfig) -> LossValues:
    """ORPO (Hong et al. 2024): the chosen reply's mean token NLL − β log σ(log odds ratio),
    odds = P/(1 − P) of each reply's mean token log-prob. TRL's NLL also covers the prompt
    tokens; ours, like SFT's, only the reply's."""
    log_odds = (x.chosen_mean - x.rejected_mean) - (_log1mexp(x.chosen_mean)
                                                    - _log1mexp(x.rejected_mean))  # fmt: skip
    losses = -x.chosen_mean - p.beta * F.logsigmoid(log_odds)
    return losses, *_mean_rewards(x, p.beta)


PAIR_LOSSES: dict[str, PairLoss] = {
    "sigmoid": PairLoss(dpo_loss),
    "hinge": PairLoss(hinge_loss),
    "ipo": PairLoss(ipo_loss),
    "robust": PairLoss(robust_loss),
    "simpo": PairLoss(simpo_loss, needs_reference=False),
    "orpo": PairLoss(orpo_loss, needs_reference=False),
}


def pair_loss(name: str) -> PairLoss:
    """The registered loss `finetune.preference.loss` names."""
    try:
        return PAIR_LOSSES[name]
    except KeyError:
        raise ConfigError(f"invalid value for 'finetune.preference.loss': {name!r} "
                          f"(allowed: {sorted(PAIR_LOSSES)})") from None  # fmt: skip


def preference_losses(
    p: PreferenceConfig | DictConfig,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> LossValues:
    """Per-pair losses and the chosen and rejected rewards (detached) of `p.loss`, plus its
    SFT term (`with_sft_term`). Rewards are β × the log-ratio to the reference (DPO family),
    or β × the mean token log-prob for a reference-free loss."""
    loss = pair_loss(p.loss)
    x = PairLogps(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_tokens, rejected_tokens)  # fmt: skip
    losses, chosen_rewards, rejected_rewards = loss.compute(x, p)
    return with_sft_term(losses, p, chosen_logps, chosen_tokens), chosen_rewards, rejected_rewards


def with_sft_term(
    losses: torch.Tensor,
    p: PreferenceConfig | DictConfig,
    chosen_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
) -> torch.Tensor:
    """The pair losses plus `p.sft_weight` × the chosen reply's mean token NLL (RPO, as in
    Pang et al. 2024's iterative reasoning preference optimisation; TRL: loss_type
    ["sigmoid", "sft"]). It keeps the chosen replies likely: without it DPO may lower both
    replies' log-probs as long as their gap grows. Per pair, so that a pair weighs the same
    in any batch layout (TRL averages the NLL over the micro-batch's tokens: the same when
    the chosen replies are equally long)."""
    if not p.sft_weight:
        return losses
    return losses + p.sft_weight * (-chosen_logps / chosen_tokens.clamp(min=1))


def reply_logps(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-prob of its labelled tokens (fp32), and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits  # fmt: skip
    losses, labelled = next_token_losses(logits, batch["labels"])  # fp32, 0 where unlabelled
    return -losses.sum(dim=1), labelled.sum(dim=1)


class PairScores:
    """The policy's and reference's log-probs of a micro-batch of pairs, split in halves."""

    def __init__(
        self, logps: torch.Tensor, tokens: torch.Tensor, ref_logps: torch.Tensor | None
    ) -> None:
        """`ref_logps` None: a reference-free loss, which never reads them."""
        self.chosen, self.rejected = logps.chunk(2)
        self.chosen_tokens, self.rejected_tokens = tokens.chunk(2)
        ref_logps = torch.zeros_like(logps) if ref_logps is None else ref_logps.to(logps)
        self.ref_chosen, self.ref_rejected = ref_logps.chunk(2)

    def losses(self, p: PreferenceConfig | DictConfig):
        return preference_losses(p, self.chosen, self.rejected, self.ref_chosen,
                                 self.ref_rejected, self.chosen_tokens,
                                 self.rejected_tokens)  # fmt: skip


# A reward margin this small is a tie: the reference scored in another batch (other padding)
# or on another number of processes differs from itself in the last float bits, not in
# preference. At step 1 the policy is the reference, so every margin is such noise.
TIE_MARGIN = 1e-4


def pair_wins(margins: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 for a margin of at least TIE_MARGIN, 0.5 for a tie, 0 for a loss. One rule
    for training's `rewards/accuracies` and the held-out reward accuracy, so the reference
    itself scores 0.5 (chance) whatever the float noise. (TRL counts a strict `>`, which noise
    decides at step 1.)"""
    wins = (margins >= TIE_MARGIN).to(margins.dtype)
    ties = (margins.abs() < TIE_MARGIN).to(margins.dtype)
    return wins + 0.5 * ties


def reward_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs won, ties counting half (`pair_wins`)."""
    return float(pair_wins(margins.double()).mean())


def pair_metric_sums(
    scores: PairScores, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums over the pairs of what TRL logs (under TRL's names), for averaging per step."""
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": pair_wins(margins.float()).sum(),
        "rewards/margins": margins.sum(),
        "logps/chosen": scores.chosen.detach().sum(),
        "logps/rejected": scores.rejected.detach().sum(),
    }


class PreferenceLoss(Objective):
    """The training objective: the summed pair losses of a micro-batch; target = pair."""

    name = "preference"
    loss_is_per_token = False

    def __init__(self, p: PreferenceConfig | DictConfig) -> None:
        self.p = p
        self._sums: dict[str, torch.Tensor] = {}

    def target_count(self, batch: Mapping[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss_sum(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scores = PairScores(*reply_logps(model, batch), batch.get("ref_logps"))
        losses, chosen_rewards, rejected_rewards = scores.losses(self.p)
        for name, value in pair_metric_sums(scores, chosen_rewards, rejected_rewards).items():
            self._sums[name] = self._sums.get(name, 0) + value
        return losses.sum()

    def take_metric_sums(self) -> dict[str, torch.Tensor]:
        sums, self._sums = self._sums, {}
        return sums


@torch.no_grad()
def pair_metrics(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    p: PreferenceConfig | DictConfig,
    device: torch.device,
) -> dict[str, float]:
    """Mean loss and TRL's reward values over the pairs of `batches` (eval mode)."""
    total: dict[str, float] = {}
    pairs = 0
    with eval_mode(model):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            scores = PairScores(*reply_logps(model, batch), batch.get("ref_logps"))
            losses, chosen_rewards, rejected_rewards = scores.losses(p)
            sums = {"loss": losses.sum(), **pair_metric_sums(scores, chosen_rewards,
                                                             rejected_rewards)}  # fmt: skip
            for name, value in sums.items():
                total[name] = total.get(name, 0.0) + float(value)
            pairs += len(losses)
    if pairs == 0:
        raise ValueError("no preference pairs to evaluate")
    return {name: value / pairs for name, value in total.items()}


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    examples: Sequence[pref.PairExample],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    width: int | None = None,
) -> list[pref.Pair]:
    """The pairs with the (frozen, starting) model's log-probs of each reply filled in,
    computed in micro-batches of `batch_size` rows padded to `width` (the shapes training
    gives the policy: `pref.fixed_width`), their batches shared by the processes."""

    def fill(_: int, chunk: Sequence[pref.PairExample]) -> list[pref.Pair]:
        batch = pref.collate_pairs(chunk, pad_id, with_reference=False, width=width)
        logps, _ = reply_logps(model, {k: v.to(device) for k, v in batch.items()})
        values = logps.tolist()
        return [replace(e.pair, ref_chosen=c, ref_rejected=r)
                for e, c, r in zip(chunk, values[: len(chunk)], values[len(chunk) :],
                                   strict=True)]  # fmt: skip

    with eval_mode(model):
        return distributed.map_batches(fill, examples, batch_size,
                                       "preference: the reference's log-probs")  # fmt: skip


# --- building the pairs --------------------------------------------------------------------


def spin_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Mapping[str, Sequence[conversations.Conversation]],
    p: PreferenceConfig | DictConfig,
    device: torch.device,
) -> dict[str, list[pref.Pair]]:
    """SPIN's pairs from each conversation's opening exchange: chosen = the human reply,
    rejected = the model's greedy reply of at least one token (each distinct prompt answered
    once)."""
    splits = opening_pairs(conversations, p.max_pairs, p.max_held_out_pairs)
    prompts = sorted({pair.prompt[0]["content"] for pairs in splits.values() for pair in pairs})
    log.info("preference: the starting model answers %d distinct prompts (greedy, %d tokens)",
             len(prompts), p.max_new_tokens)  # fmt: skip
    # At least one token: an empty reply is no reply to prefer another to.
    replies = distributed.map_batches(
        lambda _, batch: generate_replies(model, tokenizer, batch, p.max_new_tokens,
                                          device=device, min_new_tokens=1,
                                          batch_size=len(batch)),
        prompts, p.batch_size, "preference: the starting model's replies",
    )  # fmt: skip
    answer = dict(zip(prompts, replies, strict=True))
    result: dict[str, list[pref.Pair]] = {}
    for split, pairs in splits.items():
        built = [replace(pair, rejected=answer[pair.prompt[0]["content"]]) for pair in pairs]
        kept = [pair for pair in built if pair.rejected and pair.rejected != pair.chosen]
        if len(kept) < len(built):
            log.info("preference: %d %s pairs dropped: the model's reply is empty or the human "
                     "one", len(built) - len(kept), split)  # fmt: skip
        result[split] = kept
    return result


def opening_pairs(
    conversations: Mapping[str, Sequence[conversations.Conversation]],
    max_pairs: int | None,
    max_held_out_pairs: int | None = None,
) -> dict[str, list[pref.Pair]]:
    """Each conversation's opening exchange as a pair with its reference reply chosen and
    no rejected reply yet; at most `max_pairs` training ones and `max_held_out_pairs` per
    held-out split (stable hash samples)."""
    splits = {
        split: [pref.Pair(c.id, c.messages[:1], c.messages[1]["content"].strip(), "",
                          answer=c.answer) for c in items]
        for split, items in conversations.items()
    }  # fmt: skip
    return {
        split: pref.stable_sample(pairs, max_pairs if split == "train" else max_held_out_pairs)
        for split, pairs in splits.items()
    }


def judge_samples(pair: pref.Pair, replies: Sequence[str]) -> tuple[pref.Pair | None, str]:
    """The pair the answer checker makes of a prompt's sampled replies, and where its chosen
    reply came from: `model` (the first correct sample), `reference` (no sample is correct:
    the reference solution) or `solved` (no sample is wrong: no pair, None). Empty replies
    are no reply to prefer another to, and are skipped."""
    if pair.answer is None:
        raise ValueError(f"preference pair {pair.id}: no answer to check replies against")
    replies = [r for r in replies if r]
    correct = [r for r in replies if is_correct(r, pair.answer)]
    wrong = [r for r in replies if not is_correct(r, pair.answer)]
    if not wrong:
        return None, "solved"
    if correct:
        return replace(pair, chosen=correct[0], rejected=wrong[0]), "model"
    return replace(pair, rejected=wrong[0]), "reference"


def sample_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    p: PreferenceConfig | DictConfig,
    device: torch.device,
    seed: int,
) -> list[list[str]]:
    """`p.samples` replies per prompt at `p.temperature`, the same ones for the same seed
    and any number of processes (a private generator state per batch: the caller's random
    stream is left as it was)."""
    repeated = [prompt for prompt in prompts for _ in range(p.samples)]
    devices = [device] if device.type == "cuda" else []

    def sample(index: int, batch: Sequence[str]) -> list[str]:
        # Seeded per batch: the same replies however many processes share the batches.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + index)
            return generate_replies(model, tokenizer, batch, p.max_new_tokens, do_sample=True,
                                    temperature=p.temperature, device=device,
                                    min_new_tokens=1, batch_size=len(batch))  # fmt: skip

    replies = distributed.map_batches(sample, repeated, p.batch_size, "sampling replies")
    return [replies[i : i + p.samples] for i in range(0, len(replies), p.samples)]


def verifier_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Mapping[str, Sequence[conversations.Conversation]],
    p: PreferenceConfig | DictConfig,
    device: torch.device,
    seed: int,
) -> dict[str, list[pref.Pair]]:
    """Pairs from the model's own sampled replies, judged by the answer checker
    (`judge_samples`), in every split; how many prompts took each route is logged."""
    result: dict[str, list[pref.Pair]] = {}
    for split, pairs in opening_pairs(conversations, p.max_pairs, p.max_held_out_pairs).items():
        log.info("preference: %d replies to each of %d %s prompts (temperature %g, %d tokens)",
                 p.samples, len(pairs), split, p.temperature, p.max_new_tokens)  # fmt: skip
        samples = sample_replies(model, tokenizer, [q.prompt[0]["content"] for q in pairs], p,
                                 device, seed)  # fmt: skip
        outcomes = Counter[str]()
        result[split] = []
        for pair, replies in zip(pairs, samples, strict=True):
            judged, outcome = judge_samples(pair, replies)
            outcomes[outcome] += 1
            if judged is not None:
                result[split].append(judged)
        log.info("preference: %s: %d pairs with the model's own correct reply chosen, %d with "
                 "the reference solution, %d prompts answered right in every sample (no pair)",
                 split, outcomes["model"], outcomes["reference"], outcomes["solved"])  # fmt: skip
    return result


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
        """`sft_steps` of SFT at `sft_lr`, the rest of finetune.* shared (its preference
        settings dropped: they are the phase ahead, not what this one trains)."""
        p = f.preference
        if not p.sft_steps:
            return None
        settings = OmegaConf.to_container(OmegaConf.structured(f), resolve=True)
        del settings["preference"]
        settings |= {"task": "sft", "steps": p.sft_steps, "epochs": None}
        settings["selection"]["steps"] = []
        settings["optim"]["lr"] = p.sft_lr
        return OmegaConf.create(settings)

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
