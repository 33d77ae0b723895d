"""Structured pruning for deployment: fewer MLP channels and attention heads, a smaller dense
model that loads with `from_pretrained`.

Scores are Wanda's (Sun et al., 2023): a weight W_ij that reads input feature j scores
|W_ij| * ||X_j||_2, where X_j is feature j's activation over calibration tokens from the
training split. A structured unit scores the sum over the weights that read it:
  MLP channel j   column j of down_proj (the channel's only reader);
  attention head  its head_dim columns of o_proj.
Each layer keeps its own best units, the same number in every layer, so the config stays
uniform (`intermediate_size`, `num_attention_heads`) and transformers builds the model as
usual. Under grouped-query attention a query head is pruned inside its key/value group (the
same count per group); with one query head per group the whole head (q, k, v, o) goes.
Only Llama-style decoders (gate/up/down MLP, q/k/v/o attention) are supported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from lmpipe.data.batches import Batch
from lmpipe.evaluation.lm_metrics import eval_mode
from lmpipe.runs.config import ConfigError
from lmpipe.training.model import count_parameters

log = logging.getLogger(__name__)

MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's transformer blocks, checked to be Llama-style."""
    layers = getattr(model.base_model, "layers", None)
    ok = layers is not None and all(
        all(hasattr(layer.mlp, n) for n in MLP)
        and all(hasattr(layer.self_attn, n) for n in ATTENTION)
        for layer in layers
    )
    if not ok:
        raise ConfigError(
            f"deploy.prune: structured pruning supports Llama-style decoders (gate/up/down "
            f"MLP, q/k/v/o attention), not {type(model).__name__}; set deploy.prune.enabled=false"
        )
    return list(layers)


