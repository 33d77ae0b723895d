"""Our GGUF exports in a real llama.cpp (node-llama-cpp's prebuilt CPU build, pinned in
tools/llamacpp): each type loads, the file's chat template renders our prompts to
transformers' tokens, and F16's greedy replies to 50 held-out problems are transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmpipe.deploy.gguf_export import GGML_TYPES, export_gguf, serving_chat_template
from lmpipe.deploy.llamacpp import LlamaCppUnavailable, ensure_runtime, greedy_replies
from lmpipe.feedback.rollouts import prompt_ids
from lmpipe.runs.config import ModelConfig
from lmpipe.taskdata.reasoning_gym import load_splits
from lmpipe.training.loop import seed_everything
from lmpipe.training.model import build_model, save_model, stop_token_ids
from tests.conftest import threads_per_worker

MAX_TOKENS = 12
F16_TIE = 0.05  # logits of a near tie F16's rounding may order either way
# ... and llama.cpp's 8-bit activations in its quantized matmuls (4-bit weights: larger).
QUANTIZED_TIE = {"Q8_0": 0.3, "Q5_1": 0.3, "Q5_0": 0.3, "Q4_1": 0.3, "Q4_0": 0.3}


@pytest.fixture(scope="module")
def runtime() -> Path:
    try:
        return ensure_runtime()
    except LlamaCppUnavailable as why:
        pytest.skip(f"no llama.cpp runtime here: {why}")


@pytest.fixture(scope="module")
def problems() -> list[list[dict[str, str]]]:
    splits = load_splits("chain_sum", {"train": 1, "val": 1, "test": 50}, seed=0,
                         options={}, val_fraction=0.1, test_fraction=0.1)  # fmt: skip
    return [[m for m in c.messages if m["role"] != "assistant"] for c in splits["test"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    """A grouped-query Llama with weights of a trained model's scale (logits with margins
    worth comparing), as GGUF of every type the exporter writes, beside its transformers
    directory."""
    seed_everything(0)
    cfg = ModelConfig(preset="test", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=256)  # fmt: skip
    model = build_model(cfg, tiny_tokenizer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    root = tmp_path_factory.mktemp("llamacpp")
    save_model(model, tiny_tokenizer, root / "model")
    files = {kind: export_gguf(root / "model", root / f"model-{kind}.gguf", kind)
             for kind in GGML_TYPES}  # fmt: skip
    return {"model": root / "model", **files}


@pytest.fixture(scope="module")
def runs(runtime: Path, exported: dict[str, Path], problems) -> dict[str, tuple]:
    """Each file's metadata and greedy replies, from one llama.cpp process per file."""
    threads = threads_per_worker()
    return {kind: greedy_replies(exported[kind], problems, MAX_TOKENS, threads)
            for kind in GGML_TYPES}  # fmt: skip


def test_f16_loads_and_replies_as_transformers_to_50_held_out_problems(
    runs: dict[str, tuple], exported: dict[str, Path], problems, tiny_tokenizer
) -> None:
    from lmpipe.training.model import load_model

    meta, replies = runs["F16"]
    assert meta["pre"] == "gpt-2"
    assert meta["eog"]["eot"] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # node-llama-cpp's engine renders transformers' {% generation %} tags; llama.cpp's own
    # (minja) and Ollama's reject them: the file holds none.
    assert "{% generation %}" not in meta["chat_template"] and "im_start" in meta["chat_template"]
    assert len(replies) == len(problems) == 50
    model = load_model(exported["model"]).eval()
    ends = stop_token_ids(tiny_tokenizer)
    for messages, got in zip(problems, replies, strict=True):
        # The file's template, rendered by the runtime's engine, gives transformers' prompt.
        assert got.prompt_tokens == tuple(prompt_ids(tiny_tokenizer, messages))
        assert got.prompt_text == tiny_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        # Every token llama.cpp chose is transformers' greedy pick given the same prefix, up
        # to F16's rounding (a random model has near ties a trained one lacks; the GGUF
        # benchmark compares whole replies of trained models), and a reply that ended early
        # ended where transformers' pick is an end-of-turn token.
        ids = torch.tensor([got.prompt_tokens + got.reply_tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(got.prompt_tokens) - 1 :]
        best = logits.max(-1).values
        chosen = logits[:-1].gather(1, torch.tensor(got.reply_tokens)[:, None])[:, 0]
        assert bool((chosen >= best[:-1] - F16_TIE).all()), messages[-1]["content"]
        if len(got.reply_tokens) < MAX_TOKENS:
            assert float(logits[-1, ends].max()) >= float(best[-1]) - F16_TIE


def test_a_multi_turn_conversation_renders_as_transformers_renders_it(
    runtime: Path, exported: dict[str, Path], tiny_tokenizer
) -> None:
    conversation = [{"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": "What is 2 + 2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And 3 + 3?"}]  # fmt: skip
    _, (reply,) = greedy_replies(exported["F16"], [conversation], 1)
    assert reply.prompt_tokens == tuple(prompt_ids(tiny_tokenizer, conversation))


def test_every_type_the_exporter_writes_is_tested_here() -> None:
    assert set(GGML_TYPES) == {"F16", *QUANTIZED_TIE}


@pytest.mark.parametrize("kind", sorted(QUANTIZED_TIE))
def test_quantized_files_reply_as_their_dequantized_weights_do(
    runs: dict[str, tuple], exported: dict[str, Path], problems, tiny_tokenizer, kind: str
) -> None:
    """Quantized weights move a random model's near ties (Q4_0 changes most of its first
    tokens from fp32's), so each file is held to its own weights: llama.cpp's greedy tokens
    are those of the file dequantized by the gguf package (transformers' GGUF reader), up to
    the rounding of llama.cpp's 8-bit activations in quantized matmuls."""
    from transformers import AutoModelForCausalLM

    meta, replies = runs[kind]
    assert meta["pre"] == "gpt-2" and len(replies) == len(problems)
    path = exported[kind]
    dequantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    for messages, got in zip(problems, replies, strict=True):
        assert got.prompt_tokens == tuple(prompt_ids(tiny_tokenizer, messages))
        with torch.no_grad():
            logits = dequantized(torch.tensor([got.prompt_tokens + got.reply_tokens])).logits[0]
        logits = logits[len(got.prompt_tokens) - 1 : -1]
        chosen = logits.gather(1, torch.tensor(got.reply_tokens)[:, None])[:, 0]
        assert bool((chosen >= logits.max(-1).values - QUANTIZED_TIE[kind]).all()), kind


def test_the_training_only_generation_tags_are_stripped_and_nothing_else() -> None:
    template = ("{% for m in messages %}{%- generation -%}{{ m['content'] }}"
                "{% endgeneration %}{% endfor %}")  # fmt: skip
    assert (
        serving_chat_template(template) == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
