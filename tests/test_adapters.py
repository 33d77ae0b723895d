"""peft methods (LoRA, AdaLoRA, IA3, LoHa, LoKr) and layer freezing in the shared loop."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmpipe.data.batches import window_batches
from lmpipe.runs.config import (
    AdaLoraSettings,
    HardwareConfig,
    OptimConfig,
    PeftSettings,
    TrainConfig,
)
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training import adapters
from lmpipe.training.checkpoint import Checkpoints
from lmpipe.training.loop import train
from lmpipe.training.model import load_model, save_model
from tests.test_train import NullLogger, fresh_model

CAUSAL_LM = CausalLM()

CPU = torch.device("cpu")
TOKENS = np.tile(np.arange(10, 40, dtype=np.uint16), 100)
CFG = TrainConfig(steps=6, batch_size=4, optim=OptimConfig(lr=1e-2, warmup_steps=0))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_trains_only_adapters_and_merges_into_plain_weights(
    tmp_path: Path, tiny_tokenizer
) -> None:
    model = fresh_model(tiny_tokenizer)
    base = snapshot(model)
    added = adapters.add_adapters(model, PeftSettings(method="lora", r=4, alpha=8, dropout=0.0), 6)
    peft_model = added.peft_model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    train(
        model,
        window_batches(TOKENS, 16, 4, 0),
        CFG,
        HardwareConfig(),
        CPU,
        NullLogger(),
        objective=CAUSAL_LM,
    )
    probe = torch.tensor([list(range(10, 26))])
    with torch.no_grad():
        adapted = peft_model(input_ids=probe).logits
    merged = added.merged()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, adapted, rtol=1e-4, atol=1e-4)
    save_model(merged, tiny_tokenizer, tmp_path / "merged")
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora" in key or "base_layer" in key for key in saved)
    assert set(saved) <= set(base)
    changed = [k for k in saved if not torch.equal(saved[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # only LoRA-targeted projections
    reloaded = load_model(tmp_path / "merged")  # an ordinary model: no peft needed
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, adapted, rtol=1e-4,
                                   atol=1e-4)  # fmt: skip


def test_lora_run_resumes_from_its_checkpoint(tmp_path: Path, tiny_tokenizer) -> None:
    """Checkpoints hold the adapter weights: a run killed after its step-3 checkpoint and
    resumed ends bit-identical to an uninterrupted one, with LoRA's default dropout drawing
    from the restored RNG."""
    lora = PeftSettings(method="lora", r=4, alpha=8, dropout=0.05)
    cfg = TrainConfig(**{**vars(CFG), "checkpoint_every": 3})

    def lora_model() -> torch.nn.Module:
        model = fresh_model(tiny_tokenizer)
        adapters.add_adapters(model, lora, cfg.steps)
        return model

    straight = lora_model()
    train(
        straight,
        window_batches(TOKENS, 16, 4, 0),
        cfg,
        HardwareConfig(),
        CPU,
        NullLogger(),
        objective=CAUSAL_LM,
    )

    checkpoints = Checkpoints(tmp_path / "checkpoints", "fingerprint")
    dying = window_batches(TOKENS, 16, 4, 0)
    make_batch = dying.make_batch

    def killed_at_step_4(rows):
        if dying.position == 3:
            raise KeyboardInterrupt("killed")
        return make_batch(rows)

    dying.make_batch = killed_at_step_4
    with pytest.raises(KeyboardInterrupt):
        train(lora_model(), dying, cfg, HardwareConfig(), CPU, NullLogger(),
              checkpoints=checkpoints, objective=CAUSAL_LM)  # fmt: skip
    resumed = lora_model()
    result = train(resumed, window_batches(TOKENS, 16, 4, 0), cfg, HardwareConfig(), CPU,
                   NullLogger(), checkpoints=checkpoints, objective=CAUSAL_LM)  # fmt: skip
    assert result.resumed_from == 3
    expected, actual = snapshot(straight), snapshot(resumed)
    assert any("lora_B" in key for key in actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_frozen_layers_do_not_move(tiny_tokenizer) -> None:
    model = fresh_model(tiny_tokenizer)
    adapters.freeze_layers(model, 1, embeddings=True)
    before = snapshot(model)
    train(
        model,
        window_batches(TOKENS, 16, 4, 0),
        CFG,
        HardwareConfig(),
        CPU,
        NullLogger(),
        objective=CAUSAL_LM,
    )
    after = snapshot(model)
    frozen = [k for k in before if k.startswith(("model.layers.0.", "model.embed_tokens"))]
    moving = [k for k in before if k.startswith("model.layers.1.") and k.endswith("proj.weight")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert moving and all(not torch.equal(before[k], after[k]) for k in moving)


def test_freezing_more_layers_than_exist_is_a_clear_error(tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match=r"freeze_layers=5, but the model has 2 layers"):
        adapters.freeze_layers(fresh_model(tiny_tokenizer), 5)


def test_adapters_on_a_missing_module_name_the_key(tiny_tokenizer) -> None:
    settings = PeftSettings(method="lora", target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match=r"finetune\.peft\.target_modules"):
        adapters.add_adapters(fresh_model(tiny_tokenizer), settings, 6)


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        (PeftSettings(method="ia3", target_modules=["q_proj"], feedforward_modules=["down_proj"]),
         r"feedforward_modules \['down_proj'\] are not in finetune\.peft\.target_modules"),
        (PeftSettings(method="adalora", adalora=AdaLoraSettings(tinit=3, tfinal=3)),
         r"finetune\.peft\.adalora: tinit \(3\) \+ tfinal \(3\)"),
    ],
)  # fmt: skip
def test_peft_settings_peft_would_reject_name_the_key(settings, pattern, tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match=pattern):
        adapters.add_adapters(fresh_model(tiny_tokenizer), settings, 6)


# --- every peft method, through the worker: trains, resumes after SIGKILL, merges ------------

PEFT_METHODS = ["lora", "adalora", "ia3", "loha", "lokr"]


@pytest.fixture(scope="module")
def peft_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per method: an uninterrupted run, and a run SIGKILLed at step 5 (after its step-4
    checkpoint) then restarted; DPO pairs, so the preference objective is covered too."""
    from tests import distributed_worker
    from tests.conftest import REPO, run

    worker = [sys.executable, str(REPO / "tests" / "distributed_worker.py")]
    common = ["--batch-size", "4", "--steps", "6", "--objective", "preference"]
    runs = {}
    for method in ["none", *PEFT_METHODS]:  # none: the whole model, DPO
        root = tmp_path_factory.mktemp(method)
        straight, resumed, checkpoints = root / "straight", root / "resumed", root / "ckpt"
        # in this process where no process is killed (it saves starting one per run)
        distributed_worker.main([str(straight), *common, "--peft", method])
        killed = run([*worker, str(resumed), *common, "--peft", method, "--checkpoints",
                      str(checkpoints), "--sigkill-at", "5"], REPO, check=False,
                     timeout=120)  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        distributed_worker.main([str(resumed), *common, "--peft", method, "--checkpoints",
                                 str(checkpoints)])  # fmt: skip
        runs[method] = {"straight": straight, "resumed": resumed}
    return runs


