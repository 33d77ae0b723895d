"""Preference optimisation (finetune=preference): the losses against hand-worked cases and
TRL, the log-probs they rest on, the pair data, and SPIN's pairs and their cache."""

from __future__ import annotations

import copy
import gzip
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lmpipe.feedback.pairs import (
    judge_samples,
    opening_pairs,
    sample_replies,
    spin_pairs,
    verifier_pairs,
)
from lmpipe.runs.config import (
    ConfigError,
    FinetuneConfig,
    HardwareConfig,
    PreferenceConfig,
    validate,
)
from lmpipe.runs.processes import DistEnv
from lmpipe.taskdata import pairs as pref
from lmpipe.taskdata.conversations import Conversation
from lmpipe.tasks.finetuning import checked_task
from lmpipe.tasks.preference import Preference
from lmpipe.training.logprobs import reference_logps, reply_logps
from lmpipe.training.loop import policy_numerics, seed_everything
from lmpipe.training.pair_losses import (
    TIE_MARGIN,
    PairScores,
    PreferenceLoss,
    pair_metrics,
    preference_losses,
)
from tests.test_train import fresh_model

CPU = torch.device("cpu")

# The hand-worked case of torchtune's DPO loss tests (tests/torchtune/rlhf/loss/
# test_dpo_loss.py): policy ratios [-0.4, 20, 20] and reference ratios [-0.4, 10, 0], so
# Δ = [0, 10, 20] and, at β = 0.1, βΔ = [0, 1, 2].
POLICY_CHOSEN = torch.tensor([-0.5, -10.0, -1.0])
POLICY_REJECTED = torch.tensor([-0.1, -30.0, -21.0])
REF_CHOSEN = torch.tensor([-0.5, -10.1, -0.1])
REF_REJECTED = torch.tensor([-0.1, -20.1, -0.1])
ONE_TOKEN = torch.ones(3)  # per-token averages equal the sums (IPO, SimPO)


def losses_of(loss: str, **settings) -> torch.Tensor:
    p = PreferenceConfig(loss=loss, **settings)
    losses, _, _ = preference_losses(p, POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN,
                                     REF_REJECTED, ONE_TOKEN, ONE_TOKEN)  # fmt: skip
    return losses


def test_dpo_sigmoid_loss_of_the_hand_worked_case() -> None:
    # −log σ(x) = log(1 + e^−x) at x = 0, 1, 2
    expected = torch.tensor([math.log(2), math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2))])
    torch.testing.assert_close(losses_of("sigmoid", beta=0.1), expected)


def test_hinge_loss_of_the_hand_worked_case() -> None:
    # max(0, 1 − βΔ) at βΔ = 0, 1, 2 (torchtune's RSO case)
    torch.testing.assert_close(losses_of("hinge", beta=0.1), torch.tensor([1.0, 0.0, 0.0]))


def test_ipo_loss_of_the_hand_worked_case() -> None:
    # (Δ − 1/(2β))² with 1/(2β) = 5: (0−5)², (10−5)², (20−5)²
    torch.testing.assert_close(losses_of("ipo", beta=0.1), torch.tensor([25.0, 25.0, 225.0]))


def test_robust_loss_of_the_hand_worked_case() -> None:
    # ((1−ε)·log(1+e^−x) − ε·log(1+e^x)) / (1−2ε), ε = 0.1; at x = 0 it is ln 2 for any ε
    def robust(x: float) -> float:
        return (0.9 * math.log(1 + math.exp(-x)) - 0.1 * math.log(1 + math.exp(x))) / 0.8

    expected = torch.tensor([robust(0.0), robust(1.0), robust(2.0)])
    torch.testing.assert_close(losses_of("robust", beta=0.1, label_smoothing=0.1), expected)
    assert float(expected[0]) == pytest.approx(math.log(2))
    # with ε = 0 it is DPO
    torch.testing.assert_close(losses_of("robust", beta=0.1), losses_of("sigmoid", beta=0.1))


def test_simpo_loss_of_the_hand_worked_case() -> None:
    # torchtune's SimPO case: β = 2, γ = 0.5, policy ratios [-0.4, 20, 20]:
    # −log σ(2·[-0.4, 20, 20] − 0.5) = −log σ([-1.3, 39.5, 39.5])
    expected = -torch.log(1 / (1 + torch.exp(torch.tensor([1.3, -39.5, -39.5]))))
    torch.testing.assert_close(losses_of("simpo", beta=2.0, simpo_gamma=0.5), expected)


def test_rewards_are_beta_times_the_log_ratio() -> None:
    p = PreferenceConfig(loss="sigmoid", beta=0.1)
    _, chosen, rejected = preference_losses(p, POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN,
                                            REF_REJECTED, ONE_TOKEN, ONE_TOKEN)  # fmt: skip
    torch.testing.assert_close(chosen, torch.tensor([0.0, 0.01, -0.09]))
    torch.testing.assert_close(rejected, torch.tensor([0.0, -0.99, -2.09]))


# --- on a model ------------------------------------------------------------------------------


PROMPTS = ["What is AI?", "Hello, how are you today?", "What is the state of the union?"]
CHOSEN = ["The study of thinking machines.", "I am fine, thank you.", "It is strong."]
REJECTED = ["A fox.", "The lazy dog jumps over the brown fox today.", "Hello."]


