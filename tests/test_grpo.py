"""GRPO's objective (lmpipe.training.grpo_loss): hand-worked cases, and parity with TRL 1.16's
GRPOTrainer on one fixed batch for every loss type."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmpipe.training.grpo_loss import LOSS_TYPES, group_advantages, reduced, token_losses
from lmpipe.training.logprobs import token_logps


def test_advantages_of_the_hand_worked_groups() -> None:
    """Rewards [1, 0, 0, 0] (mean 1/4, unbiased std 1/2) and [1, 1, 1, 1] (std 0: no signal)."""
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    advantages, std = group_advantages(rewards, 4, "group")
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    torch.testing.assert_close(advantages, torch.cat([expected, torch.zeros(4)]))
    torch.testing.assert_close(std, torch.tensor([0.5] * 4 + [0.0] * 4))
    unscaled, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: the mean only
    torch.testing.assert_close(unscaled, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    batch, batch_std = group_advantages(rewards, 4, "batch")  # one std for the whole batch
    whole = rewards.std(unbiased=True)
    torch.testing.assert_close(batch_std, whole.expand(8))
    torch.testing.assert_close(
        batch[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (whole + 1e-4)
    )
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 4, "rank")


@pytest.mark.parametrize(
    ("advantage", "expected", "low", "high"),
    [
        # ratios 1.5 and 0.5, ε = (0.2, 0.28): a positive advantage is capped at 1.28 on the
        # first token and takes the ratio on the second: −(1.28 + 0.5) / 2
        (1.0, -(1.28 + 0.5) / 2, [0.0, 0.0], [1.0, 0.0]),
        # a negative one takes the larger ratio on the first token and the clipped 0.8 on the
        # second: (1.5 + 0.8) / 2
        (-1.0, (1.5 + 0.8) / 2, [0.0, 1.0], [0.0, 0.0]),
    ],
)
def test_the_clipped_surrogate_of_a_two_token_reply(
    advantage: float, expected: float, low: list, high: list
) -> None:
    old = torch.tensor([[-1.0, -2.0]])
    logps = old + torch.tensor([[math.log(1.5), math.log(0.5)]])
    losses = token_losses(logps, old, torch.tensor([advantage]), torch.ones(1, 2), 0.2, 0.28)
    total, count = reduced(losses, "dapo", 8)
    assert float(total) / count == pytest.approx(expected)
    assert losses.low_clipped.tolist() == [low] and losses.high_clipped.tolist() == [high]
    assert losses.kl is None


def test_the_kl_term_of_a_token_and_the_normalisations() -> None:
    """k3 = e^d − d − 1 at d = ref − logp = 1: e − 2 (times ρ = 1, the policy that sampled);
    β = 0.5 adds (e − 2)/2 to ℓ_t. Two
    rows of 3 and 1 tokens (one masked): dapo over 4 tokens, grpo over rows of row means,
    dr_grpo over rows × 5 tokens, bnpo over the micro-batch's 4 tokens."""
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    t = token_losses(logps, logps, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2, beta=0.5,
                     ref_logps=logps + 1)  # fmt: skip
    k3 = math.e - 2
    per_token = torch.tensor([[-1 + k3 / 2] * 3, [1 + k3 / 2, 0, 0]])
    torch.testing.assert_close(t.loss, per_token)
    sums = {kind: reduced(t, kind, 5) for kind in LOSS_TYPES}
    assert sums["dapo"][1] == 4 and float(sums["dapo"][0]) == pytest.approx(float(per_token.sum()))
    assert sums["grpo"][1] == 2
    assert float(sums["grpo"][0]) == pytest.approx((-1 + k3 / 2) + (1 + k3 / 2))
    assert sums["dr_grpo"][1] == 2 and float(sums["dr_grpo"][0]) == pytest.approx(
        float(per_token.sum()) / 5)  # fmt: skip
    assert sums["bnpo"][1] == 1 and float(sums["bnpo"][0]) == pytest.approx(
        float(per_token.sum()) / 4)  # fmt: skip
    with pytest.raises(ValueError, match="reference"):
        token_losses(logps, logps, torch.ones(2), mask, 0.2, 0.2, beta=0.1)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_clip_ratios_and_kl_equal_trls_on_the_same_batch(
    loss_type: str, tiny_tokenizer, tmp_path: Path
) -> None:
    """TRL's GRPOTrainer._compute_loss and ours on one batch: 4 completions of up to 5
    tokens after left-padded prompts, sampled at temperature 0.7 by an older policy (its
    log-probs the policy's plus noise, so ratios clip on both sides), a reference 0.3 nats
    off per token, β = 0.1, ε = (0.2, 0.28); in fp32 (TRL's config defaults to bf16, also on
    a CPU, which moves its log-probs by 1e-3)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)).save_pretrained(tmp_path / "m")  # fmt: skip
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")  # TRL loads its reference by path
    L, temperature, beta = 5, 0.7, 0.1
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                          per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=L, loss_type=loss_type, beta=beta,
                          epsilon=0.2, epsilon_high=0.28, temperature=temperature)  # fmt: skip
    rows = [{"prompt": [{"role": "user", "content": "What is AI?"}]}] * 4
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * 4],
                              args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tiny_tokenizer)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # as inside TRL's training loop
    generator = torch.Generator().manual_seed(1)
    pad = tiny_tokenizer.pad_token_id
    prompt_ids = torch.randint(5, 300, (4, 6), generator=generator)
    prompt_mask = torch.ones(4, 6, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding
    prompt_ids[1, :2] = pad
    completion_ids = torch.randint(5, 300, (4, L), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                    [1, 0, 0, 0, 0]])  # fmt: skip
    completion_ids[completion_mask == 0] = pad
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = input_ids.masked_fill(torch.cat([torch.zeros_like(prompt_mask), completion_mask],
                                             dim=1) == 0, -100)  # fmt: skip
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    model.train()
    with torch.no_grad():
        current, mask = token_logps(model, batch, temperature)
        current, mask = current[:, -L:], mask[:, -L:]
    assert torch.equal(mask, completion_mask.bool())
    old = current + 0.8 * torch.randn(current.shape, generator=generator)
    ref = current - 0.3
    advantages = torch.tensor([1.2, -0.7, -0.4, 1.5])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}  # fmt: skip
    trl_loss = trainer._compute_loss(model, inputs)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    # Log-probs: ours (a full log-softmax) and TRL's (its chunked fused LM head), both fp32.
    theirs, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention, L)
    logps, mask = token_logps(model, batch, temperature)
    torch.testing.assert_close(logps[:, -L:] * mask[:, -L:], theirs, rtol=0, atol=2e-6)
    t = token_losses(logps[:, -L:], old, advantages, mask[:, -L:], 0.2, 0.28, beta, ref)
    total, count = reduced(t, loss_type, L)
    assert float(total.detach()) / count == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-7)
    tokens = float(t.mask.sum())
    low, high = float(t.low_clipped.mul(t.mask).sum()), float(t.high_clipped.mul(t.mask).sum())
    assert low > 0 and high > 0, (low, high, torch.exp(logps[:, -L:] - old))  # both sides clip
    assert low / tokens == pytest.approx(trl_metrics["clip_ratio/low_mean"], abs=1e-7)
    assert high / tokens == pytest.approx(trl_metrics["clip_ratio/high_mean"], abs=1e-7)
    assert (low + high) / tokens == pytest.approx(trl_metrics["clip_ratio/region_mean"], abs=1e-7)
    kl = float(t.kl.mul(t.mask).sum()) / tokens
    assert kl == pytest.approx(trl_metrics["kl"], rel=1e-5)
    # and the gradients, not just the value
    model.zero_grad()
    trainer._compute_loss(model, inputs).backward()
    their_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logps, mask = token_logps(model, batch, temperature)
    total, count = reduced(token_losses(logps[:, -L:], old, advantages, mask[:, -L:], 0.2,
                                        0.28, beta, ref), loss_type, L)  # fmt: skip
    (total / count).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, their_grads[name], rtol=1e-4, atol=1e-7)


# --- the task: sampled batches, the objective in the loop, config ----------------------------


def problems(n: int) -> list:
    from lmpipe.taskdata.conversations import Conversation

    return [Conversation(f"q{i}", [{"role": "user", "content": f"{i} + 1 ="},
                                   {"role": "assistant", "content": f"#### {i + 1}"}],
                         answer=str(i + 1)) for i in range(n)]  # fmt: skip


def grpo_settings(**grpo) -> object:
    from lmpipe.runs.config import FinetuneConfig

    f = FinetuneConfig(task="grpo", dataset="reasoning_gym", batch_size=2, grad_accum=1)
    f.grpo.group_size, f.grpo.max_new_tokens = 3, 4
    for name, value in grpo.items():
        setattr(f.grpo, name, value)
    return f


def group_batches(model, tokenizer, f, rank: int = 0, world_size: int = 1, position: int = 0):
    from lmpipe.tasks.grpo import GroupBatches

    batches = GroupBatches(model, None, tokenizer, problems(8), f, 5, torch.device("cpu"), rank,
                           world_size)  # fmt: skip
    batches.position = position
    return batches


def test_groups_are_the_same_after_a_resume_and_split_no_group(tiny_model, tiny_tokenizer) -> None:
    """The batch at a position is a function of the position (a resumed run samples what the
    uninterrupted one did), two processes' halves are the one process's doubled batch, and
    each group's rows are its problem's."""
    f = grpo_settings()
    straight = group_batches(tiny_model, tiny_tokenizer, f)
    first, second = next(straight), next(straight)
    resumed = next(group_batches(tiny_model, tiny_tokenizer, f, position=1))
    for name in second:
        assert torch.equal(resumed[name], second[name]), name
    assert not torch.equal(first["input_ids"], second["input_ids"][: len(first["input_ids"])])
    f.batch_size = 4
    doubled = next(group_batches(tiny_model, tiny_tokenizer, f))
    f.batch_size = 2
    halves = [next(group_batches(tiny_model, tiny_tokenizer, f, rank, 2)) for rank in (0, 1)]
    rows = [row for half in halves for row in half["input_ids"].tolist()]
    width = doubled["input_ids"].shape[1]
    pad = tiny_tokenizer.pad_token_id
    strip = [[t for t in row if t != pad] for row in rows]
    assert strip == [[t for t in row if t != pad] for row in doubled["input_ids"].tolist()]
    assert width >= max(half["input_ids"].shape[1] for half in halves)
    assert len(first["advantages"]) == 2 * 3  # problems x group size


def test_samples_serve_num_iterations_steps(tiny_model, tiny_tokenizer) -> None:
    f = grpo_settings(num_iterations=2)
    batches = group_batches(tiny_model, tiny_tokenizer, f)
    a, b, c = next(batches), next(batches), next(batches)
    assert "old_logps" in a and all(torch.equal(a[k], b[k]) for k in a)  # step 2 reuses step 1's
    assert not torch.equal(a["input_ids"][:1], c["input_ids"][:1]) or not torch.equal(
        a["labels"], c["labels"])  # step 3 samples afresh  # fmt: skip
    mu_1 = next(group_batches(tiny_model, tiny_tokenizer, grpo_settings()))
    assert "old_logps" not in mu_1 and "ref_logps" not in mu_1  # nothing loaded or kept


def test_a_rewarded_reply_becomes_likelier_after_a_step(
    monkeypatch: pytest.MonkeyPatch, tiny_model, tiny_tokenizer
) -> None:
    """One GRPO step through the shared loop, the judge rewarding the first reply of every
    group: in each group, that reply gains log-prob, and more than any other reply does."""
    from lmpipe.feedback.judge import Verdict
    from lmpipe.runs.config import HardwareConfig
    from lmpipe.runs.tracking import MetricLogger
    from lmpipe.tasks.grpo import GrpoLoss
    from lmpipe.training.loop import train

    calls = {"n": 0}
    checked_steps = set()

    def first_of_each_group(reply, answer, steps=False):
        calls["n"] += 1
        checked_steps.add(steps)
        return Verdict(calls["n"] % 3 == 1, "1", "correct" if calls["n"] % 3 == 1 else "wrong")

    monkeypatch.setattr("lmpipe.tasks.grpo.judge", first_of_each_group)
    f = grpo_settings(temperature=1.0)
    f.steps, f.optim.lr, f.optim.warmup_steps = 1, 5e-2, 0
    batches = group_batches(tiny_model, tiny_tokenizer, f)
    batch = next(group_batches(tiny_model, tiny_tokenizer, f))  # what step 1 will train on
    with torch.no_grad():
        before, mask = token_logps(tiny_model, batch)
    before = (before * mask).sum(1)
    metrics = MetricLogger(None)
    train(tiny_model, batches, f, HardwareConfig(device="cpu"), torch.device("cpu"), metrics,
          objective=GrpoLoss(f.grpo))  # fmt: skip
    with torch.no_grad():
        after, _ = token_logps(tiny_model, batch)
    change = (after * mask).sum(1) - before
    rewarded = batch["rewards"] == 1
    assert rewarded.tolist() == [True, False, False] * 2
    assert checked_steps == {True}  # finetune.grpo.check_steps: the working is judged too
    for group in change.view(2, 3):
        assert group[0] > 0 and group[0] > group[1:].max(), change


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        ({"dataset": "chatterbot"}, "finetune.dataset=chatterbot has no checkable answers"),
        ({"grpo": {"group_size": 1}}, "'finetune.grpo.group_size' must be at least 2"),
        ({"grpo": {"prompts_per_step": 0}}, "'finetune.grpo.prompts_per_step' must be"),
        ({"grpo": {"loss_type": "ppo"}}, "'finetune.grpo.loss_type'"),
        ({"grpo": {"scale_rewards": "rank"}}, "'finetune.grpo.scale_rewards'"),
        ({"grpo": {"num_iterations": 3}, "checkpoint_every": 100}, "multiple of"),
        ({"grpo": {"temperature": 0.0}}, "'finetune.grpo.temperature' must be > 0"),
        ({"packing": True}, "finetune.packing"),
    ],
)  # fmt: skip
def test_bad_grpo_configs_name_the_key(settings: dict, pattern: str) -> None:
    from lmpipe.runs.config import ConfigError, validate
    from lmpipe.tasks.finetuning import checked_task

    finetune = {"task": "grpo", "dataset": "reasoning_gym", **settings}
    with pytest.raises(ConfigError, match=pattern):
        checked_task(validate({"finetune": finetune}))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_the_loops_target_count_is_the_losss_own(loss_type: str, tiny_model, tiny_tokenizer):
    """The loop divides the summed loss by the targets it counts before the forward pass:
    they must be the count `reduced` divides by, for every loss type."""
    from lmpipe.tasks.grpo import GrpoLoss

    f = grpo_settings(loss_type=loss_type)
    batch = next(group_batches(tiny_model, tiny_tokenizer, f))
    logps, mask = token_logps(tiny_model, batch)
    t = token_losses(logps, logps.detach(), batch["advantages"], mask, 0.2, 0.2)
    assert GrpoLoss(f.grpo).target_count(batch) == reduced(t, loss_type, 4)[1]


def test_prompts_per_step_leave_the_sft_phase_its_batch_size(tiny_model, tiny_tokenizer) -> None:
    """GRPO draws `prompts_per_step` problems per micro-batch; its SFT phase trains with
    finetune.batch_size, as every other feedback method's does (one shared start)."""
    from lmpipe.tasks.grpo import GRPO

    f = grpo_settings(prompts_per_step=3, sft_steps=5)
    assert len(next(group_batches(tiny_model, tiny_tokenizer, f))["advantages"]) == 3 * 3
    assert GRPO().sft_first(f).batch_size == f.batch_size == 2
    f.grpo.prompts_per_step = None  # unset: finetune.batch_size problems
    assert len(next(group_batches(tiny_model, tiny_tokenizer, f))["advantages"]) == 2 * 3
