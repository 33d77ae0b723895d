"""KTO (finetune=kto): the loss against a hand-worked case and TRL's KTOTrainer, the unpaired
feedback files in TRL's format, the verifier's judged replies, and the task end to end on a
tiny model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from lmpipe.evaluation.answers import is_correct
from lmpipe.runs.config import ConfigError, HardwareConfig, KtoConfig, validate
from lmpipe.runs.processes import DistEnv
from lmpipe.taskdata import unpaired
from lmpipe.taskdata.conversations import Conversation
from lmpipe.taskdata.unpaired import Judged
from lmpipe.tasks.finetuning import checked_task
from lmpipe.tasks.kto import KTO, KtoLoss, judge_replies, kto_losses, verifier_examples
from lmpipe.training.logprobs import reply_logps
from tests.test_preference import arithmetic, talkative_model
from tests.test_train import fresh_model

CPU = torch.device("cpu")
USER = [{"role": "user", "content": "What is AI?"}]


def test_kto_loss_of_the_hand_worked_case() -> None:
    """Log-ratios 2 (desirable) and −1 (undesirable), mismatched log-ratios 0.5 and 1.5, so
    z₀ = 1; at β = 0.5, λ_D = 2, λ_U = 1: 2 (1 − σ(0.5 (2 − 1))) and 1 − σ(0.5 (1 + 1))."""
    k = KtoConfig(beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    losses, rewards, kl = kto_losses(
        k, torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -3.0]), torch.tensor([-2.5, -1.5]),
        torch.tensor([-3.0, -3.0]), torch.tensor([True, False]),
    )  # fmt: skip

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    torch.testing.assert_close(losses, torch.tensor([2 * (1 - sigmoid(0.5)), 1 - sigmoid(1.0)]))
    torch.testing.assert_close(rewards, torch.tensor([1.0, -0.5]))
    assert float(kl) == pytest.approx(1.0)


def test_the_kl_estimate_is_never_negative() -> None:
    """A policy below its reference on mismatched replies takes z₀ = 0 (TRL clamps it)."""
    k = KtoConfig(beta=1.0)
    losses, _, kl = kto_losses(k, torch.zeros(1), torch.zeros(1), torch.tensor([-5.0]),
                               torch.tensor([-1.0]), torch.tensor([True]))  # fmt: skip
    assert float(kl) == 0.0
    assert float(losses) == pytest.approx(0.5)  # 1 − σ(0)


def test_kto_loss_and_values_equal_trls_on_the_same_batch(tiny_tokenizer, tmp_path: Path) -> None:
    """TRL's KTOTrainer._compute_loss and ours on one batch of TRL's own collation (its KL
    replies rotated within the batch), with a policy moved away from its reference."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    model = fresh_model(tiny_tokenizer)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    rows = [
        {"prompt": [{"role": "user", "content": prompt}],
         "completion": [{"role": "assistant", "content": reply}], "label": label}
        for prompt, reply, label in [("What is AI?", "A field of computing.", True),
                                     ("Name a colour.", "Blue.", False),
                                     ("Say hello.", "Hello there!", True),
                                     ("What is 2 + 2?", "Five, I think.", False)]
    ]  # fmt: skip
    k = KtoConfig(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    args = trl.KTOConfig(output_dir=str(tmp_path), beta=k.beta, report_to=[], use_cpu=True,
                         desirable_weight=k.desirable_weight,
                         undesirable_weight=k.undesirable_weight,
                         per_device_train_batch_size=len(rows), max_length=64)  # fmt: skip
    trainer = trl.KTOTrainer(model=model, ref_model=reference, args=args,
                             train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tiny_tokenizer)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trl_loss = trainer._compute_loss(model, batch, False)
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    ours = {}
    for prefix, ours_prefix in (("", ""), ("KL_", "kl_")):
        ids = batch[f"{prefix}input_ids"]
        ours[f"{ours_prefix}input_ids"] = ids
        ours[f"{ours_prefix}attention_mask"] = batch[f"{prefix}attention_mask"]
        ours[f"{ours_prefix}labels"] = ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, -100)
    with torch.no_grad():
        ours["ref_logps"], _ = reply_logps(reference, ours)
        ours["ref_kl_logps"], _ = reply_logps(
            reference, {name[3:]: value for name, value in ours.items() if name.startswith("kl_")}
        )
    ours["desirable"] = batch["label"].bool()
    objective = KtoLoss(k)
    loss = objective.loss_sum(model, ours) / objective.target_count(ours)
    sums = objective.take_metric_sums()
    assert float(loss.detach()) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    assert float(sums["kl"]) / len(rows) == pytest.approx(trl_metrics["kl"], rel=1e-5, abs=1e-6)
    _, rewards, _ = objective.losses(model, ours)
    desirable = ours["desirable"]
    assert float(rewards[desirable].mean()) == pytest.approx(trl_metrics["rewards/chosen"],
                                                             rel=1e-4, abs=1e-6)  # fmt: skip
    assert float(rewards[~desirable].mean()) == pytest.approx(trl_metrics["rewards/rejected"],
                                                              rel=1e-4, abs=1e-6)  # fmt: skip