def pairs_with_reference(model, tokenizer) -> list[pref.PairExample]:
    triples = zip(PROMPTS, CHOSEN, REJECTED, strict=True)
    pairs = [pref.Pair(str(i), [{"role": "user", "content": p}], c, r)
             for i, (p, c, r) in enumerate(triples)]  # fmt: skip
    examples = pref.encode_pairs(tokenizer, pairs, max_len=64)
    filled = reference_logps(model, examples, 2, tokenizer.pad_token_id, CPU)
    return [
        pref.PairExample(f, e.chosen, e.rejected) for f, e in zip(filled, examples, strict=True)
    ]


def test_a_reply_alone_has_the_log_prob_it_has_inside_a_padded_batch(tiny_tokenizer) -> None:
    model = fresh_model(tiny_tokenizer).eval()
    examples = pairs_with_reference(model, tiny_tokenizer)
    batch = pref.collate_pairs(examples, tiny_tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    with torch.no_grad():
        together, counts = reply_logps(model, batch)
        for row, example in enumerate(
            [e.chosen for e in examples] + [e.rejected for e in examples]
        ):
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].double()
            targets = labels[0, 1:]
            by_hand = sum(float(logits[t].log_softmax(-1)[targets[t]])
                          for t in range(len(targets)) if targets[t] != -100)  # fmt: skip
            assert float(together[row]) == pytest.approx(by_hand, rel=1e-5, abs=1e-4)
            assert int(counts[row]) == int((targets != -100).sum())


def test_policy_equal_to_reference_gives_ln2_zero_rewards_and_a_gradient(tiny_tokenizer) -> None:
    model = fresh_model(tiny_tokenizer)
    examples = pairs_with_reference(model, tiny_tokenizer)
    batch = pref.collate_pairs(examples, tiny_tokenizer.pad_token_id)
    objective = PreferenceLoss(PreferenceConfig(beta=0.1))
    model.train()
    loss = objective.loss_sum(model, batch) / objective.target_count(batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    sums = objective.take_metric_sums()
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert float(sums[name]) == pytest.approx(0.0, abs=1e-6), name
    # Every margin is float noise: each pair a tie, counted half (not decided by the noise).
    assert float(sums["rewards/accuracies"]) == objective.target_count(batch) / 2
    assert objective.take_metric_sums() == {}  # taken once
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert float(norm) > 1e-3


def test_validation_reports_the_loss_and_trls_reward_values(tiny_tokenizer) -> None:
    model = fresh_model(tiny_tokenizer)
    examples = pairs_with_reference(model, tiny_tokenizer)
    batches = [pref.collate_pairs(examples[:2], 0), pref.collate_pairs(examples[2:], 0)]
    values = pair_metrics(model, batches, PreferenceConfig(), CPU)
    assert values["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert set(values) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies",
                           "rewards/margins", "logps/chosen", "logps/rejected"}  # fmt: skip


@pytest.mark.parametrize(
    ("loss", "settings"),
    [("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.1})],
)
def test_loss_and_rewards_equal_trls_on_the_same_batch(
    loss: str, settings: dict, tiny_tokenizer, tmp_path: Path
) -> None:
    """TRL's DPOTrainer computes its loss and metrics on a batch it tokenized itself; ours,
    on the same tokens, must agree."""
    assert_trl_parity(PreferenceConfig(loss=loss, beta=0.2, **settings),
                      {"loss_type": [loss], **settings}, 3, tiny_tokenizer, tmp_path)  # fmt: skip


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_the_sft_term_equals_trls_sigmoid_plus_sft_loss(
    weight: float, tiny_tokenizer, tmp_path: Path
) -> None:
    """RPO: DPO plus the weighted mean token NLL of the chosen reply, TRL's loss_type
    ["sigmoid", "sft"] with loss_weights [1, weight]. TRL averages the NLL over a micro-batch's
    tokens and we per pair: the same on one pair."""
    assert_trl_parity(PreferenceConfig(loss="sigmoid", beta=0.2, sft_weight=weight),
                      {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, weight]}, 1,
                      tiny_tokenizer, tmp_path)  # fmt: skip


def assert_trl_parity(
    p: PreferenceConfig, trl_settings: dict, pairs: int, tiny_tokenizer, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    model = fresh_model(tiny_tokenizer)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():  # a policy that has moved away from its reference
        generator = torch.Generator().manual_seed(3)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    rows = [{"prompt": [{"role": "user", "content": p}],
             "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)][:pairs]  # fmt: skip
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=p.beta, report_to=[], use_cpu=True,
                         per_device_train_batch_size=pairs, max_length=64,
                         **trl_settings)  # fmt: skip
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args,
                             train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tiny_tokenizer)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trl_loss = trainer._compute_loss(model, batch, False)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
    }
    with torch.no_grad():
        ref_logps, _ = reply_logps(reference, ours)
    ours["ref_logps"] = ref_logps
    objective = PreferenceLoss(p)
    loss_value = objective.loss_sum(model, ours) / objective.target_count(ours)
    sums = objective.take_metric_sums()
    pairs = objective.target_count(ours)
    assert float(loss_value.detach()) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    for name, total in sums.items():
        assert float(total) / pairs == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


# --- pair data ---------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def test_preference_files_in_every_hugging_face_format(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Hi?"}
    records = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},  # strings
        {"prompt": [{"role": "system", "content": "Be kind."}, user],  # explicit prompt
         "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [user, {"role": "assistant", "content": "Hello!"}],  # implicit prompt
         "rejected": [user, {"role": "assistant", "content": "Bye."}]},
    ]  # fmt: skip
    write_jsonl(tmp_path / "a.jsonl", records[:2])
    write_jsonl(tmp_path / "b.jsonl.gz", records[2:], gzip.open)
    pairs, bad = pref.read_pair_files([str(tmp_path / "*.jsonl*")])
    assert not bad
    assert [p.prompt for p in pairs] == [[user], [{"role": "system", "content": "Be kind."}, user],
                                         [user]]  # fmt: skip
    assert [(p.chosen, p.rejected) for p in pairs] == [("Hello!", "Go away."), ("Hello!", "No."),
                                                       ("Hello!", "Bye.")]  # fmt: skip
    assert pairs[0].id == f"{tmp_path / 'a.jsonl'}:1" and pairs[2].id.endswith("b.jsonl.gz:1")


