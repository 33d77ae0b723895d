"""GRPO: online reinforcement learning from the answer checker's reward (Shao et al. 2024;
TRL 1.16's GRPOTrainer, whose loss, options and metric names these are).

Every optimizer step, each process draws its own `prompts_per_step` problems (the same global
batch however many processes share it, lmpipe.data.batches), and the current policy
answers each `group_size` times (lmpipe.feedback.rollouts). A group is drawn on the process
that owns its problem, seeded by (seed, micro-batch position, problem), so it never splits
across processes and two processes sample what one does with the doubled batch; a run
resumed from a checkpoint samples what the uninterrupted run did. The judge
(lmpipe.feedback.judge) rewards each reply 1 or 0; advantages are normalised per group,
per batch or not at all (`scale_rewards`), and the clipped surrogate of
lmpipe.training.grpo_loss is minimised. With `num_iterations` = μ > 1 each step's samples
serve μ optimizer steps, their log-probs at sampling time the ratio's denominator. With
β > 0 a frozen copy of the starting model is the KL reference; at 0 none is loaded.

Logged per step under TRL's names: reward, reward_std, frac_reward_zero_std,
completions/mean_length, completions/clipped_ratio, kl (β > 0), clip_ratio/low_mean,
clip_ratio/high_mean, clip_ratio/region_mean. Held out, the model is scored as SFT's
(exact match on every test problem).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data.batches import IGNORE_INDEX, Batch, ShuffledBatches
from lmpipe.evaluation.lm_metrics import eval_mode
from lmpipe.feedback import rollouts
from lmpipe.feedback.judge import judge
from lmpipe.runs.config import ConfigError, FinetuneConfig, GrpoConfig
from lmpipe.taskdata import pairs as pref
from lmpipe.taskdata.conversations import Conversation
from lmpipe.tasks.base import TrainingSetup
from lmpipe.tasks.sft import SFT, VERIFIABLE_DATASETS, problem_splits, sft_phase_config
from lmpipe.training import distributed
from lmpipe.training.grpo_loss import (
    LOSS_TYPES,
    SCALE_REWARDS,
    STD_EPS,
    group_advantages,
    reduced,
    token_losses,
)
from lmpipe.training.logprobs import token_logps
from lmpipe.training.loop import Objective
from lmpipe.training.model import load_model

KEY = "finetune.grpo"


def group_seed(seed: int, position: int, problem: str) -> int:
    """The seed of one group's replies: the same on any process and after a resume."""
    digest = hashlib.blake2b(f"{seed}:{position}:{problem}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**63)


def prompts_per_step(f: FinetuneConfig | DictConfig) -> int:
    """Problems per micro-batch and process: `grpo.prompts_per_step`, else finetune.batch_size
    (which the SFT phase before GRPO trains with, as every other task's SFT phase does)."""
    return f.grpo.prompts_per_step or f.batch_size


def _epsilon_high(g: GrpoConfig | DictConfig) -> float:
    return g.epsilon if g.epsilon_high is None else g.epsilon_high


class GroupBatches:
    """The loop's micro-batches of groups, sampled from the policy as they are asked for.

    Problems come from `ShuffledBatches` (resumable by position); the step's samples are
    kept for `num_iterations` steps. Each batch holds the prompt + reply rows (labels on the
    reply tokens), each row's advantage and reward, its group's reward std, whether the
    reply was cut at the length limit, and, where they are needed, the log-probs at
    sampling time (μ > 1) and the reference's (β > 0)."""

    def __init__(
        self,
        policy: PreTrainedModel,
        reference: PreTrainedModel | None,
        tokenizer: PreTrainedTokenizerBase,
        problems: Sequence[Conversation],
        f: FinetuneConfig | DictConfig,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.problems, self.g, self.seed, self.device = problems, f.grpo, seed, device
        self.grad_accum, self.max_len = f.grad_accum, f.max_len
        self.order = ShuffledBatches(len(problems), prompts_per_step(f), lambda rows: {}, seed,
                                     rank, world_size)  # fmt: skip
        self.num_items = len(problems)
        self.position = 0
        self._held: dict[int, Batch] = {}  # the current step's micro-batches (μ > 1)

    def __iter__(self) -> GroupBatches:
        return self

    def __next__(self) -> Batch:
        step, index = divmod(self.position, self.grad_accum)
        first_step = step - step % self.g.num_iterations
        if step == first_step or index not in self._held:
            # the problems of the step that sampled: consecutive positions, one per sampling
            drawn = (first_step // self.g.num_iterations) * self.grad_accum + index
            batch = self._sample(drawn, [self.problems[i] for i in self.order.indices(drawn)])
            self._held = {} if index == 0 else self._held
            if self.g.num_iterations > 1:
                self._held[index] = batch
        else:
            batch = self._held[index]
        self.position += 1
        return batch

    @torch.no_grad()
    def _sample(self, position: int, problems: Sequence[Conversation]) -> Batch:
        g = self.g
        sampling = rollouts.Sampling(g.max_new_tokens, g.temperature, g.top_p, top_k=0)
        devices = [self.device] if self.device.type == "cuda" else []
        groups = []
        for problem in problems:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(group_seed(self.seed, position, problem.id))
                groups.append(rollouts.complete(self.policy, self.tokenizer,
                                                [problem.prompt] * g.group_size, sampling,
                                                self.device, g.group_size))  # fmt: skip
        rewards = torch.tensor([judge(c.text, p.answer, g.check_steps).reward
                                for p, group in zip(problems, groups, strict=True)
                                for c in group])  # fmt: skip
        if g.scale_rewards == "batch":  # one std for the micro-batch of every process
            advantages, _ = group_advantages(rewards, g.group_size, "none")
            std = torch.cat(distributed.all_gather_object(rewards)).std().expand_as(rewards)
            advantages = advantages / (std + STD_EPS)
        else:
            advantages, std = group_advantages(rewards, g.group_size, g.scale_rewards)
        completions = [c for group in groups for c in group]
        prompts = [rollouts.prompt_ids(self.tokenizer, p.prompt) for p in problems
                   for _ in range(g.group_size)]  # fmt: skip
        batch = self._rows(prompts, completions)
        batch |= {
            "advantages": advantages.float(),
            "rewards": rewards.float(),
            "reward_std": std.float(),
            "clipped": torch.tensor([not c.finished for c in completions], dtype=torch.float),
        }
        with eval_mode(self.policy):
            if g.num_iterations > 1:
                batch["old_logps"], _ = token_logps(self.policy, self._on(batch), g.temperature)
            if self.reference is not None:
                batch["ref_logps"], _ = token_logps(self.reference, self._on(batch),
                                                    g.temperature)  # fmt: skip
        return {k: v.cpu() for k, v in batch.items()}

    def _on(self, batch: Batch) -> Batch:
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}

    def _rows(self, prompts: Sequence[list[int]], completions: Sequence[rollouts.Completion]):
        """Prompt + reply per row, right-padded (positions as in generation from position
        0), labels on the reply's tokens."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rows = [list(p) + list(c.token_ids) for p, c in zip(prompts, completions, strict=True)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX)
        for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, len(prompt) : len(row)] = torch.tensor(row[len(prompt) :], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class GrpoLoss(Objective):
    """The loop's objective: `loss_type`'s sum and target count (lmpipe.training.grpo_loss),
    and TRL's per-step values, each averaged over what it counts."""

    name = "grpo"
    loss_is_per_token = False

    def __init__(self, g: GrpoConfig | DictConfig) -> None:
        self.g = g
        self._sums: dict[str, list[torch.Tensor]] = {}

    def target_count(self, batch: Mapping[str, torch.Tensor]) -> int:
        """What `reduced` divides by for this loss type: reply tokens, rows or 1."""
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return {"dapo": tokens, "bnpo": 1}.get(self.g.loss_type, batch["input_ids"].shape[0])

    def _add(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        sums = self._sums.setdefault(name, [torch.zeros((), dtype=torch.float64)] * 2)
        self._sums[name] = [sums[0] + total.detach().double().cpu(),
                            sums[1] + torch.as_tensor(count, dtype=torch.float64)]  # fmt: skip

    def loss_sum(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        g = self.g
        logps, mask = token_logps(model, batch, g.temperature)
        old = batch.get("old_logps")  # μ = 1: the policy that sampled is this one
        old = logps.detach() if old is None else old
        t = token_losses(logps, old, batch["advantages"], mask, g.epsilon, _epsilon_high(g),
                         g.beta, batch.get("ref_logps"))  # fmt: skip
        total, _ = reduced(t, g.loss_type, g.max_new_tokens)
        tokens, rows = t.mask.sum(), batch["input_ids"].shape[0]
        self._add("clip_ratio/low_mean", (t.low_clipped * t.mask).sum(), tokens)
        self._add("clip_ratio/high_mean", (t.high_clipped * t.mask).sum(), tokens)
        self._add("clip_ratio/region_mean", ((t.low_clipped + t.high_clipped) * t.mask).sum(),
                  tokens)  # fmt: skip
        if t.kl is not None:
            self._add("kl", (t.kl * t.mask).sum(), tokens)
        self._add("reward", batch["rewards"].sum(), rows)
        self._add("reward_std", batch["reward_std"].sum(), rows)
        self._add("frac_reward_zero_std", (batch["reward_std"] == 0).float().sum(), rows)
        self._add("completions/mean_length", tokens, rows)
        self._add("completions/clipped_ratio", batch["clipped"].sum(), rows)
        return total

    def take_metric_sums(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        sums, self._sums = self._sums, {}
        return {name: (total, count) for name, (total, count) in sums.items()}


class GRPO(SFT):
    """GRPO on problems with checkable answers; scored as SFT's."""

    name = "grpo"

    def check(self, cfg: DictConfig) -> None:
        super().check(cfg)
        f, g = cfg.finetune, cfg.finetune.grpo
        if f.dataset not in VERIFIABLE_DATASETS:
            raise ConfigError(f"finetune.task=grpo is rewarded by an answer checker: "
                              f"finetune.dataset={f.dataset} has no checkable answers "
                              f"(allowed: {VERIFIABLE_DATASETS})")  # fmt: skip
        if g.group_size < 2:
            raise ConfigError(f"'{KEY}.group_size' must be at least 2 (an advantage compares "
                              f"replies within a group), got {g.group_size}")  # fmt: skip
        if g.prompts_per_step is not None and g.prompts_per_step < 1:
            raise ConfigError(f"'{KEY}.prompts_per_step' must be at least 1 or null, got "
                              f"{g.prompts_per_step}")  # fmt: skip
        for name in ("max_new_tokens", "num_iterations"):
            if g[name] < 1:
                raise ConfigError(f"'{KEY}.{name}' must be at least 1, got {g[name]}")
        if g.loss_type not in LOSS_TYPES:
            raise ConfigError(f"invalid value for '{KEY}.loss_type': {g.loss_type!r} "
                              f"(allowed: {list(LOSS_TYPES)})")  # fmt: skip
        if g.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"invalid value for '{KEY}.scale_rewards': {g.scale_rewards!r} "
                              f"(allowed: {list(SCALE_REWARDS)})")  # fmt: skip
        if g.temperature <= 0:
            raise ConfigError(f"'{KEY}.temperature' must be > 0, got {g.temperature}")
        if g.beta < 0 or g.epsilon < 0 or _epsilon_high(g) < 0:
            raise ConfigError(f"'{KEY}.beta', '{KEY}.epsilon' and '{KEY}.epsilon_high' must "
                              f"be >= 0")  # fmt: skip
        if f.checkpoint_every % g.num_iterations:
            raise ConfigError(f"'finetune.checkpoint_every' ({f.checkpoint_every}) must be a "
                              f"multiple of '{KEY}.num_iterations' ({g.num_iterations}): a "
                              f"resumed run starts where fresh samples are drawn")  # fmt: skip
        if f.packing:
            raise ConfigError("finetune.packing: GRPO's rows are sampled replies, not packed; "
                              "set finetune.packing=false")  # fmt: skip
        if cfg.hardware.strategy == "fsdp":
            raise ConfigError("finetune.task=grpo samples from the whole policy on each "
                              "process: use hardware.strategy=ddp")  # fmt: skip

    def sft_first(self, f: FinetuneConfig | DictConfig) -> DictConfig | None:
        return sft_phase_config(f, f.grpo.sft_steps, f.grpo.sft_lr)

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
        """SFT's model and validation (the held-out response loss), with batches sampled
        from the policy and GRPO's objective."""
        supervised = super().setup(f, base, tokenizer, seed, device, rank, world_size, train_ids)
        problems = [c for c in problem_splits(f)["train"]
                    if train_ids is None or c.id in train_ids]  # fmt: skip
        problems = pref.stable_sample(problems, f.grpo.max_prompts)
        reference = None
        if f.grpo.beta:
            reference = load_model(base).to(device).eval()
            reference.requires_grad_(False)
        batches = GroupBatches(supervised.model, reference, tokenizer, problems, f, seed, device,
                               rank, world_size)  # fmt: skip
        counts = {"train_problems": len(problems), **supervised.counts}
        counts.pop("train_examples", None)
        return TrainingSetup(supervised.model, batches, GrpoLoss(f.grpo), supervised.evaluate,
                             counts)  # fmt: skip