# --- unpaired feedback files -----------------------------------------------------------------


def test_trl_format_files_read_with_bad_records_skipped(tmp_path: Path) -> None:
    records = [
        {"prompt": "What is AI?", "completion": "A field of computing.", "label": True},
        {"prompt": [{"role": "user", "content": "Hi"}],
         "completion": [{"role": "assistant", "content": "Go away."}], "label": False},
        {"prompt": "x", "completion": "y", "label": "yes"},  # not a boolean
        {"prompt": "x", "label": True},  # no completion
        {"prompt": [{"role": "assistant", "content": "x"}], "completion": "y", "label": True},
    ]  # fmt: skip
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    examples = unpaired.read_files([str(path)], "finetune.kto.files")
    assert [(e.prompt, e.completion, e.desirable) for e in examples] == [
        ([{"role": "user", "content": "What is AI?"}], "A field of computing.", True),
        ([{"role": "user", "content": "Hi"}], "Go away.", False),
    ]
    assert [e.id for e in examples] == [f"{path}:1", f"{path}:2"]


@pytest.mark.parametrize("content", ["", "\n", '{"prompt": "x"}\n'])
def test_files_without_a_usable_record_fail_naming_the_key(tmp_path: Path, content: str) -> None:
    path = tmp_path / "kto.jsonl"
    path.write_text(content)
    with pytest.raises(unpaired.UnpairedDataError, match=r"finetune\.kto\.files"):
        unpaired.read_files([str(path)], "finetune.kto.files")


def test_missing_files_fail_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(unpaired.UnpairedDataError, match=r"finetune\.kto\.files"):
        unpaired.read_files([str(tmp_path / "none-*.jsonl")], "finetune.kto.files")


def test_kl_replies_rotate_by_one_within_each_chunk_as_trl_pairs_them() -> None:
    examples = [Judged(str(i), USER, f"reply {i}", True) for i in range(5)]
    paired = unpaired.with_kl_completions(examples, batch_size=3)
    assert [e.kl_completion for e in paired] == ["reply 2", "reply 0", "reply 1",
                                                 "reply 4", "reply 3"]  # fmt: skip


def test_the_table_round_trips() -> None:
    splits = {"train": [Judged("a", USER, "yes", True, "no", -1.5, -2.5, "4")],
              "val": [], "test": [Judged("b", USER, "no", False, "yes", -3.0, -1.0)]}  # fmt: skip
    assert unpaired.judged_from_table(unpaired.judged_table(splits)) == splits


# --- the verifier's judged replies --------------------------------------------------------


def test_the_verifier_labels_every_reply_and_adds_the_solution_when_none_is_right() -> None:
    problem = Conversation("q", [*USER, {"role": "assistant", "content": "2 + 2 = 4\n#### 4"}],
                           answer="4")  # fmt: skip
    judged = judge_replies(problem, ["#### 4", "#### 5", ""])
    assert [(j.completion, j.desirable) for j in judged] == [("#### 4", True), ("#### 5", False)]
    judged = judge_replies(problem, ["#### 5", "no answer"])
    assert [(j.completion, j.desirable) for j in judged] == [
        ("#### 5", False), ("no answer", False), ("2 + 2 = 4\n#### 4", True)]  # fmt: skip
    assert all(j.answer == "4" and j.prompt == USER for j in judged)


def test_verifier_examples_are_deterministic_by_seed(tiny_tokenizer) -> None:
    model = talkative_model(tiny_tokenizer)
    conversations = {"train": arithmetic(4), "val": arithmetic(2), "test": arithmetic(2)}
    k = KtoConfig(samples=2, temperature=1.5, max_new_tokens=5, batch_size=4, max_prompts=3)
    first = verifier_examples(model, tiny_tokenizer, conversations, k, CPU, seed=0)
    assert verifier_examples(model, tiny_tokenizer, conversations, k, CPU, seed=0) == first
    assert len({e.id.rsplit(":", 1)[0] for e in first["train"]}) == 3  # max_prompts
    # each reply labelled by the checker; the solution joins exactly where none is right
    by_prompt: dict[str, list[Judged]] = {}
    for example in first["train"]:
        by_prompt.setdefault(example.id.rsplit(":", 1)[0], []).append(example)
    for examples in by_prompt.values():
        replies = [e for e in examples if not e.id.endswith(":reference")]
        assert all(e.desirable == is_correct(e.completion, e.answer) for e in replies)
        added = [e for e in examples if e.id.endswith(":reference")]
        assert len(added) == (not any(e.desirable for e in replies))
        assert all(e.desirable for e in added)
    assert any(not e.desirable for e in first["train"])
    other = verifier_examples(model, tiny_tokenizer, conversations, k, CPU, seed=1)
    assert other != first