def test_bad_preference_records_are_counted_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        good, "{not json", {"prompt": "Hi?", "chosen": "Hello!"}, ["a", "list"],
        {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "rejected": [{"role": "user", "content": "other"},
                      {"role": "assistant", "content": "c"}]},
    ])  # fmt: skip
    with caplog.at_level("WARNING"):
        pairs, bad = pref.read_pair_files([str(path)])
    assert len(pairs) == 1 and sum(bad.values()) == 6
    assert any(reason.startswith("invalid JSON") for reason in bad)
    assert bad["missing field(s) ['rejected']"] == 1
    assert bad["not a JSON object"] == 1
    assert bad["'chosen' and 'rejected' are the same reply"] == 1
    assert bad["'chosen' must be one assistant message"] == 1
    assert any("do not share all turns" in reason for reason in bad)
    assert f"{path}:2" in caplog.text  # the bad JSON's line is named


def test_files_without_a_usable_record_fail_naming_the_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "x"}])
    with pytest.raises(pref.PreferenceDataError, match=r"finetune\.preference\.files.*1 x missing"):
        pref.read_pair_files([str(path)])
    with pytest.raises(pref.PreferenceDataError, match=r"finetune\.preference\.files"):
        pref.read_pair_files([str(tmp_path / "nothing-*.jsonl")])


def test_a_reply_is_labelled_alone_after_a_multi_turn_prompt(tiny_tokenizer) -> None:
    prompt = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "What is AI?"}]  # fmt: skip
    encoded = pref.encode_reply(tiny_tokenizer, prompt, "Thinking machines.", 64)
    labelled = [t for t in encoded["labels"] if t != -100]
    alone = pref.encode_reply(tiny_tokenizer, prompt[-1:], "Thinking machines.", 64)
    assert labelled == [t for t in alone["labels"] if t != -100]  # the last reply only
    assert pref.encode_reply(tiny_tokenizer, prompt, "Thinking machines.", 8) is None


def test_pairs_round_trip_through_their_table() -> None:
    pair = pref.Pair("x", [{"role": "user", "content": "Hi?"}], "Hello!", "No.", -3.5, -7.25)
    back = pref.pairs_from_table(pref.pairs_table({"train": [pair], "val": [], "test": []}))
    assert back["train"] == [pair]


# --- SPIN's pairs ------------------------------------------------------------------------------


def talkative_model(tokenizer) -> torch.nn.Module:
    """A random model whose greedy replies hold more than whitespace."""
    model = fresh_model(tokenizer)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model


def test_spin_pairs_reject_the_models_own_greedy_reply(tiny_tokenizer) -> None:
    model = talkative_model(tiny_tokenizer)
    conversations = {
        "train": [Conversation(f"c{i}", [{"role": "user", "content": p},
                                         {"role": "assistant", "content": c}])
                  for i, (p, c) in enumerate(zip(PROMPTS, CHOSEN, strict=True))],
        "val": [], "test": [],
    }  # fmt: skip
    p = PreferenceConfig(max_new_tokens=6, batch_size=2)
    first = spin_pairs(model, tiny_tokenizer, conversations, p, CPU)
    again = spin_pairs(model, tiny_tokenizer, conversations, p, CPU)
    assert first == again  # deterministic
    from lmpipe.feedback.rollouts import generate_replies

    assert len(first["train"]) == 3
    for pair in first["train"]:
        assert pair.chosen == CHOSEN[PROMPTS.index(pair.prompt[0]["content"])]
        reply = generate_replies(model, tiny_tokenizer, [pair.prompt[0]["content"]], 6,
                                 min_new_tokens=1)[0]  # fmt: skip
        assert pair.rejected == reply
    sampled = spin_pairs(model, tiny_tokenizer, conversations,
                         PreferenceConfig(max_new_tokens=6, max_pairs=2), CPU)  # fmt: skip
    assert len(sampled["train"]) == 2