@pytest.mark.parametrize("method", ["none", *PEFT_METHODS])
def test_each_peft_method_resumes_bit_identically_after_sigkill(method: str, peft_runs) -> None:
    straight, resumed = peft_runs[method]["straight"], peft_runs[method]["resumed"]
    assert json.loads((resumed / "result.json").read_text())["resumed_from"] == 4
    expected = load_file(straight / "weights.safetensors")
    actual = load_file(resumed / "weights.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_peft_method_trains_and_saves_a_model_that_loads_without_peft(
    method: str, peft_runs
) -> None:
    from transformers import AutoModelForCausalLM

    straight = peft_runs[method]["straight"]
    weights = load_file(straight / "weights.safetensors")
    adapter_keys = [k for k in weights if any(part in k for part in ADAPTER_PARTS)]
    assert adapter_keys, "no adapter weights"
    start = load_file(straight / "start.safetensors")
    moved = [k for k in start if not torch.equal(start[k], weights[k])]
    assert moved and all(any(part in k for part in ADAPTER_PARTS) for k in moved)
    saved = load_file(straight / "merged" / "model.safetensors")
    assert not [k for k in saved if any(part in k for part in ADAPTER_PARTS)]
    merged = AutoModelForCausalLM.from_pretrained(straight / "merged")  # no peft involved
    probe = torch.tensor([list(range(5, 29))])
    with torch.no_grad():
        logits = merged(input_ids=probe).logits
    expected = load_file(straight / "probe.safetensors")["logits"]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# what peft names adapter weights by method
ADAPTER_PARTS = ("lora_", "ia3_", "hada_", "lokr_", "base_layer")


def test_adalora_reallocates_ranks_every_step(peft_runs) -> None:
    """Starting at init_r = 12 everywhere, the budget shrinks to an average rank of r = 4:
    after training the adapters keep fewer singular values than they started with, and not
    all the same (allocation follows sensitivity)."""
    result = json.loads((peft_runs["adalora"]["straight"] / "result.json").read_text())
    ranks = result["ranks"]
    assert ranks and max(ranks.values()) <= 12
    assert sum(ranks.values()) < 12 * len(ranks)


def test_adalora_state_loads_onto_the_adapters_device(tiny_tokenizer) -> None:
    """A checkpoint is read onto the CPU; on a GPU run peft then adds the saved sensitivity
    averages to the parameters' CUDA tensors. Here the adapters sit on another device
    ("meta", which CPU-only machines have) and the CPU-loaded state must follow them."""
    settings = PeftSettings(method="adalora", target_modules=["q_proj", "v_proj"],
                            adalora=AdaLoraSettings(tinit=0, tfinal=0, delta_t=1))  # fmt: skip
    hook = adapters.add_adapters(fresh_model(tiny_tokenizer), settings, total_steps=10).step_hook
    lora = [n for n, _ in hook.model.named_parameters() if "lora_A" in n]
    state = {"ipt": {n: torch.ones(2) for n in lora},
             "exp_avg_ipt": {n: torch.ones(2) for n in lora},
             "exp_avg_unc": {n: torch.ones(2) for n in lora},
             "rank_pattern": None}  # fmt: skip
    hook.model.to("meta")
    hook.load_state_dict(state)
    allocator = hook.model.rankallocator
    for values in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc):
        assert {v.device.type for v in values.values()} == {"meta"}
