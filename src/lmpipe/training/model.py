"""Models from transformers configs: presets, loading, saving.

Decoders are Llama-style (`AutoModelForCausalLM`), encoders BERT (`AutoModelForMaskedLM`).
Every saved model is a plain HF directory (config + safetensors + tokenizer, and a
generation config for decoders) that the Auto classes and `AutoTokenizer` load.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GenerationConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmpipe.data.pretrained import resolve_source
from lmpipe.runs.config import ModelConfig
from lmpipe.training import distributed
from lmpipe.training.distributed import DistEnv, full_model_state

log = logging.getLogger(__name__)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ends a document; <|im_end|> ends a chat turn: generation stops at either."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights are (an int8 variant keeps float embeddings on the CPU)."""
    return next(model.parameters()).device


def llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"model: hidden_size={cfg.hidden_size} must divide by num_heads={cfg.num_heads}, "
            f"and num_heads by num_kv_heads={cfg.num_kv_heads}"
        )
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def bert_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> BertConfig:
    """An encoder preset: BERT (post-norm, GELU, learned absolute positions), as in
    transformers' BertConfig; dropout as BERT's."""
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"model: hidden_size={cfg.hidden_size} must divide by num_heads={cfg.num_heads}"
        )
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )


# model.family -> the Auto class of its pretraining head.
AUTO_CLASSES = {"decoder": AutoModelForCausalLM, "encoder": AutoModelForMaskedLM}


def load_base(spec: str, family: str = "decoder") -> PreTrainedModel:
    """Pretrained weights named by `model.init_from` (GGUF is dequantized to float32)."""
    source = resolve_source(spec)
    log.info("model: loading %s %s", source.path, source.gguf_file or "")
    model = AUTO_CLASSES[family].from_pretrained(
        source.path,
        attn_implementation="sdpa",
        dtype=torch.float32,
        trust_remote_code=False,
        **({"use_safetensors": True} if not source.gguf_file else {}),
        **source.kwargs(),
    )
    if source.gguf_file:
        # GGUF tensors arrive dequantized to plain float32; drop the quantizer bookkeeping,
        # which would make save_pretrained refuse them and mark the config as quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh model from the preset, or the pretrained weights of `model.init_from`."""
    if cfg.init_from:
        model = load_base(cfg.init_from, cfg.family)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise ValueError(
                f"model.init_from={cfg.init_from} has {model.get_input_embeddings().num_embeddings}"
                f" token embeddings but the tokenizer has {len(tokenizer)}: tokenize with the "
                "base model's tokenizer (the tokenize stage does when model.init_from is set)"
            )
        if model.config.pad_token_id is None:  # a classifier on it finds rows' ends by padding
            model.config.pad_token_id = tokenizer.pad_token_id
    elif cfg.family == "encoder":
        model = AutoModelForMaskedLM.from_config(
            bert_config(cfg, tokenizer), attn_implementation="sdpa"
        )
    else:
        model = AutoModelForCausalLM.from_config(
            llama_config(cfg, tokenizer), attn_implementation="sdpa"
        )
    if cfg.family == "decoder":
        model.generation_config = GenerationConfig(
            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id
        )
    log.info("model: %s, %.2fM parameters", cfg.init_from or cfg.preset,
             count_parameters(model) / 1e6)  # fmt: skip
    return model


def load_model(path: str | Path) -> PreTrainedModel:
    """Load a causal LM saved by this pipeline (safetensors only; never remote code)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="sdpa", use_safetensors=True, trust_remote_code=False
    )


def load_classifier(path: str | Path, labels: Sequence[str] | None = None) -> PreTrainedModel:
    """A sequence classifier on a saved decoder or encoder (transformers'
    ...ForSequenceClassification: the last token's state on a decoder, [CLS] on BERT).

    With `labels`, a fresh classification head for them is put on the pretrained model;
    without, the classifier saved by finetune is loaded with its own labels.
    """
    classes = (
        {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
        if labels is not None
        else {}
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path),
        attn_implementation="sdpa",
        use_safetensors=True,
        trust_remote_code=False,
        **classes,
    )
    if model.config.pad_token_id is None:
        raise ValueError(f"{path}: the model config has no pad_token_id, which the classifier "
                         "needs to find each row's last token")  # fmt: skip
    return model


def save_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    env: DistEnv | None = None,
) -> None:
    """Model, tokenizer and generation config together: one self-contained directory.

    Collective under several processes: the full weights are gathered (FSDP shards them)
    and the main process writes.
    """
    state = full_model_state(model)
    if env is None or env.is_main:
        distributed.unwrap(model).save_pretrained(path, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(path)
    distributed.barrier()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