def test_prepared_pairs_are_cached_per_starting_model(
    tiny_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmpipe.training.model import save_model

    base = tmp_path / "base"
    save_model(talkative_model(tiny_tokenizer), tiny_tokenizer, base)
    settings = {"task": "preference", "max_len": 48, "batch_size": 2,
                "preference": {"max_pairs": 8, "max_new_tokens": 4}}  # fmt: skip
    f = validate({"finetune": settings}).finetune
    task, table = Preference().prepare(f, base, tiny_tokenizer, CPU, tmp_path / "cache",
                                       DistEnv())  # fmt: skip
    assert set(table["split"]) == {"train", "val", "test"}
    assert (table["split"] == "train").sum() <= 8
    assert table["ref_chosen"].notna().all() and table["ref_rejected"].notna().all()
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 1
    monkeypatch.setattr("lmpipe.tasks.preference.spin_pairs",
                        lambda *a, **k: pytest.fail("the cache was not used"))  # fmt: skip
    f.preference.beta = 0.5  # not part of what a pair is
    _, again = Preference().prepare(f, base, tiny_tokenizer, CPU, tmp_path / "cache", DistEnv())
    assert again.equals(table)
    setup = task.setup(f, base, tiny_tokenizer, 0, CPU)
    batch = next(setup.batches)
    assert batch["input_ids"].shape[0] == 2 * f.batch_size  # a pair's replies together
    assert setup.counts["train_pairs"] == (table["split"] == "train").sum()


def wide_talkative_base(tokenizer, path: Path) -> Path:
    """A random model saved at `path`, wide enough that CPU bf16 kernels round differently
    by padded width (hidden 32 is not), with replies of more than whitespace."""
    from lmpipe.runs.config import ModelConfig
    from lmpipe.training.model import build_model, save_model

    seed_everything(0)
    model = build_model(
        ModelConfig(
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=256,
            max_seq_len=64,
        ),
        tokenizer,
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as talkative_model
        for param in model.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    save_model(model, tokenizer, path)
    return path


def step_0_gaps(
    tokenizer, tmp_path: Path, device: torch.device, hardware: HardwareConfig, bf16
) -> torch.Tensor:
    """|policy − reference| log-prob of every reply in 4 shuffled training batches at step 0,
    everything under `bf16` (an autocast context), the reference's pass included."""
    base = wide_talkative_base(tokenizer, tmp_path / "base")
    settings = {"task": "preference", "max_len": 60, "batch_size": 3,
                "preference": {"max_pairs": 12, "max_new_tokens": 24}}  # fmt: skip
    f = validate({"finetune": settings}).finetune
    with bf16:
        task, _ = Preference().prepare(f, base, tokenizer, device, tmp_path / "cache", DistEnv(),
                                       hardware)  # fmt: skip
        setup = task.setup(f, base, tokenizer, seed=5, device=device)
        policy = setup.model.to(device).eval()
        if hardware.compile:  # as `train` runs the policy
            policy = torch.compile(policy)
        gaps = []
        with torch.no_grad():
            for _ in range(4):
                batch = {k: v.to(device) for k, v in next(setup.batches).items()}
                logps, _ = reply_logps(policy, batch)
                gaps.append((logps - batch["ref_logps"]).abs())
    return torch.cat(gaps)


def test_the_policy_at_step_0_equals_its_reference_in_bf16(tiny_tokenizer, tmp_path: Path) -> None:
    """Under bf16 autocast (CPU here, as on CUDA) the reference's log-probs, computed before
    training, equal the policy's in its shuffled training batches: a tie, not a preference.
    With each batch padded to its own longest reply they differ by up to ~0.07."""
    gaps = step_0_gaps(tiny_tokenizer, tmp_path, CPU, HardwareConfig(),
                       torch.autocast("cpu", dtype=torch.bfloat16))  # fmt: skip
    assert len(gaps) >= 16
    assert float(gaps.max()) < TIE_MARGIN


def test_the_reference_is_computed_by_the_model_as_training_shapes_it(tiny_model) -> None:
    """reference_by_split hands `compute` the policy-shaped model: compiled where training
    compiles (a compiled policy's numbers are not the eager model's), else the model."""
    from lmpipe.tasks.base import reference_by_split

    seen = []

    def compute(reference: torch.nn.Module, examples: list) -> list:
        seen.append(reference)
        return [len(examples)]

    got = reference_by_split(tiny_model, HardwareConfig(compile=True), CPU,
                             {"train": [1, 2], "test": [3]}, compute)  # fmt: skip
    assert got == {"train": [2], "test": [1]}
    assert all(isinstance(r, torch._dynamo.eval_frame.OptimizedModule) for r in seen)
    assert all(r._orig_mod is tiny_model for r in seen)
    seen.clear()
    reference_by_split(tiny_model, HardwareConfig(), CPU, {"train": [1]}, compute)
    assert seen == [tiny_model]


@pytest.mark.slow
def test_a_compiled_policy_at_step_0_equals_its_reference(tiny_tokenizer, tmp_path: Path) -> None:
    """hardware.compile=true on the CPU under bf16 autocast: the reference's log-probs are
    computed by the compiled model too, so they tie with the compiled policy's."""
    gaps = step_0_gaps(tiny_tokenizer, tmp_path, CPU, HardwareConfig(compile=True),
                       torch.autocast("cpu", dtype=torch.bfloat16))  # fmt: skip
    assert len(gaps) >= 16
    assert float(gaps.max()) < TIE_MARGIN


# --- verifier pairs ----------------------------------------------------------------------------


def problem(answer: str, reference: str = "2 + 2 = 4\n#### 4") -> pref.Pair:
    return pref.Pair("p", [{"role": "user", "content": "2 + 2 ="}], reference, "", answer=answer)


def test_the_verifier_chooses_a_correct_sample_over_a_wrong_one() -> None:
    pair, source = judge_samples(problem("4"), ["#### 5", "", "so #### 4", "#### 4", "3"])
    assert source == "model"
    assert (pair.chosen, pair.rejected, pair.answer) == ("so #### 4", "#### 5", "4")


def test_the_verifier_falls_back_to_the_reference_solution() -> None:
    pair, source = judge_samples(problem("4"), ["no answer", "#### 5"])
    assert source == "reference"
    assert (pair.chosen, pair.rejected) == ("2 + 2 = 4\n#### 4", "no answer")


def test_a_problem_solved_in_every_sample_makes_no_pair() -> None:
    assert judge_samples(problem("4"), ["#### 4", "4", ""]) == (None, "solved")
    assert judge_samples(problem("4"), ["", ""]) == (None, "solved")  # nothing to reject


def test_the_verifier_needs_an_answer_to_check() -> None:
    with pytest.raises(ValueError, match="no answer"):
        judge_samples(pref.Pair("p", [{"role": "user", "content": "x"}], "y", ""), ["z"])


def arithmetic(n: int) -> list[Conversation]:
    return [Conversation(f"q{i}", [{"role": "user", "content": f"{i} + 1 ="},
                                   {"role": "assistant", "content": f"#### {i + 1}"}],
                         answer=str(i + 1)) for i in range(n)]  # fmt: skip


def test_verifier_pairs_are_deterministic_by_seed_and_leave_the_callers_stream(
    tiny_tokenizer,
) -> None:
    model = talkative_model(tiny_tokenizer)
    conversations = {"train": arithmetic(4), "val": arithmetic(2), "test": arithmetic(2)}
    p = PreferenceConfig(pairs="verifier", samples=3, temperature=1.5, max_new_tokens=5,
                         batch_size=4)  # fmt: skip
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    first = verifier_pairs(model, tiny_tokenizer, conversations, p, CPU, seed=0)
    torch.testing.assert_close(torch.rand(3), expected_next)  # the caller's stream is as it was
    again = verifier_pairs(model, tiny_tokenizer, conversations, p, CPU, seed=0)
    assert again == first
    # a random model never answers right: every problem makes a pair, its reference chosen
    for split, items in conversations.items():
        assert [pair.chosen for pair in first[split]] == [c.messages[1]["content"]
                                                          for c in items]  # fmt: skip
    assert [pair.chosen for pair in first["train"]] == ["#### 1", "#### 2", "#### 3", "#### 4"]
    assert all(pair.answer is not None and pair.rejected for pair in first["train"])
    prompts = [c.prompt for c in conversations["train"]]
    samples = sample_replies(model, tiny_tokenizer, prompts, p, CPU, seed=0)
    assert [pair.rejected for pair in first["train"]] == [s[0] for s in samples]
    other = sample_replies(model, tiny_tokenizer, prompts, p, CPU, seed=1)
    assert other != samples and len(other) == 4 and all(len(s) == 3 for s in other)


def test_verifier_models_are_scored_on_every_held_out_problem(
    tiny_tokenizer, tmp_path: Path
) -> None:
    """A test problem the model solved in every sample made no pair; its answer still
    counts, or dropping the easy problems would inflate the accuracy."""
    import pandas as pd

    from lmpipe.runs.config import EvaluateConfig
    from lmpipe.tasks.sft import conversation_splits

    settings = {"task": "preference", "dataset": "reasoning_gym", "max_len": 128,
                "preference": {"pairs": "verifier"},
                "reasoning_gym": {"train_size": 8, "val_size": 2, "test_size": 3}}  # fmt: skip
    f = validate({"finetune": settings}).finetune
    problems = conversation_splits(f)
    model = talkative_model(tiny_tokenizer).eval()
    paired = replace(opening_pairs(problems, None)["test"][0], rejected="#### 0")
    examples = pref.encode_pairs(tiny_tokenizer, [paired], f.max_len)
    splits = {
        "train": [],
        "val": [],
        "test": reference_logps(model, examples, 2, tiny_tokenizer.pad_token_id, CPU),
    }
    task = Preference(splits, f.preference)
    e = EvaluateConfig(max_new_tokens=4, batch_size=4)
    frame = task.predict({"finetuned": model}, tiny_tokenizer, splits, f, e)
    path = tmp_path / "predictions.csv"
    frame.to_csv(path, index=False)
    metrics = task.score(pd.read_csv(path, keep_default_na=False), ["finetuned"], splits)
    assert metrics["sft_test_examples"] == 3 and metrics["preference_test_pairs"] == 1
    assert {"finetuned_exact_match", "finetuned_exact_match_low", "most_frequent_exact_match",
            "retrieval_exact_match", "finetuned_reward_accuracy"} <= set(metrics)  # fmt: skip


def test_pairs_keep_their_answer_through_the_table() -> None:
    pair = replace(problem("4"), rejected="#### 5", ref_chosen=-1.0, ref_rejected=-2.0)
    back = pref.pairs_from_table(pref.pairs_table({"train": [pair], "val": [], "test": []}))
    assert back["train"] == [pair]
    old = pref.pairs_table({"train": [pair]}).drop(columns="answer")  # a table from before
    assert pref.pairs_from_table(old)["train"][0].answer is None


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finetune", "pattern"),
    [
        ({"lora": {"enabled": True}}, r"finetune\.lora.*finetune\.peft\.method=lora"),
        ({"task": "preference", "preference": {"loss": "kto"}}, r"finetune\.preference\.loss"),
        ({"task": "preference", "preference": {"beta": 0}}, r"finetune\.preference\.beta"),
        ({"task": "preference", "preference": {"label_smoothing": 0.5}},
         r"finetune\.preference\.label_smoothing"),
        ({"task": "preference", "preference": {"pairs": "files"}}, r"finetune\.preference\.files"),
        ({"task": "preference", "preference": {"files": ["x.jsonl"]}},
         r"finetune\.preference\.pairs"),
        ({"task": "preference", "packing": True}, r"finetune\.packing"),
        ({"task": "preference", "preference": {"pairs": "verifier"}},
         r"finetune\.preference\.pairs.*finetune\.dataset=chatterbot"),
        ({"task": "preference", "preference": {"samples": 0}}, r"finetune\.preference\.samples"),
        ({"task": "preference", "preference": {"temperature": 0}},
         r"finetune\.preference\.temperature"),
        ({"peft": {"method": "prefix"}}, r"finetune\.peft\.method"),
    ],
)  # fmt: skip
def test_bad_preference_and_peft_configs_name_the_key(finetune: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        checked_task(validate({"finetune": finetune}))  # the schema's rules, then the task's


def test_the_preference_loss_matches_its_formula_on_random_values() -> None:
    """Guards the hand-worked cases against a coincidence at βΔ in {0, 1, 2}."""
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(5, generator=generator) * 10 for _ in range(4)]
    p = FinetuneConfig().preference
    losses, _, _ = preference_losses(p, *values, torch.ones(5), torch.ones(5))
    delta = (values[0] - values[2]) - (values[1] - values[3])
    torch.testing.assert_close(losses, -F.logsigmoid(p.beta * delta))
    scores = PairScores(torch.cat(values[:2]), torch.ones(10), torch.cat(values[2:]))
    torch.testing.assert_close(scores.losses(p)[0], losses)


def test_held_out_reward_accuracy_counts_ties_half() -> None:
    from lmpipe.training.pair_losses import reward_accuracy

    assert reward_accuracy(torch.tensor([1e-7, -3e-6, 0.0, 2e-7])) == 0.5  # the reference
    assert reward_accuracy(torch.tensor([0.5, -0.5, 0.2, 0.0])) == pytest.approx(0.625)


def test_training_logs_reward_accuracy_with_the_held_out_tie_rule() -> None:
    """The same margins give the same share in training's sums as in the held-out metric, so
    noise-level margins (1 process against 2) cannot flip `rewards/accuracies`."""
    from lmpipe.training.pair_losses import pair_metric_sums, reward_accuracy

    margins = torch.tensor([3e-7, 2e-7, 0.3, -0.3, 5e-5, 6e-5])
    scores = SimpleNamespace(chosen=torch.zeros(6), rejected=torch.zeros(6))
    sums = pair_metric_sums(scores, margins, torch.zeros(6))
    # 4 ties count 2, one win 1, one loss 0 (a strict > would count 5)
    assert float(sums["rewards/accuracies"]) == 3.0
    assert float(sums["rewards/accuracies"]) / 6 == reward_accuracy(margins)


def test_held_out_scores_come_from_the_saved_predictions(tiny_tokenizer, tmp_path: Path) -> None:
    """predict → CSV (empty cells for a pair cut away by max_len) → score: the starting
    model, which is the reference, scores 0.5 with a zero margin; a tuned copy does not."""
    import pandas as pd

    from lmpipe.runs.config import EvaluateConfig

    reference = talkative_model(tiny_tokenizer).eval()
    examples = pairs_with_reference(reference, tiny_tokenizer)
    test = [e.pair for e in examples]
    too_long = pref.Pair("long", [{"role": "user", "content": "What is AI? " * 30}], "Yes.", "No.")
    tuned = copy.deepcopy(reference)
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.3)  # shifts every log-prob
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    f = FinetuneConfig(task="preference", max_len=40)
    task = Preference(loss=f.preference)
    e = EvaluateConfig(num_generations=2, max_new_tokens=4, batch_size=2)
    splits = {"train": test, "val": [], "test": [*test, too_long]}
    frame = task.predict({"pretrained": reference, "finetuned": tuned}, tiny_tokenizer, splits,
                         f, e)  # fmt: skip
    path = tmp_path / "predictions.csv"
    frame.to_csv(path, index=False)
    saved = pd.read_csv(path, keep_default_na=False)  # as evaluate reads it
    metrics = task.score(saved, ["pretrained", "finetuned"], splits)
    assert metrics["preference_test_pairs"] == len(test)  # the long one cannot be scored
    assert metrics["pretrained_reward_accuracy"] == 0.5
    assert metrics["pretrained_reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["finetuned_reward_margin"] != pytest.approx(0.0, abs=1e-3)
    numbers = saved[saved["chosen_tokens"] != ""]
    chosen, rejected = (
        numbers["chosen_tokens"].astype(float),
        numbers["rejected_tokens"].astype(float),
    )
    shorter = ((chosen < rejected) + 0.5 * (chosen == rejected)).mean()
    assert metrics["shorter_reply_accuracy"] == pytest.approx(shorter)
    assert {"finetuned_sft_test_loss", "finetuned_chrf", "retrieval_chrf"} <= set(metrics)
    figure = task.report(saved, metrics, ["pretrained", "finetuned"], e).figures
    assert "preference_tradeoff.png" in figure


def test_simpo_loss_and_rewards_equal_trls_cpo_simpo() -> None:
    """SimPO lives in TRL's CPOTrainer (loss_type="simpo", on mean token log-probs); its
    loss function needs only the settings, so it is called on a stand-in trainer."""
    from types import SimpleNamespace

    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    generator = torch.Generator().manual_seed(1)
    chosen, rejected = -5 * torch.rand(2, 6, generator=generator)  # summed log-probs
    chosen_tokens = torch.tensor([1.0, 3, 5, 2, 7, 4])
    rejected_tokens = torch.tensor([2.0, 2, 6, 1, 3, 9])
    settings = SimpleNamespace(
        alpha=0.0,
        beta=2.0,
        simpo_gamma=0.5,
        loss_type="simpo",
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device="cpu"),
    )
    expected = cpo.CPOTrainer.cpo_loss(settings, chosen / chosen_tokens,
                                       rejected / rejected_tokens)  # fmt: skip
    p = PreferenceConfig(loss="simpo", beta=2.0, simpo_gamma=0.5)
    unused = torch.zeros(6)  # SimPO has no reference
    ours = preference_losses(p, chosen, rejected, unused, unused, chosen_tokens, rejected_tokens)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_verifier_pairs_are_cached_per_seed_and_sampling(tiny_tokenizer, tmp_path: Path) -> None:
    from lmpipe.tasks.preference import _cache_path
    from lmpipe.training.model import save_model

    base = tmp_path / "base"
    save_model(fresh_model(tiny_tokenizer), tiny_tokenizer, base)
    f = validate({"finetune": {"task": "preference", "dataset": "reasoning_gym",
                               "preference": {"pairs": "verifier"}}}).finetune  # fmt: skip
    fp32 = policy_numerics(HardwareConfig(), CPU)
    path = _cache_path(tmp_path, base, f, 0, fp32)
    assert _cache_path(tmp_path, base, f, 1, fp32) != path
    f.preference.temperature = 0.7
    assert _cache_path(tmp_path, base, f, 0, fp32) != path
    f.preference.temperature, f.reasoning_gym.test_size = 1.0, 7
    assert _cache_path(tmp_path, base, f, 0, fp32) != path
    f.reasoning_gym.test_size, f.preference.beta = 500, 0.5  # beta is not part of a pair
    assert _cache_path(tmp_path, base, f, 0, fp32) == path
    f.preference.pairs = "spin"  # spin draws nothing: the seed does not matter
    assert _cache_path(tmp_path, base, f, 0, fp32) == _cache_path(tmp_path, base, f, 1, fp32)


