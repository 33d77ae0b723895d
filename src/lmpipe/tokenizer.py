"""Byte-level BPE tokenizer: trained with `tokenizers` on a sample of the corpus, saved so
that `AutoTokenizer.from_pretrained` loads it, with a ChatML chat template for SFT."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmpipe.data.corpus import iter_corpus_batches
from lmpipe.data.tokens import is_validation

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML. The {% generation %} block marks assistant tokens, so
# apply_chat_template(..., return_assistant_tokens_mask=True) yields the SFT loss mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]], vocab_size: int, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE and wrap it as a transformers fast tokenizer with a chat template."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"tokenize.vocab_size={vocab_size}: must be at least 260 for byte-level BPE"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def corpus_text_chars(corpus_dir: Path) -> int:
    """Approximate size of the corpus text from Parquet metadata, without reading it."""
    total = 0
    for shard in sorted(corpus_dir.glob("part-*.parquet")):
        metadata = pq.ParquetFile(shard).metadata
        column = metadata.schema.names.index("text")
        for group in range(metadata.num_row_groups):
            total += metadata.row_group(group).column(column).total_uncompressed_size
    return total


def _sample_bucket(doc_id: str) -> float:
    # Salted, so the sample is independent of the validation split (also a hash of the id).
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8, salt=b"bpe-sample").digest()
    return int.from_bytes(digest, "big") / 2**64


def training_sample(
    corpus_dir: Path, val_fraction: float, sample_chars: int | None, batch_docs: int = 1024
) -> Iterator[list[str]]:
    """Batches of training-split texts for BPE: all of them, or a sample of about
    `sample_chars` characters spread evenly over the corpus (chosen by a hash of the id, so
    the same corpus always gives the same sample). Validation documents never shape the
    vocabulary."""
    rate = 1.0
    if sample_chars is not None:
        train_chars = corpus_text_chars(corpus_dir) * (1 - val_fraction)
        rate = min(1.0, sample_chars / max(train_chars, 1.0))
    taken = 0
    for batch in iter_corpus_batches(corpus_dir, batch_docs, columns=["id", "text"]):
        texts = []
        for doc_id, text in zip(
            batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True
        ):
            if is_validation(doc_id, val_fraction):
                continue
            if rate < 1.0 and _sample_bucket(doc_id) >= rate:
                continue
            if sample_chars is not None and taken + len(text) > sample_chars:
                if texts:
                    yield texts
                return
            texts.append(text)
            taken += len(text)
        if texts:
            yield texts
