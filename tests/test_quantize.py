"""Quantized variants (lmpipe.deploy.quantize): weight-only int8 (torchao), dynamic int8 and
our group-wise int4 against the float model, int4 against llama.cpp's Q4_0 and Q4_1 (the
gguf package's reference), and a variant rebuilt from the registry as served."""

from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import pytest
import torch

from lmpipe.deploy.quantize import (
    Int4Linear,
    quantize_dynamic_int8,
    quantize_int4,
    quantize_weight_only_int8,
    quantizer,
    state_size_bytes,
)
from lmpipe.deploy.release import log_and_register
from lmpipe.runs.config import ConfigError, DeployConfig, QuantizeConfig, validate
from lmpipe.tasks.finetuning import finetuning_task
from lmpipe.training.model import save_model

PROBE = torch.tensor([list(range(5, 37))])


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float((reference - approx).norm() / reference.norm())


def trained_like(tiny_model) -> torch.nn.Module:
    """The tiny model with weights of a trained model's scale (random init is nearly flat:
    its logits are mostly float noise)."""
    model = copy.deepcopy(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.mark.parametrize(
    ("make", "tolerance"),
    [
        # Relative logit errors measured 0.022, 0.094, 0.40, 0.34, 0.34 on this model: its
        # Gaussian weights have none of a trained model's structure to keep, so int4 loses
        # far more here than on SmolLM2 (the README's frontier).
        (quantize_weight_only_int8, 0.03),
        (quantize_dynamic_int8, 0.12),
        (lambda m: quantize_int4(m, 32, True), 0.5),
        (lambda m: quantize_int4(m, 32, False), 0.45),
        (lambda m: quantize_int4(m, 16, True), 0.45),
    ],
    ids=["int8", "int8-dynamic", "int4-g32-sym", "int4-g32-asym", "int4-g16-sym"],
)
def test_each_quantization_keeps_logits_close_and_shrinks_the_state(
    tiny_model, make, tolerance: float
) -> None:
    model = trained_like(tiny_model)
    with torch.no_grad():
        reference = model(input_ids=PROBE).logits
        quantized = make(copy.deepcopy(model))
        approx = quantized(input_ids=PROBE).logits
    assert relative_error(reference, approx) < tolerance
    assert state_size_bytes(quantized) < state_size_bytes(model)
    head = quantized.get_output_embeddings()
    assert type(head) is torch.nn.Linear  # the head, tied to the embeddings, stays float


def test_finer_quantization_loses_less(tiny_model) -> None:
    """Weight-only int8 (activations float) below dynamic int8, and int4 in groups of 16
    below groups of 64."""
    model = trained_like(tiny_model)

    def error(make) -> float:
        with torch.no_grad():
            return relative_error(model(input_ids=PROBE).logits,
                                  make(copy.deepcopy(model))(input_ids=PROBE).logits)  # fmt: skip

    assert error(quantize_weight_only_int8) < error(quantize_dynamic_int8)
    assert error(lambda m: quantize_int4(m, 16, True)) < error(lambda m: quantize_int4(m, 64, True))


def test_int4_packs_two_codes_per_byte_and_pads_a_ragged_width() -> None:
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(70, 6)  # 70 = 2 groups of 32 and one padded group
    with torch.no_grad():
        linear.weight.copy_(torch.randn(6, 70, generator=generator))
    for symmetric in (True, False):
        layer = Int4Linear(linear, 32, symmetric)
        assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (6, 48)
        nibbles = layer.nibbles()
        assert nibbles.shape == (6, 96) and int(nibbles.max()) <= 15
        weight = layer.dequantized()
        assert weight.shape == (6, 70)
        step = layer.scale.abs().repeat_interleave(32, dim=1)[:, :70]
        # Rounding costs half a step; symmetric codes also clip the side opposite the
        # group's extreme at +7 steps (Q4_0's trade: a finer step for one clipped code).
        error = (weight - linear.weight).abs()
        assert (error <= (step if symmetric else step / 2) + 1e-6).all()
        x = torch.randn(3, 70, generator=generator)
        torch.testing.assert_close(layer(x), x @ weight.T + linear.bias)


@pytest.mark.parametrize("symmetric", [True, False], ids=["Q4_0", "Q4_1"])
def test_int4_is_llama_cpps_q4_0_and_q4_1(symmetric: bool) -> None:
    """The gguf package's reference Q4_0 / Q4_1 on the same weights dequantize to ours, but
    for its fp16 scales (and minima) and its ties rounded up."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType.Q4_0 if symmetric else GGMLQuantizationType.Q4_1
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(64, 256, generator=generator) * 0.05
    linear = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    theirs = torch.from_numpy(dequantize(quantize(weight.numpy(), kind), kind))
    ours = Int4Linear(linear, 32, symmetric).dequantized()
    # fp16 keeps 11 bits: a code of up to 15 steps, and the minimum, off by 2^-11 of each
    fp16_slack = 2e-3 * weight.abs().amax(1, keepdim=True)
    assert ((ours - theirs).abs() <= fp16_slack).float().mean() > 0.99
    assert float(((ours - weight) ** 2).mean()) <= float(((theirs - weight) ** 2).mean()) * 1.01


def test_weights_already_on_a_q4_1_grid_come_back_exactly() -> None:
    """SmolLM2's GGUF is Q4_1: dequantized to float and quantized again asymmetrically in
    groups of 32, its weights land on their own grid (symmetric int4 cannot)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    generator = torch.Generator().manual_seed(4)
    kind = GGMLQuantizationType.Q4_1
    grid = dequantize(quantize((torch.randn(16, 128, generator=generator) * 0.05).numpy(),
                               kind), kind)  # fmt: skip
    linear = torch.nn.Linear(128, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(grid))
    again = Int4Linear(linear, 32, symmetric=False).dequantized()
    torch.testing.assert_close(again, linear.weight.detach(), rtol=0, atol=1e-6)
    assert float((Int4Linear(linear, 32, symmetric=True).dequantized() - linear.weight).abs()
                 .max()) > 1e-4  # fmt: skip


def test_bad_quantize_settings_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"deploy\.quantize\.variants.*'int3'"):
        validate({"deploy": {"quantize": {"variants": ["int8", "int3"]}}})
    with pytest.raises(ConfigError, match=r"deploy\.quantize\.group_size"):
        validate({"deploy": {"quantize": {"group_size": 33}}})
    with pytest.raises(ValueError, match="int2"):
        quantizer("int2")
    with pytest.raises(ConfigError, match=r"deploy\.quantize\.variants.*\[int8\]"):
        validate({"deploy": {"quantized_variant": True}})  # the key it replaced


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_variant_is_rebuilt_from_the_registry_as_it_was_scored(
    method: str, mlflow_store: str, tmp_path: Path, tiny_model, tiny_tokenizer
) -> None:
    """The registry stores the float model and the recipe; the served model is the one
    evaluate scored (the same logits)."""
    model = trained_like(tiny_model)
    model_dir = tmp_path / "model"
    save_model(model, tiny_tokenizer, model_dir)
    cfg = DeployConfig(registered_model_name=f"quantized-{method}",
                       quantize=QuantizeConfig(variants=[method], group_size=16,
                                               symmetric=False))  # fmt: skip
    with mlflow.start_run():
        version = log_and_register(model_dir, finetuning_task("sft"), cfg.registered_model_name,
                                   cfg, "model_q", method)  # fmt: skip
    served = mlflow.pyfunc.load_model(f"models:/{cfg.registered_model_name}/{version}")
    loaded = served.unwrap_python_model().model
    expected = quantizer(method, 16, False)(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=PROBE).logits,
                                   expected(input_ids=PROBE).logits)  # fmt: skip
    if method == "int4":
        layer = loaded.model.layers[0].mlp.down_proj
        assert isinstance(layer, Int4Linear) and layer.group_size == 16 and not layer.symmetric