def test_the_reference_cache_is_keyed_by_how_the_policy_computes(tiny_tokenizer, tmp_path: Path):
    """The reference's log-probs change with the device, bf16, TF32, compile, FSDP2's
    parameter dtype and the micro-batch's shape: each is in the key."""
    from lmpipe.tasks.preference import _cache_path
    from lmpipe.training.model import save_model

    base = tmp_path / "base"
    save_model(fresh_model(tiny_tokenizer), tiny_tokenizer, base)
    f = validate({"finetune": {"task": "preference"}}).finetune
    cuda = torch.device("cuda", 0)
    ways = [policy_numerics(HardwareConfig(), CPU), policy_numerics(HardwareConfig(), cuda),
            policy_numerics(HardwareConfig(precision="bf16"), cuda),
            policy_numerics(HardwareConfig(compile=True), CPU)]  # fmt: skip
    paths = {_cache_path(tmp_path, base, f, 0, numerics) for numerics in ways}
    assert len(paths) == len(ways)
    tf32 = dict(ways[2], float32_matmul="high")
    assert _cache_path(tmp_path, base, f, 0, tf32) not in paths
    f.batch_size += 1
    assert _cache_path(tmp_path, base, f, 0, ways[0]) not in paths
    # bf16 asked for on the CPU computes in fp32 (lmpipe.training.loop.compute_dtype)
    assert policy_numerics(HardwareConfig(precision="bf16"), CPU) == ways[0]


