"""LoRA (peft) and layer freezing in the shared training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmpipe.data.batches import window_batches
from lmpipe.runs.config import HardwareConfig, LoraSettings, OptimConfig, TrainConfig
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
    peft_model = adapters.add_lora(model, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0))
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
    merged = adapters.merge_lora(peft_model)
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
    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.05)
    cfg = TrainConfig(**{**vars(CFG), "checkpoint_every": 3})

    def lora_model() -> torch.nn.Module:
        model = fresh_model(tiny_tokenizer)
        adapters.add_lora(model, lora)
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


def test_lora_on_a_missing_module_names_the_key(tiny_tokenizer) -> None:
    settings = LoraSettings(enabled=True, target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match=r"finetune\.lora\.target_modules"):
        adapters.add_lora(fresh_model(tiny_tokenizer), settings)