def test_quantized_variants_are_compared_with_fp32_on_the_cpu_they_run_on() -> None:
    """Where the fine-tuned model was scored on a GPU in bf16 (0.50) and again in fp32 on the
    CPU (0.48), int8 (CPU, 0.47) lost 0.01 to quantization, not 0.03: the change compares
    models on one device. Without a CPU score (a CPU run) the fine-tuned score is that."""
    from lmpipe.deploy.variants import compared_with, quantization_changes

    on_gpu = {"finetuned_exact_match": 0.50, "finetuned_cpu_exact_match": 0.48,
              "int8_exact_match": 0.47, "int4_exact_match": 0.40, "pruned_exact_match": 0.3,
              "finetuned_response_loss": 1.0, "int8_response_loss": 1.1}  # fmt: skip
    changes = quantization_changes(on_gpu)
    assert changes["int8_exact_match_change"] == pytest.approx(-0.01)
    assert changes["int4_exact_match_change"] == pytest.approx(-0.08)
    assert changes["int8_response_loss_change"] == pytest.approx(0.1)  # no CPU twin scored
    assert not any(k.startswith(("finetuned_cpu", "pruned")) for k in changes)
    assert compared_with("finetuned_exact_match", on_gpu) == "finetuned_cpu_exact_match"
    on_cpu = {k: v for k, v in on_gpu.items() if "_cpu" not in k}
    assert quantization_changes(on_cpu)["int8_exact_match_change"] == pytest.approx(-0.03)


def test_the_fp32_twin_on_the_cpu_joins_only_a_gpu_scoring(tiny_model) -> None:
    from lmpipe.deploy.variants import CPU_TWIN, variant_models

    q = QuantizeConfig(variants=["int8"])
    on_cpu = variant_models(lambda: copy.deepcopy(tiny_model), "finetuned", torch.device("cpu"), q)
    assert set(on_cpu) == {"finetuned", "int8"}
    # A device other than the CPU (meta: no GPU here) adds the fp32 model on the CPU.
    elsewhere = variant_models(lambda: copy.deepcopy(tiny_model), "finetuned",
                               torch.device("meta"), q)  # fmt: skip
    assert set(elsewhere) == {"finetuned", "int8", CPU_TWIN}
    assert next(elsewhere[CPU_TWIN].parameters()).device.type == "cpu"
    assert next(elsewhere["finetuned"].parameters()).device.type == "meta"
    none = variant_models(lambda: copy.deepcopy(tiny_model), "finetuned", torch.device("meta"),
                          QuantizeConfig(variants=[]))  # fmt: skip
    assert set(none) == {"finetuned"}