def test_the_sft_term_is_each_chosen_replys_own_mean_token_nll() -> None:
    """Per pair (a pair weighs the same in any batch layout): DPO + w × (−log π(y_c) / |y_c|)."""
    tokens = torch.tensor([1.0, 4.0, 10.0])
    plain = PreferenceConfig(loss="sigmoid", beta=0.1)
    mixed = PreferenceConfig(loss="sigmoid", beta=0.1, sft_weight=0.5)
    args = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, tokens, ONE_TOKEN)
    dpo, chosen, rejected = preference_losses(plain, *args)
    rpo, chosen_mixed, rejected_mixed = preference_losses(mixed, *args)
    expected = dpo + 0.5 * torch.tensor([0.5 / 1, 10.0 / 4, 1.0 / 10])
    torch.testing.assert_close(rpo, expected)
    torch.testing.assert_close(chosen_mixed, chosen)  # the rewards do not change
    torch.testing.assert_close(rejected_mixed, rejected)
    simpo = PreferenceConfig(loss="simpo", beta=2.0, sft_weight=1.0)
    base = preference_losses(PreferenceConfig(loss="simpo", beta=2.0), *args)[0]
    torch.testing.assert_close(preference_losses(simpo, *args)[0],
                               base + torch.tensor([0.5, 2.5, 0.1]))  # fmt: skip


