"""Deployment compression: structured pruning (Wanda-scored channels and heads), the
unstructured-sparsity analysis, and the pruned variants registered and gated on their own
held-out scores."""

from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmpipe.deploy import registry
from lmpipe.deploy.prune import (
    input_norms,
    kept_count,
    prune_structured,
    wanda_scores,
    zero_pruned_units,
)
from lmpipe.deploy.quantize import Int4Linear
from lmpipe.deploy.release import deploy
from lmpipe.deploy.sparsity import sparsify, sparsity_curve, wanda_mask, zero_share
from lmpipe.deploy.variants import (
    BY_NAME,
    VARIANTS,
    fastest_within,
    own_metric,
    quality_loss,
    selected,
    variant_models,
)
from lmpipe.runs.config import ConfigError, DeployConfig, GateConfig, QuantizeConfig, validate
from lmpipe.tasks.finetuning import finetuning_task
from lmpipe.training.model import save_model


def llama_config(heads: int, kv_heads: int, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=48, max_position_embeddings=64, **extra)  # fmt: skip


def llama(heads: int, kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(heads, kv_heads)).eval()


def calibration(seed: int = 1, rows: int = 3, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # a padded row: its padding must not count
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids}]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_ratio", "heads_left"),
    [(4, 4, 0.5, 2), (4, 4, 0.0, 4), (4, 2, 0.5, 2), (6, 2, 1 / 3, 4)],  # GQA: per group
)
def test_pruned_logits_equal_the_dense_model_with_those_channels_zeroed(
    heads: int, kv_heads: int, head_ratio: float, heads_left: int
) -> None:
    model = llama(heads, kv_heads)
    norms = input_norms(model, calibration(), torch.device("cpu"))
    pruned, kept = prune_structured(model, norms, mlp_ratio=0.25, head_ratio=head_ratio)
    assert pruned.config.intermediate_size == 36 == len(kept.channels[1])
    assert pruned.config.num_attention_heads == heads_left
    zeroed = copy.deepcopy(model)
    zero_pruned_units(zeroed, kept)
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        small, dense, original = (m(input_ids=ids).logits for m in (pruned, zeroed, model))
    torch.testing.assert_close(small, dense, atol=1e-5, rtol=0)
    assert not torch.allclose(small, original, atol=1e-3)  # something was removed
    assert kept.params_after < kept.params_before
    assert model.config.intermediate_size == 48  # the dense model is left as it was


