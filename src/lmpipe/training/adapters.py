"""Parameter-efficient fine-tuning: LoRA through peft, and freezing the lower layers.

LoRA layers are injected into the model in place (peft's `get_peft_model`); the training
loop then trains that same model object, so checkpoints and resume work unchanged.
`merge_lora` folds the adapters back into plain weights: the saved model is an ordinary
transformers model that needs neither peft nor the adapter files to load.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from lmpipe.runs.config import LoraSettings
from lmpipe.training.distributed import transformer_layers

log = logging.getLogger(__name__)


def add_lora(
    model: PreTrainedModel, settings: LoraSettings, trainable_modules: Sequence[str] = ()
) -> PeftModel:
    """Inject LoRA adapters into `model` (in place); only they, and the parameters of
    `trainable_modules` (e.g. a new classification head), stay trainable."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft names the modules it could not find
        raise ValueError(f"finetune.lora.target_modules: {exc}") from None
    for name in trainable_modules:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    log.info("lora: r=%d alpha=%d on %s; %s", settings.r, settings.alpha,
             ",".join(settings.target_modules), trainable_summary(model))  # fmt: skip
    return peft_model


def merge_lora(peft_model: PeftModel) -> PreTrainedModel:
    """The base model with the adapters merged into its weights and removed."""
    return peft_model.merge_and_unload()


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
