"""Parameter-efficient fine-tuning through peft, and freezing the lower layers.

`finetune.peft.method` picks one of peft's tuners (LoRA, AdaLoRA, IA3, LoHa, LoKr), built
from peft's own config classes. The adapters are injected into the model in place
(`get_peft_model`); the training loop then trains that same model object, so checkpoints
and resume work unchanged. AdaLoRA also needs the loop's help at every step (its rank
reallocation and orthogonality penalty): `Adapters.step_hook` is that, with the state a
checkpoint must carry. `Adapters.merged` folds the adapters back into plain weights: the
saved model is an ordinary transformers model that needs neither peft nor adapter files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    AdaLoraModel,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
)
from transformers import PreTrainedModel

from lmpipe.runs.config import PeftSettings
from lmpipe.training.distributed import transformer_layers

log = logging.getLogger(__name__)


def peft_config(settings: PeftSettings, total_steps: int) -> PeftConfig:
    """peft's config for `settings.method` (AdaLoRA plans its budget over `total_steps`)."""
    targets = list(settings.target_modules)
    method = settings.method
    if method == "lora":
        return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=targets, bias="none")  # fmt: skip
    if method == "adalora":
        a = settings.adalora
        if a.tinit + a.tfinal >= total_steps:
            raise ValueError(
                f"finetune.peft.adalora: tinit ({a.tinit}) + tfinal ({a.tfinal}) must be fewer "
                f"than the training steps ({total_steps}), or no step reallocates ranks"
            )
        # The orthogonality penalty is added by AdaLoraHook: peft adds it only to a loss the
        # model computes itself, which the preference objective does not ask for.
        return AdaLoraConfig(
            target_r=settings.r, init_r=a.init_r, tinit=a.tinit, tfinal=a.tfinal,
            deltaT=a.delta_t, beta1=a.beta1, beta2=a.beta2, orth_reg_weight=0.0,
            total_step=total_steps, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
            target_modules=targets,
        )  # fmt: skip
    if method == "ia3":
        feedforward = list(settings.feedforward_modules)
        outside = sorted(set(feedforward) - set(targets))
        if outside:
            raise ValueError(f"finetune.peft.feedforward_modules {outside} are not in "
                             f"finetune.peft.target_modules {targets}")  # fmt: skip
        return IA3Config(target_modules=targets, feedforward_modules=feedforward)
    if method == "loha":
        return LoHaConfig(r=settings.r, alpha=settings.alpha, rank_dropout=settings.dropout,
                          target_modules=targets)  # fmt: skip
    if method == "lokr":
        return LoKrConfig(r=settings.r, alpha=settings.alpha, rank_dropout=settings.dropout,
                          target_modules=targets)  # fmt: skip
    raise ValueError(f"invalid value for 'finetune.peft.method': {method!r}")


class AdaLoraHook:
    """What AdaLoRA asks of the loop at each optimizer step: the orthogonality penalty on
    its SVD factors (added to the loss), and, after the optimizer step and before the
    gradients are cleared, the sensitivity update and rank reallocation. Its smoothed
    sensitivities and the rank pattern are resumable state."""

    # peft's rank allocator ranks every singular value of all adapted layers against one
    # budget (and the penalty takes whole factors): FSDP2 would shard them (loop.train).
    shardable = False

    def __init__(self, model: AdaLoraModel, orth_reg_weight: float) -> None:
        self.model = model
        self.orth_reg_weight = orth_reg_weight
        self.adapter = model.trainable_adapter_name

    def penalty(self) -> torch.Tensor | None:
        if self.orth_reg_weight == 0:
            return None
        norms = []
        for name, param in self.model.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and self.adapter in name:
                gram = param @ param.T if "lora_A" in name else param.T @ param
                eye = torch.eye(*gram.shape, device=gram.device, dtype=gram.dtype)
                norms.append(torch.linalg.matrix_norm(gram - eye))
        return self.orth_reg_weight * torch.stack(norms).mean() if norms else None

    def after_step(self, step: int) -> None:
        # peft counts steps from 0: its step i follows our optimizer step i + 1.
        self.model.update_and_allocate(step - 1)

    def state_dict(self) -> dict[str, Any]:
        allocator = self.model.rankallocator
        return {
            "ipt": allocator.ipt,
            "exp_avg_ipt": allocator.exp_avg_ipt,
            "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": self.model.peft_config[self.adapter].rank_pattern,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved sensitivities, on the adapters' device: a checkpoint is read onto the
        CPU, and peft's next update adds them to the parameters' own (CUDA) tensors."""
        allocator = self.model.rankallocator
        device = next(p.device for n, p in self.model.named_parameters() if "lora_" in n)

        def placed(values: dict[str, Any]) -> dict[str, Any]:
            return {name: value.to(device) if torch.is_tensor(value) else value
                    for name, value in values.items()}  # fmt: skip

        allocator.ipt = placed(state["ipt"])
        allocator.exp_avg_ipt = placed(state["exp_avg_ipt"])
        allocator.exp_avg_unc = placed(state["exp_avg_unc"])
        self.model.peft_config[self.adapter].rank_pattern = state["rank_pattern"]

    def ranks(self) -> dict[str, int]:
        """The rank each adapted module keeps now (its unmasked singular values)."""
        return {
            name.removesuffix(f".lora_E.{self.adapter}"): int((param != 0).sum())
            for name, param in self.model.model.named_parameters()
            if name.endswith(f"lora_E.{self.adapter}")
        }


@dataclass
class Adapters:
    """A model with peft adapters in place."""

    peft_model: PeftModel
    step_hook: AdaLoraHook | None = None

    def merged(self) -> PreTrainedModel:
        """The base model with the adapters merged into its weights and removed."""
        return self.peft_model.merge_and_unload()


def add_adapters(
    model: PreTrainedModel,
    settings: PeftSettings,
    total_steps: int,
    trainable_modules: Sequence[str] = (),
) -> Adapters:
    """Inject `settings.method`'s adapters into `model` (in place); only they, and the
    parameters of `trainable_modules` (e.g. a new classification head), stay trainable."""
    config = peft_config(settings, total_steps)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft names the modules it could not find
        raise ValueError(f"finetune.peft.target_modules: {exc}") from None
    for name in trainable_modules:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    log.info("peft: %s r=%d on %s; %s", settings.method, settings.r,
             ",".join(settings.target_modules), trainable_summary(model))  # fmt: skip
    hook = None
    if settings.method == "adalora":
        hook = AdaLoraHook(peft_model.base_model, settings.adalora.orth_reg_weight)
    return Adapters(peft_model, hook)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout layer (adapters' too) set to p=0: a stochastic forward would make the
    policy differ from the reference before any training."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def freeze_layers(model: PreTrainedModel, num_layers: int, embeddings: bool = False) -> None:
    """Stop gradients to the first `num_layers` decoder layers (and the token embeddings).

    With tied embeddings, freezing them also freezes the output projection.
    """
    layers = transformer_layers(model)
    if num_layers > len(layers):
        raise ValueError(
            f"finetune.freeze_layers={num_layers}, but the model has {len(layers)} layers"
        )
    for layer in layers[:num_layers]:
        layer.requires_grad_(False)
    if embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if num_layers or embeddings:
        log.info("freeze: first %d layers%s; %s", num_layers,
                 " and embeddings" if embeddings else "", trainable_summary(model))  # fmt: skip


def trainable_summary(model: torch.nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