def test_held_out_pairs_are_capped_per_split_by_a_stable_sample() -> None:
    conversations = {"train": arithmetic(6), "val": arithmetic(5), "test": arithmetic(7)}
    splits = opening_pairs(conversations, max_pairs=4, max_held_out_pairs=3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 3, 3]
    assert opening_pairs(conversations, 4, 3) == splits  # the same ones every time
    assert [len(v) for v in opening_pairs(conversations, None).values()] == [6, 5, 7]
    assert {p.id for p in splits["test"]} <= {c.id for c in conversations["test"]}


# --- ORPO --------------------------------------------------------------------------------------


def test_orpo_loss_of_the_hand_worked_case() -> None:
    """One reply token each: ā_c = −0.5, ā_r = −2. odds(a) = e^a / (1 − e^a), so the log
    odds ratio is −0.5 + 2 − ln(1 − e^−0.5) + ln(1 − e^−2), and the loss is the chosen NLL
    0.5 − β log σ(that)."""
    p = PreferenceConfig(loss="orpo", beta=0.1)
    chosen, rejected, one = torch.tensor([-0.5]), torch.tensor([-2.0]), torch.ones(1)
    losses, chosen_reward, rejected_reward = preference_losses(
        p, chosen, rejected, torch.zeros(1), torch.zeros(1), one, one
    )
    log_odds = 1.5 - math.log(1 - math.exp(-0.5)) + math.log(1 - math.exp(-2.0))
    expected = 0.5 - 0.1 * math.log(1 / (1 + math.exp(-log_odds)))
    assert float(losses) == pytest.approx(expected, rel=1e-6)
    assert (float(chosen_reward), float(rejected_reward)) == pytest.approx((-0.05, -0.2))