def prunable_linears(model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the transformer blocks (not embeddings or the head), by name."""
    names = {id(m): n for n, m in model.named_modules()}
    return {
        names[id(module)]: module
        for layer in decoder_layers(model)
        for module in layer.modules()
        if isinstance(module, torch.nn.Linear)
    }


@torch.no_grad()
def input_norms(
    model: PreTrainedModel,
    batches: Iterable[Batch],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature j of every block linear, over the batches' real tokens
    (padding excluded through the attention mask when a batch has one)."""
    linears = prunable_linears(model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    real: dict[str, torch.Tensor | None] = {"mask": None}

    def collect(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if real["mask"] is not None and real["mask"].numel() == x.shape[0]:
                x = x[real["mask"]]
            sums[name] += x.double().pow(2).sum(0).cpu()

        return hook

    handles = [m.register_forward_pre_hook(collect(n)) for n, m in linears.items()]
    tokens = 0
    try:
        with eval_mode(model):
            for batch in tqdm(list(batches), desc="prune: calibration", leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                mask = batch.get("attention_mask")
                real["mask"] = mask.reshape(-1).bool() if mask is not None else None
                tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError("deploy.prune: no calibration tokens")
    log.info("prune: activation norms of %d linears from %d calibration tokens", len(sums), tokens)
    return {name: total.sqrt().float() for name, total in sums.items()}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||: the score of every weight (out x in) given its input's norms (in)."""
    return weight.detach().abs().float() * norms.to(weight.device).float()[None, :]


def kept_count(total: int, ratio: float, key: str, unit: str) -> int:
    """Units left after removing `ratio` of `total`; an error naming `key` if none would be."""
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"{key}={ratio}: must be in [0, 1) (the share of {unit} removed)")
    kept = total - round(ratio * total)
    if kept < 1:
        raise ConfigError(
            f"{key}={ratio} would leave no {unit} of {total} in a layer; use a smaller ratio"
        )
    return kept


@dataclass
class Pruned:
    """What structured pruning kept: per layer, the MLP channels and the attention heads."""

    channels: list[list[int]]
    heads: list[list[int]]  # query heads kept, in the original numbering
    kv_heads: list[list[int]]  # key/value heads kept
    params_before: int
    params_after: int
    summary: dict[str, float] = field(default_factory=dict)


def top_units(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` best-scoring units, in their original order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def choose_units(
    model: PreTrainedModel,
    norms: dict[str, torch.Tensor],
    mlp_ratio: float,
    head_ratio: float,
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Per layer: MLP channels, query heads and key/value heads to keep."""
    config = model.config
    layers = decoder_layers(model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv_heads
    head_dim = layers[0].self_attn.head_dim
    keep_channels = kept_count(config.intermediate_size, mlp_ratio, "deploy.prune.mlp_ratio",
                               "MLP channel")  # fmt: skip
    # One query head per group (multi-head attention): whole heads go; else heads per group.
    per_group = group > 1
    keep_heads = kept_count(
        group if per_group else heads,
        head_ratio,
        "deploy.prune.head_ratio",
        "query head per key/value group" if per_group else "attention head",
    )
    names = {id(m): n for n, m in model.named_modules()}
    channels, kept_heads, kept_kv = [], [], []
    for layer in layers:
        down, o_proj = layer.mlp.down_proj, layer.self_attn.o_proj
        channel_scores = wanda_scores(down.weight, norms[names[id(down)]]).sum(0)
        channels.append(top_units(channel_scores, keep_channels))
        head_scores = (wanda_scores(o_proj.weight, norms[names[id(o_proj)]]).sum(0)
                       .reshape(heads, head_dim).sum(1))  # fmt: skip
        if per_group:
            chosen = []
            for g in range(kv_heads):
                members = list(range(g * group, (g + 1) * group))
                best = top_units(head_scores[members], keep_heads)
                chosen += [members[i] for i in best]
            kept_heads.append(chosen)
            kept_kv.append(list(range(kv_heads)))
        else:
            chosen = top_units(head_scores, keep_heads)
            kept_heads.append(chosen)
            kept_kv.append(chosen)
    return channels, kept_heads, kept_kv


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)])


@torch.no_grad()
def prune_structured(
    model: PreTrainedModel,
    norms: dict[str, torch.Tensor],
    mlp_ratio: float,
    head_ratio: float = 0.0,
) -> tuple[PreTrainedModel, Pruned]:
    """A new, smaller model of the same class with the best-scoring channels and heads of
    `model` (which is left as it is), and what was kept."""
    channels, heads, kv_heads = choose_units(model, norms, mlp_ratio, head_ratio)
    layers = decoder_layers(model)
    head_dim = layers[0].self_attn.head_dim
    names = {id(m): n for n, m in model.named_modules()}
    state = dict(model.state_dict())  # sliced entries are new tensors; the model is not touched
    for layer, kept, q_heads, kv in zip(layers, channels, heads, kv_heads, strict=True):
        mlp, attention = layer.mlp, layer.self_attn
        index = torch.tensor(kept)
        cuts = {  # module -> (dimension of its weight to cut, indices kept)
            mlp.gate_proj: (0, index), mlp.up_proj: (0, index), mlp.down_proj: (1, index),
            attention.q_proj: (0, head_rows(q_heads, head_dim)),
            attention.k_proj: (0, head_rows(kv, head_dim)),
            attention.v_proj: (0, head_rows(kv, head_dim)),
            attention.o_proj: (1, head_rows(q_heads, head_dim)),
        }  # fmt: skip
        for module, (dim, rows) in cuts.items():
            name = names[id(module)]
            state[f"{name}.weight"] = state[f"{name}.weight"].index_select(dim, rows)
            if module.bias is not None and dim == 0:
                state[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, rows)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.head_dim = head_dim  # explicit: no longer hidden_size // num_attention_heads
    config.intermediate_size = len(channels[0])
    config.num_attention_heads = len(heads[0])
    config.num_key_value_heads = len(kv_heads[0])
    dtype = next(model.parameters()).dtype
    pruned = model.__class__(config).to(dtype)
    pruned.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:  # a classifier has none
        pruned.generation_config = model.generation_config
    pruned.eval()
    result = Pruned(channels, heads, kv_heads, count_parameters(model), count_parameters(pruned))
    result.summary = {
        "intermediate_size_before": model.config.intermediate_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads_before": model.config.num_attention_heads,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "params_before": result.params_before,
        "params": result.params_after,
        "params_ratio": result.params_after / result.params_before,
    }
    log.info("prune: MLP %d -> %d channels, attention %d -> %d heads, %.2fM -> %.2fM params",
             model.config.intermediate_size, config.intermediate_size,
             model.config.num_attention_heads, config.num_attention_heads,
             result.params_before / 1e6, result.params_after / 1e6)  # fmt: skip
    return pruned, result


@torch.no_grad()
def zero_pruned_units(model: PreTrainedModel, pruned: Pruned) -> None:
    """Zero in place what `pruned` removed (the readers of each removed channel and head):
    the dense model that computes what the pruned one computes."""
    layers = decoder_layers(model)
    head_dim = layers[0].self_attn.head_dim
    for layer, kept, q_heads in zip(layers, pruned.channels, pruned.heads, strict=True):
        down, o_proj = layer.mlp.down_proj, layer.self_attn.o_proj
        gone = sorted(set(range(down.in_features)) - set(kept))
        down.weight[:, gone] = 0
        all_heads = range(model.config.num_attention_heads)
        gone_heads = [h for h in all_heads if h not in set(q_heads)]
        if gone_heads:
            o_proj.weight[:, head_rows(gone_heads, head_dim)] = 0