def test_a_decoder_classifier_prunes_like_a_causal_lm() -> None:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = llama_config(4, 4, num_labels=3, pad_token_id=0)
    classifier = LlamaForSequenceClassification(config).eval()
    norms = input_norms(classifier, calibration(), torch.device("cpu"))
    pruned, kept = prune_structured(classifier, norms, 0.5, 0.5)
    zeroed = copy.deepcopy(classifier)
    zero_pruned_units(zeroed, kept)
    ids = calibration(seed=4)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, zeroed(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert pruned.score.weight.shape == (3, 48)


def test_head_pruning_keeps_whole_heads_or_heads_per_group() -> None:
    mha, gqa = llama(4, 4), llama(6, 2)
    for model, heads, kv in [(mha, 2, 2), (gqa, 4, 2)]:
        norms = input_norms(model, calibration(), torch.device("cpu"))
        pruned, kept = prune_structured(model, norms, 0.0, 0.5 if model is mha else 1 / 3)
        assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (heads, kv)
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert pruned.config.head_dim == head_dim
    # under GQA each key/value group keeps the same number of its own query heads
    assert all(sorted(h // 3 for h in layer) == [0, 0, 1, 1] for layer in kept.heads)


def test_pruned_model_reloads_with_from_pretrained(tmp_path: Path, tiny_model,
                                                   tiny_tokenizer) -> None:  # fmt: skip
    ids = torch.tensor([list(range(5, 30))])
    norms = input_norms(tiny_model, [{"input_ids": ids}], torch.device("cpu"))
    pruned, _ = prune_structured(tiny_model, norms, 0.5, 0.5)
    save_model(pruned, tiny_tokenizer, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", use_safetensors=True)
    assert type(loaded) is type(tiny_model)
    assert loaded.config.intermediate_size == 32 and loaded.config.num_attention_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits)
    generated = loaded.generate(ids[:, :5], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)


def test_wanda_scores_on_a_hand_built_case() -> None:
    # Two input features seen on 2 tokens: x = (1, 0) and (1, 2) -> ||X|| = (sqrt 2, 2).
    linear = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    model = torch.nn.Sequential(linear)
    sums = torch.zeros(2)

    def hook(module: torch.nn.Module, args: tuple) -> None:
        nonlocal sums
        sums = sums + args[0].pow(2).sum(0)

    linear.register_forward_pre_hook(hook)
    model(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    norms = sums.sqrt()
    torch.testing.assert_close(norms, torch.tensor([2**0.5, 2.0]))
    scores = wanda_scores(linear.weight, norms)
    torch.testing.assert_close(scores, torch.tensor([[2**0.5, 4.0], [3 * 2**0.5, 1.0]]))
    # Wanda compares within each output row: at 50% row 0 loses column 0, row 1 column 1
    # (magnitude alone would drop 0.5 and 1.0: the same here, not in general).
    assert wanda_mask(linear.weight, norms, 0.5).tolist() == [[True, False], [False, True]]
    # A large weight on a silent input scores low: activation-aware, unlike magnitude.
    assert wanda_mask(torch.tensor([[5.0, 1.0]]), torch.tensor([0.1, 2.0]), 0.5).tolist() == [
        [True, False]
    ]


def test_calibration_norms_skip_padding_and_channel_scores_pick_the_units() -> None:
    model = llama(4, 4)
    batch = calibration()[0]
    norms = input_norms(model, [batch], torch.device("cpu"))
    # Recompute down_proj's input of layer 0 by hand, over the real tokens only.
    captured = {}
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: captured.setdefault("x", args[0])
    )
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    real = captured["x"][batch["attention_mask"].bool()]
    torch.testing.assert_close(norms["model.layers.0.mlp.down_proj"], real.pow(2).sum(0).sqrt())
    # Channels whose down_proj columns are near zero score lowest and go first.
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, [3, 7, 11]] *= 1e-4
    norms = input_norms(model, [batch], torch.device("cpu"))
    _, kept = prune_structured(model, norms, mlp_ratio=3 / 48)
    assert set(range(48)) - set(kept.channels[0]) == {3, 7, 11}


@pytest.mark.parametrize(
    ("mlp_ratio", "head_ratio", "key"),
    [(0.99, 0.0, r"deploy\.prune\.mlp_ratio=0\.99 would leave no MLP channel of 48"),
     (0.0, 0.9, r"deploy\.prune\.head_ratio=0\.9 would leave no attention head of 4")],
)  # fmt: skip
def test_a_ratio_that_leaves_nothing_is_a_config_error(mlp_ratio, head_ratio, key) -> None:
    model = llama(4, 4)
    norms = input_norms(model, calibration(), torch.device("cpu"))
    with pytest.raises(ConfigError, match=key):
        prune_structured(model, norms, mlp_ratio, head_ratio)


def test_gqa_head_ratio_that_empties_a_group_names_the_key() -> None:
    with pytest.raises(ConfigError, match="no query head per key/value group of 2"):
        kept_count(2, 0.75, "deploy.prune.head_ratio", "query head per key/value group")


@pytest.mark.parametrize("key", ["mlp_ratio", "head_ratio"])
def test_ratio_of_one_fails_validation_naming_the_key(key: str) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "params.yaml")
    cfg.deploy.prune[key] = 1.0
    with pytest.raises(ConfigError, match=rf"deploy\.prune\.{key}': 1\.0 \(must be in \[0, 1\)"):
        validate(cfg)


def test_unsupported_architecture_is_a_config_error() -> None:
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32))  # fmt: skip
    with pytest.raises(ConfigError, match=r"Llama-style decoders.*BertForMaskedLM"):
        input_norms(bert, [{"input_ids": torch.tensor([[1, 2, 3]])}], torch.device("cpu"))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsify_zeroes_the_asked_share_and_leaves_the_model(method: str) -> None:
    model = llama(4, 4)
    norms = input_norms(model, calibration(), torch.device("cpu"))
    sparse = sparsify(model, method, 0.4, norms)
    assert zero_share(sparse) == pytest.approx(0.4, abs=0.01)
    assert zero_share(model) == 0.0
    # embeddings and the LM head stay dense
    assert torch.equal(sparse.model.embed_tokens.weight, model.model.embed_tokens.weight)
    if method == "wanda":  # per row: every row loses the same count
        weight = sparse.model.layers[0].mlp.up_proj.weight
        assert set((weight == 0).sum(1).tolist()) == {int(weight.shape[1] * 0.4)}