def test_orpo_odds_ratio_term_and_rewards_equal_trls() -> None:
    """TRL's ORPOTrainer.odds_ratio_loss on the same mean token log-probs (it needs only β,
    so it is called on a stand-in trainer): our loss less the chosen reply's mean NLL is
    minus TRL's per-pair term, and the rewards are TRL's. (TRL's NLL also covers the prompt
    tokens; ours only the reply's, as SFT's does.)"""
    from types import SimpleNamespace

    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    generator = torch.Generator().manual_seed(2)
    chosen, rejected = -3 * torch.rand(2, 6, generator=generator) - 0.01  # summed log-probs
    # both sides of −ln 2 per token, where TRL's log(1 − e^x) switches formula
    chosen_tokens = torch.tensor([1.0, 3, 5, 2, 7, 4])
    rejected_tokens = torch.tensor([2.0, 1, 6, 1, 3, 9])
    stand_in = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected, _, _ = orpo.ORPOTrainer.odds_ratio_loss(
        stand_in, chosen / chosen_tokens, rejected / rejected_tokens
    )
    p = PreferenceConfig(loss="orpo", beta=0.25)
    unused = torch.full((6,), float("nan"))  # ORPO has no reference
    losses, ours_chosen, ours_rejected = preference_losses(
        p, chosen, rejected, unused, unused, chosen_tokens, rejected_tokens
    )
    torch.testing.assert_close(losses - (-chosen / chosen_tokens), -trl_losses)
    torch.testing.assert_close(ours_chosen, trl_chosen)
    torch.testing.assert_close(ours_rejected, trl_rejected)


def test_reference_free_losses_build_no_reference_and_train_without_one(
    tiny_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """orpo and simpo say they need no reference: the pairs are built without its pass (its
    columns stay empty, under their own cache key), and training batches carry none."""
    from lmpipe.training.model import save_model
    from lmpipe.training.pair_losses import PAIR_LOSSES

    assert {name for name, loss in PAIR_LOSSES.items() if not loss.needs_reference} == {
        "simpo", "orpo"}  # fmt: skip
    base = tmp_path / "base"
    save_model(talkative_model(tiny_tokenizer), tiny_tokenizer, base)
    settings = {"task": "preference", "max_len": 48, "batch_size": 2,
                "preference": {"loss": "orpo", "max_pairs": 8, "max_new_tokens": 4}}  # fmt: skip
    f = validate({"finetune": settings}).finetune
    monkeypatch.setattr("lmpipe.tasks.preference.reference_logps",
                        lambda *a, **k: pytest.fail("a reference pass for ORPO"))  # fmt: skip
    task, table = Preference().prepare(f, base, tiny_tokenizer, CPU, tmp_path / "cache",
                                       DistEnv())  # fmt: skip
    assert table["ref_chosen"].isna().all() and table["ref_rejected"].isna().all()
    setup = task.setup(f, base, tiny_tokenizer, 0, CPU)
    batch = next(setup.batches)
    assert "ref_logps" not in batch
    loss = setup.objective.loss_sum(setup.model, batch)
    assert torch.isfinite(loss) and loss > 0
    assert 0 <= setup.evaluate(setup.model)["rewards/accuracies"] <= 1
    monkeypatch.undo()
    f.preference.loss = "sigmoid"  # the DPO family reads another table, with the reference
    _, with_reference = Preference().prepare(f, base, tiny_tokenizer, CPU, tmp_path / "cache",
                                             DistEnv())  # fmt: skip
    assert with_reference["ref_chosen"].notna().all()
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 2