# --- config and the task end to end ------------------------------------------------------


@pytest.mark.parametrize(
    ("finetune", "pattern"),
    [
        ({"kto": {"examples": "files"}}, r"finetune\.kto\.files"),
        ({"kto": {"files": ["x.jsonl"]}}, r"finetune\.kto\.examples"),
        ({"dataset": "chatterbot"}, r"finetune\.kto\.examples.*finetune\.dataset=chatterbot"),
        ({"packing": True}, r"finetune\.packing"),
        ({"kto": {"examples": "judge"}}, r"finetune\.kto\.examples"),
        ({"kto": {"beta": 0}}, r"finetune\.kto\.beta"),
        ({"kto": {"desirable_weight": -1}}, r"finetune\.kto\.desirable_weight"),
        ({"dataset": "trec"}, r"finetune\.dataset.*not a kto dataset"),
    ],
)
def test_bad_kto_configs_name_the_key(finetune: dict, pattern: str) -> None:
    settings = {"task": "kto", "dataset": "reasoning_gym", **finetune}
    with pytest.raises(ConfigError, match=pattern):
        checked_task(validate({"finetune": settings}))


def test_kto_builds_caches_and_trains_on_judged_replies(
    tiny_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmpipe.training.model import save_model

    base = tmp_path / "base"
    save_model(talkative_model(tiny_tokenizer), tiny_tokenizer, base)
    settings = {"task": "kto", "dataset": "reasoning_gym", "max_len": 64, "batch_size": 4,
                "reasoning_gym": {"train_size": 6, "val_size": 3, "test_size": 3},
                "kto": {"samples": 2, "max_new_tokens": 4, "batch_size": 8}}  # fmt: skip
    f = validate({"finetune": settings}).finetune
    problems = {"train": arithmetic(6), "val": arithmetic(3), "test": arithmetic(3)}
    # short problems: the tiny model's 64 positions hold them with their replies
    monkeypatch.setattr("lmpipe.tasks.kto.conversation_splits", lambda f: problems)
    task, table = KTO().prepare(f, base, tiny_tokenizer, CPU, tmp_path / "cache", DistEnv())
    assert set(table["split"]) == {"train", "val"}  # test: every held-out problem is scored
    assert table["ref_logp"].notna().all() and table["ref_kl_logp"].notna().all()
    assert table["label"].any() and not table["label"].all()
    monkeypatch.setattr("lmpipe.tasks.kto.verifier_examples",
                        lambda *a, **k: pytest.fail("the cache was not used"))  # fmt: skip
    f.kto.beta = 0.5  # not part of what an example is
    _, again = KTO().prepare(f, base, tiny_tokenizer, CPU, tmp_path / "cache", DistEnv())
    assert again.equals(table)
    with pytest.raises(RuntimeError, match="no examples"):
        KTO().splits(f)
    setup = task.setup(f, base, tiny_tokenizer, 0, CPU)
    batch = next(setup.batches)
    assert batch["input_ids"].shape[0] == f.batch_size
    assert {"kl_input_ids", "ref_logps", "ref_kl_logps", "desirable"} <= set(batch)
    loss = setup.objective.loss_sum(setup.model, batch)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in setup.model.parameters())
    assert set(setup.evaluate(setup.model)) >= {"loss", "kl", "rewards/signed"}
    # at step 0 the policy is its reference: every reward is 0 and z₀ is 0
    with torch.no_grad():
        _, rewards, kl = setup.objective.losses(setup.model.eval(), batch)
    torch.testing.assert_close(rewards, torch.zeros_like(rewards), atol=1e-4, rtol=0)
    assert float(kl) == pytest.approx(0.0, abs=1e-5)
    # evaluate scores every held-out problem, as SFT does
    held_out = task.held_out_conversations(f)
    assert held_out == problems


