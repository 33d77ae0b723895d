"""Decoder models from transformers configs: presets, loading, saving.

Every saved model is a plain HF directory (config + safetensors + tokenizer + generation
config) that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmpipe.config import ModelConfig

log = logging.getLogger(__name__)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ends a document; <|im_end|> ends a chat turn: generation stops at either."""
    ids = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids


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


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh model from the preset, or `model.init_from` (a local HF directory or hub id)."""
    if cfg.init_from:
        model = load_model(cfg.init_from)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = AutoModelForCausalLM.from_config(
            llama_config(cfg, tokenizer), attn_implementation="sdpa"
        )
    model.generation_config = GenerationConfig(
        eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id
    )
    log.info("model: %s, %.2fM parameters", cfg.preset, count_parameters(model) / 1e6)
    return model


def load_model(path: str | Path) -> PreTrainedModel:
    """Load a causal LM (safetensors only; never remote code)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="sdpa", use_safetensors=True, trust_remote_code=False
    )


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Model, tokenizer and generation config together: one self-contained directory."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
