"""The fine-tuned model as a GGUF file, the format llama.cpp and Ollama run.

Llama-style causal LMs only (LlamaForCausalLM: our presets and SmolLM2), as llama.cpp's own
converter (`convert_hf_to_gguf.py`) writes them: tensor names from the gguf package's map,
the query and key rows permuted into llama.cpp's rotary layout, 1-D tensors (norms) in F32,
and the byte-level BPE tokenizer as `gpt2` tokens and merges under llama.cpp's name for
GPT-2's split regex (`gpt-2`), with the chat template stripped of transformers' training-only
`{% generation %}` tags, which llama.cpp's, Ollama's and node-llama-cpp's template engines
reject. A
matrix whose rows are no multiple of the quantization block (688 = 21.5 x 32) is written in
F16 instead, as llama.cpp's quantizer falls back too; under the 4- and 5-bit types the
output head (or the embeddings tied to it) stays at 8 bits (Q8_0), as llama.cpp's quantizer
keeps it at 6 (Q6_K, a K-quant the gguf package cannot write).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.training.model import stop_token_ids

log = logging.getLogger(__name__)

GGML_TYPES = {
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "Q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "Q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# The legacy block types llama.cpp writes below 8 bits: their output head stays at 8.
BELOW_8_BITS = ("Q5_1", "Q5_0", "Q4_1", "Q4_0")


# transformers' assistant-token markers (return_assistant_tokens_mask): no-ops when serving.
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


# The tensors that make the logits: the output head, or the token embeddings tied to it.
OUTPUT_TENSORS = ("output.weight", "token_embd.weight")


class GgufExportError(ValueError):
    """A model the exporter cannot write; the message says what it maps."""


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a query or key projection in llama.cpp's rotary order (its converter's
    `permute`; transformers' GGUF loader undoes it)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))  # fmt: skip


def unsupported(model_dir: Path) -> str | None:
    """Why the model in `model_dir` cannot be written as GGUF; None: it can."""
    config = AutoConfig.from_pretrained(model_dir)
    architectures = config.architectures or []
    if config.model_type != "llama":
        named = ", ".join(architectures) or "?"
        return (f"{model_dir}: a {config.model_type} model ({named}); the GGUF exporter maps "
                "Llama-style causal LMs (LlamaForCausalLM) only")  # fmt: skip
    if architectures and architectures[0] != "LlamaForCausalLM":
        return (f"{model_dir}: {architectures[0]} has a task head llama.cpp does not run; the "
                "GGUF exporter writes causal LMs (LlamaForCausalLM) only")  # fmt: skip
    return None


def serving_chat_template(template: str) -> str:
    """`template` as a runtime renders it: without the `{% generation %}` block tags, which
    only mark the tokens SFT trains on and render nothing."""
    return GENERATION_TAG.sub("", template)


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    tokenizer = load_tokenizer(model_dir)
    parsed = json.loads(tokenizer.backend_tokenizer.to_str())
    if parsed["model"]["type"] != "BPE":
        raise GgufExportError(f"{model_dir}: a {parsed['model']['type']} tokenizer; the GGUF "
                              "exporter writes byte-level BPE tokenizers only")  # fmt: skip
    pre = parsed.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        # llama.cpp picks its split regex by name; only GPT-2's is known to be this one.
        raise GgufExportError(f"{model_dir}: pre-tokenizer {json.dumps(pre)[:200]}; the "
                              "GGUF exporter writes ByteLevel with GPT-2's split regex "
                              "only")  # fmt: skip
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        kind = gguf.TokenType.NORMAL if token is not None else gguf.TokenType.UNUSED
        types.append(gguf.TokenType.CONTROL if index in special else kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in parsed["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, as ByteLevel(use_regex=True)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("pad", tokenizer.pad_token_id)):  # fmt: skip
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    # The token that ends a chat turn (<|im_end|>), when it is not EOS: llama.cpp stops there.
    turn_end = [index for index in stop_token_ids(tokenizer) if index != tokenizer.eos_token_id]
    if turn_end:
        writer.add_eot_token_id(turn_end[0])
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(serving_chat_template(tokenizer.chat_template))


def export_gguf(model_dir: Path, out: Path, kind: str = "F16") -> Path:
    """Write the causal LM saved in `model_dir` (weights and tokenizer) as GGUF `kind`
    (one of GGML_TYPES) to `out`."""
    if kind not in GGML_TYPES:
        raise GgufExportError(f"GGUF type {kind!r}: the exporter writes {list(GGML_TYPES)}")
    reason = unsupported(model_dir)
    if reason:
        raise GgufExportError(reason)
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    qtype, file_type = GGML_TYPES[kind]
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or
                                    config.rope_parameters["rope_theta"]))  # fmt: skip
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    _add_tokenizer(writer, model_dir, config.vocab_size)

    fallback = []
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a missing output.weight as the tied embeddings
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufExportError(f"{model_dir}: no GGUF name for tensor {hf_name}")
        data = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
            continue
        tensor_type = qtype
        if name in OUTPUT_TENSORS and kind in BELOW_8_BITS:
            # The output head (the tied embeddings) at 8 bits, as llama.cpp's quantizer keeps
            # it at 6 (Q6_K): in 4 bits SmolLM2's exact match fell from 0.955 to 0.555.
            tensor_type = gguf.GGMLQuantizationType.Q8_0
        block = gguf.GGML_QUANT_SIZES[tensor_type][0]
        if tensor_type != gguf.GGMLQuantizationType.F16 and data.shape[-1] % block:
            fallback.append(name)
            writer.add_tensor(name, data.astype(np.float16))
            continue
        if tensor_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if fallback:
        log.info("gguf %s: %d tensors in F16, their rows no multiple of %d: %s", kind,
                 len(fallback), gguf.GGML_QUANT_SIZES[qtype][0], ", ".join(fallback))  # fmt: skip
    log.info("gguf: wrote %s (%s, %.1f MB)", out, kind, out.stat().st_size / 1e6)
    return out