def test_the_kto_policy_at_step_0_equals_its_reference_in_bf16(tiny_tokenizer, tmp_path: Path):
    """As for preference pairs: the reference's log-probs of each reply and KL reply, taken
    before training, equal the policy's in its shuffled training batches under bf16
    autocast, because both are computed in the same shapes."""
    from tests.test_preference import wide_talkative_base

    base = wide_talkative_base(tiny_tokenizer, tmp_path / "base")
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "and",
        "runs",
        "far",
        "away",
    ]
    records = [{"prompt": [{"role": "user", "content": " ".join(words[: 2 + i % 5])}],
                "completion": [{"role": "assistant",
                                "content": " ".join(words[i % 7 : i % 7 + 1 + (5 * i) % 9])}],
                "label": i % 3 != 0} for i in range(40)]  # fmt: skip
    data = tmp_path / "judged.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = {"task": "kto", "max_len": 60, "batch_size": 3,
                "kto": {"examples": "files", "files": [str(data)]}}  # fmt: skip
    f = validate({"finetune": settings}).finetune
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task, _ = KTO().prepare(f, base, tiny_tokenizer, CPU, tmp_path / "cache", DistEnv())
        setup = task.setup(f, base, tiny_tokenizer, seed=5, device=CPU)
        policy = setup.model.eval()
        gaps = []
        with torch.no_grad():
            for _ in range(4):
                batch = next(setup.batches)
                logps, _ = reply_logps(policy, batch)
                kl_batch = {k.removeprefix("kl_"): v for k, v in batch.items()
                            if k.startswith("kl_")}  # fmt: skip
                kl_logps, _ = reply_logps(policy, kl_batch)
                gaps += [(logps - batch["ref_logps"]).abs(),
                         (kl_logps - batch["ref_kl_logps"]).abs()]  # fmt: skip
    gaps = torch.cat(gaps)
    assert len(gaps) >= 24
    assert float(gaps.max()) < 1e-4


def test_verifier_examples_are_cached_per_seed_and_sampling(tiny_tokenizer, tmp_path: Path):
    """What draws or judges the replies is in the cache key; what only trains on them is not."""
    from lmpipe.tasks.kto import _cache_path
    from lmpipe.training.loop import policy_numerics
    from lmpipe.training.model import save_model

    base = tmp_path / "base"
    save_model(fresh_model(tiny_tokenizer), tiny_tokenizer, base)
    f = validate({"finetune": {"task": "kto", "dataset": "reasoning_gym"}}).finetune
    fp32 = policy_numerics(HardwareConfig(), CPU)
    path = _cache_path(tmp_path, base, f, 0, fp32)
    assert _cache_path(tmp_path, base, f, 1, fp32) != path
    for key, value in (("temperature", 0.7), ("samples", f.kto.samples + 1),
                       ("max_new_tokens", f.kto.max_new_tokens + 1)):  # fmt: skip
        changed = copy.deepcopy(f)
        changed.kto[key] = value
        assert _cache_path(tmp_path, base, changed, 0, fp32) != path, key
    changed = copy.deepcopy(f)
    changed.reasoning_gym.test_size = 7
    assert _cache_path(tmp_path, base, changed, 0, fp32) != path
    changed = copy.deepcopy(f)
    changed.kto.beta = 0.5  # the loss's, not the examples'
    assert _cache_path(tmp_path, base, changed, 0, fp32) == path


def test_kto_starts_from_an_sft_phase_shared_with_the_other_feedback_methods() -> None:
    """finetune.kto.sft_steps: SFT first (KTO's paper setting); the phase's config leaves
    every task's own settings out, so KTO, preference, rejection sampling and GRPO with the
    same SFT steps and lr share one SFT model."""
    from lmpipe.runs.config import FinetuneConfig
    from lmpipe.tasks.grpo import GRPO
    from lmpipe.tasks.rejection_sampling import RejectionSampling

    f = FinetuneConfig(task="kto", dataset="reasoning_gym")
    assert KTO().sft_first(f) is None  # 0 steps: KTO from the pretrained model
    f.kto.sft_steps, f.kto.sft_lr = 7, 2e-3
    phase = KTO().sft_first(f)
    assert phase.task == "sft" and phase.steps == 7 and phase.optim.lr == 2e-3
    f.kto.beta = 0.5  # a KTO setting: the same phase
    assert KTO().sft_first(f) == phase
    for task, group in ((RejectionSampling(), "rejection_sampling"), (GRPO(), "grpo")):
        other = FinetuneConfig(task=task.name, dataset="reasoning_gym")
        getattr(other, group).sft_steps, getattr(other, group).sft_lr = 7, 2e-3
        assert task.sft_first(other) == phase
