"""Held-out language-modelling benchmarks of causal models beyond our own corpus: WikiText-2
raw test in bits per byte, for our models and for reference models scored in the same run
(a real pretrained model such as SmolLM2-135M), each with its own tokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.evaluation.lm_metrics import bits_per_byte
from lmpipe.runs.config import WikitextConfig
from lmpipe.taskdata import wikitext


def wikitext_scores(
    w: WikitextConfig,
    models: Mapping[str, PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    references: Iterable[tuple[str, PreTrainedModel, PreTrainedTokenizerBase]] = (),
) -> dict[str, float]:
    """`<model>_wikitext_bpb` on WikiText-2's test text for each of `models`, and for each
    (name, model, its own tokenizer) of `references` (loaded one at a time if an iterator),
    all in windows of `seq_len`."""
    if not w.enabled:
        return {}
    text = wikitext.head(wikitext.wikitext_text("test"), w.max_bytes)
    scores = {"wikitext_test_bytes": float(len(text.encode("utf-8")))}
    window = seq_len - 1
    for label, model in models.items():
        scores[f"{label}_wikitext_bpb"] = bits_per_byte(model, tokenizer, text, window,
                                                        batch_size, device)["bpb"]  # fmt: skip
    for spec, reference, reference_tokenizer in references:
        scores[f"{reference_label(spec)}_wikitext_bpb"] = bits_per_byte(
            reference.to(device), reference_tokenizer, text, window, batch_size, device
        )["bpb"]
    return scores


def reference_label(spec: str) -> str:
    """A metric-name-safe label for a reference model (`smollm2-135m` -> `smollm2_135m`)."""
    return "ref_" + re.sub(r"[^0-9A-Za-z]+", "_", Path(spec).stem).strip("_").lower()