def test_sparsity_curve_has_the_dense_point_and_every_level() -> None:
    model = llama(4, 4)
    norms = input_norms(model, calibration(), torch.device("cpu"))
    ids = calibration(seed=9)[0]["input_ids"]

    def loss(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    points = sparsity_curve(model, norms, [0.3, 0.6], loss, ["magnitude", "wanda"])
    assert [(p.method, p.sparsity) for p in points] == [
        ("magnitude", 0.0), ("wanda", 0.0), ("magnitude", 0.3), ("magnitude", 0.6),
        ("wanda", 0.3), ("wanda", 0.6),
    ]  # fmt: skip
    assert points[0].loss == points[1].loss == loss(model)
    assert all(p.loss != points[0].loss for p in points[2:])


def test_quality_loss_and_the_frontier_pick() -> None:
    assert quality_loss(5.1, 5.0, "min") == pytest.approx(0.02)
    assert quality_loss(0.49, 0.5, "max") == pytest.approx(0.02)
    assert quality_loss(4.9, 5.0, "min") < 0
    variants = {
        "fp32": {"quality_loss": 0.0, "request_p50_seconds": 1.0},
        "int8": {"quality_loss": 0.15, "request_p50_seconds": 0.5},  # fastest, too lossy
        "pruned": {"quality_loss": 0.019, "request_p50_seconds": 0.8},
        "pruned-int8": {"quality_loss": None, "request_p50_seconds": 0.1},  # unscored
    }
    assert fastest_within(variants, 0.02, "request_p50_seconds") == "pruned"
    assert fastest_within(variants, 0.01, "request_p50_seconds") == "fp32"
    assert fastest_within(variants, 0.2, "request_p50_seconds") == "int8"


@pytest.fixture
def pruned_dirs(tmp_path: Path, tiny_model, tiny_tokenizer) -> tuple[Path, Path]:
    dense, small = tmp_path / "model", tmp_path / "pruned"
    save_model(tiny_model, tiny_tokenizer, dense)
    ids = torch.tensor([list(range(5, 30))])
    norms = input_norms(tiny_model, [{"input_ids": ids}], torch.device("cpu"))
    save_model(prune_structured(tiny_model, norms, 0.5)[0], tiny_tokenizer, small)
    return dense, small


@pytest.mark.parametrize(
    ("scores", "passed"),
    [
        ({"int8_loss": 4.1, "pruned_loss": 4.4, "pruned_int8_loss": 6.0},
         {"int8": True, "pruned": True, "pruned-int8": False}),
        ({"int8_loss": 5.5, "pruned_loss": 7.0, "pruned_int8_loss": 4.9},
         {"int8": False, "pruned": False, "pruned-int8": True}),
    ],
)  # fmt: skip
def test_each_variant_is_gated_on_its_own_held_out_score(
    mlflow_store: str, pruned_dirs: tuple[Path, Path], scores: dict, passed: dict
) -> None:
    dense, small = pruned_dirs
    gates = {"sft": GateConfig("loss", "min", 5.0)}
    cfg = DeployConfig(registered_model_name="chat", gates=gates, max_new_tokens=3,
                       latency_requests=2, forward_tokens=16, forward_repeats=2)  # fmt: skip
    metrics = {"loss": 4.0, **scores}
    with mlflow.start_run():
        mlflow.log_metrics(metrics)
        requests = ["hi", "what is AI?"]
        result = deploy(dense, finetuning_task("sft"), metrics, cfg, {}, requests, small)
    assert result.alias == "champion"
    assert set(result.variants) == {"fp32", "int8", "pruned", "pruned-int8"}
    client = MlflowClient()
    for variant, ok in passed.items():
        entry = result.variants[variant]
        name = f"chat-{variant}"
        assert entry["model_name"] == name and entry["gate_passed"] is ok
        assert entry["alias"] == ("champion" if ok else "challenger")
        assert (registry.aliased(name, registry.CHAMPION) is not None) is ok
        version = client.get_model_version(name, entry["version"])
        assert version.tags["gate_passed"] == str(ok) and version.tags["variant_of"] == "chat/1"
        assert entry["quality"] == metrics[entry["quality_metric"]]
        assert entry["quality_change"] == pytest.approx(entry["quality"] - 4.0)
    fp32, pruned, int8 = (result.variants[v] for v in ("fp32", "pruned", "int8"))
    assert pruned["params"] < fp32["params"] == int8["params"]
    assert result.variants["pruned-int8"]["params"] == pruned["params"]
    assert pruned["size_bytes"] < fp32["size_bytes"] and int8["size_bytes"] < fp32["size_bytes"]
    for entry in result.variants.values():
        assert 0 < entry["forward_p50_seconds"] <= entry["forward_p95_seconds"]
        assert 0 < entry["request_p50_seconds"] <= entry["request_p95_seconds"]
    served = mlflow.pyfunc.load_model(f"models:/chat-pruned/{pruned['version']}")
    assert served.unwrap_python_model().model.config.intermediate_size == 32
    replies = served.predict(pd.DataFrame({"prompt": ["hi"]}), params={"max_new_tokens": 2})
    assert len(replies) == 1 and isinstance(replies[0], str)


def test_a_variant_without_its_own_score_is_only_the_challenger(
    mlflow_store: str, pruned_dirs: tuple[Path, Path]
) -> None:
    dense, small = pruned_dirs
    cfg = DeployConfig(registered_model_name="chat", gates={"sft": GateConfig("loss", "min", 5.0)},
                       max_new_tokens=2, latency_requests=1, forward_tokens=8,
                       forward_repeats=1, quantize=QuantizeConfig(variants=[]))  # fmt: skip
    with mlflow.start_run():
        result = deploy(dense, finetuning_task("sft"), {"loss": 4.0}, cfg, {}, ["hi"], small)
    assert set(result.variants) == {"fp32", "pruned"}
    assert result.variants["pruned"]["alias"] == "challenger"
    assert result.variants["pruned"]["quality_loss"] is None
    assert result.fastest_within_quality_budget == "fp32"


def test_each_variant_is_one_entry_made_and_scored_from_its_source(tiny_model) -> None:
    """evaluate scores the variants of finetune's model and deploy those of its pruned one,
    both through `variant_models`: one entry each in VARIANTS, chosen by deploy.quantize."""
    cpu = torch.device("cpu")
    q = QuantizeConfig(variants=["int8", "int4"], group_size=16)
    from_finetune = variant_models(lambda: copy.deepcopy(tiny_model), "finetuned", cpu, q)
    from_pruned = variant_models(lambda: copy.deepcopy(tiny_model), "pruned", cpu, q)
    assert list(from_finetune) == ["finetuned", "int8", "int4"]
    assert list(from_pruned) == ["pruned", "pruned_int8", "pruned_int4"]
    layer = from_pruned["pruned_int4"].model.layers[0].mlp.down_proj
    assert isinstance(layer, Int4Linear) and layer.group_size == 16
    assert type(from_pruned["pruned"].model.layers[0].mlp.down_proj) is torch.nn.Linear
    only_float = variant_models(lambda: copy.deepcopy(tiny_model), "finetuned", cpu,
                                QuantizeConfig(variants=[]))  # fmt: skip
    assert list(only_float) == ["finetuned"]
    assert [v.name for v in selected(QuantizeConfig(variants=["int8-dynamic"]))] == [
        "fp32", "int8-dynamic", "pruned", "pruned-int8-dynamic"]  # fmt: skip
    assert own_metric("pruned-int8", "finetuned_sft_test_loss") == "pruned_int8_sft_test_loss"
    assert own_metric("int8-dynamic", "finetuned_macro_f1") == "int8_dynamic_macro_f1"
    assert own_metric("fp32", "loss") == "loss"  # the gate's own metric
    for variant in VARIANTS:
        twin = BY_NAME.get(variant.float_twin) if variant.float_twin else variant
        assert twin is not None and twin.source == variant.source and not twin.quantize
