"""Pair losses of preference optimisation: learn from a preferred (chosen) and a
dispreferred (rejected) reply to the same prompt.

Losses (`finetune.preference.loss`), with Δ = (log π(y_c) − log π_ref(y_c)) −
(log π(y_r) − log π_ref(y_r)) over each reply's summed token log-probs:
  sigmoid  DPO: −log σ(βΔ)
  hinge    SLiC / RSO: max(0, 1 − βΔ)
  ipo      IPO: (Δ̄ − 1/(2β))², Δ̄ from per-token averages (TRL's normalisation)
  robust   rDPO: (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε), ε = label_smoothing
  simpo    SimPO, reference-free: −log σ(β(ā_c − ā_r) − γ), ā = mean token log-prob
  orpo     ORPO, reference-free: −ā_c − β log σ(log odds(ā_c) − log odds(ā_r))
(PAIR_LOSSES: each a function, and whether it needs the reference)
each plus `sft_weight` × the chosen reply's mean token NLL (RPO) where that is set. A pair's
two replies share a micro-batch, and the loop weighs every pair the same across
accumulation and processes (target = pair). TRL's metric names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lmpipe.evaluation.lm_metrics import eval_mode
from lmpipe.runs.config import ConfigError, PreferenceConfig
from lmpipe.training.logprobs import reply_logps
from lmpipe.training.loop import Objective


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
