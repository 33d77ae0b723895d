"""GRPO's objective (Shao et al. 2024, DeepSeekMath) and its variants, as TRL 1.16's
GRPOTrainer computes them, for the shared loop (lmpipe.training.loop.Objective).

A group is G completions of one prompt. Its rewards become advantages (`group_advantages`):
A_i = r_i − mean(r_group), divided by std(r_group) + 1e-4 (`scale_rewards=group`), by the
std of the whole batch (`batch`) or by nothing (`none`; Dr. GRPO). Per completion token t,
with the ratio ρ_t = π(y_t) / π_old(y_t) of the policy to the one that sampled:
    ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β KL_t,
    KL_t = ρ_t (exp(ref_t − logp_t) − (ref_t − logp_t) − 1)   (only with β > 0),
the k3 estimate of KL(π ‖ π_ref) weighted by ρ_t because the tokens were sampled from
π_old (TRL's default, `use_bias_correction_kl`).
The loss types differ in how they average ℓ_t (`LOSS_TYPES`), as TRL does:
    dapo     over every completion token of the step (the default; DAPO, Yu et al. 2025)
    grpo     over each completion's tokens, then over completions (the original)
    dr_grpo  summed, over completions × max_new_tokens (Dr. GRPO, Liu et al. 2025)
    bnpo     over each micro-batch's completion tokens, then over micro-batches
Each is a (sum, target count) pair, so the loop's global division reproduces it across
gradient accumulation and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's


def _std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased standard deviation (TRL's nanstd without NaNs)."""
    return x.std(dim=dim, unbiased=True) if dim is not None else x.std(unbiased=True)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion (groups of `group_size` in a row): its advantage, and the std its
    reward is compared with (zero for a group whose rewards are all equal, which then
    teaches nothing: TRL's `frac_reward_zero_std`)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    if scale_rewards == "batch":
        std = _std(rewards).expand_as(rewards)
    else:
        std = _std(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return advantages, std


@dataclass
class TokenLosses:
    """ℓ_t per completion token (0 where masked) and the values TRL logs of them."""

    loss: torch.Tensor  # (rows, tokens)
    mask: torch.Tensor  # (rows, tokens), float
    low_clipped: torch.Tensor  # ρ_t < 1 − ε_low where A < 0
    high_clipped: torch.Tensor  # ρ_t > 1 + ε_high where A > 0
    kl: torch.Tensor | None  # k3 per token, with β > 0


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> TokenLosses:
    """The clipped surrogate (plus β KL) per completion token."""
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("a KL term (beta > 0) needs the reference's log-probs")
        delta = ref_logps - logps
        kl = (torch.exp(delta) - delta - 1) * ratio
        loss = loss + beta * kl
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(logps.dtype)
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(logps.dtype)
    return TokenLosses(loss * mask, mask, low, high, kl)


def _dapo(t: TokenLosses, _: int) -> tuple[torch.Tensor, float]:
    return t.loss.sum(), float(t.mask.sum())


def _grpo(t: TokenLosses, _: int) -> tuple[torch.Tensor, float]:
    per_row = t.loss.sum(dim=1) / t.mask.sum(dim=1).clamp(min=1.0)
    return per_row.sum(), float(t.loss.shape[0])


def _dr_grpo(t: TokenLosses, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    return t.loss.sum() / max_new_tokens, float(t.loss.shape[0])


def _bnpo(t: TokenLosses, _: int) -> tuple[torch.Tensor, float]:
    return t.loss.sum() / t.mask.sum().clamp(min=1.0), 1.0


REDUCTIONS = {"dapo": _dapo, "grpo": _grpo, "dr_grpo": _dr_grpo, "bnpo": _bnpo}
LOSS_TYPES = tuple(REDUCTIONS)


def reduced(t: TokenLosses, loss_type: str, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    """The micro-batch's loss sum and its target count under `loss_type` (loss = sum over
    the step's micro-batches and processes of the sums / of the counts)."""
    if loss_type not in REDUCTIONS:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return REDUCTIONS[loss_type](t, max_new_tokens)
