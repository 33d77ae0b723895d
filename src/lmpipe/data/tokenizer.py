"""Byte-level BPE tokenizer: trained with `tokenizers` on a sample of the corpus, saved so
that `AutoTokenizer.from_pretrained` loads it, with a ChatML chat template for SFT."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.compute as pc
import tiktoken
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lmpipe.data.corpus import is_validation, iter_corpus_batches
from lmpipe.data.pretrained import resolve_source

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
# An encoder's tokenizer adds BERT's three (after the shared ones, so ids 0-3 never move):
# each text is framed as <|cls|> text <|sep|>, and masked-LM targets become <|mask|>.
CLS, SEP, MASK = "<|cls|>", "<|sep|>", "<|mask|>"
ENCODER_TOKENS = [CLS, SEP, MASK]

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
    texts: Iterable[str] | Iterable[list[str]],
    vocab_size: int,
    min_frequency: int = 2,
    encoder: bool = False,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE and wrap it as a transformers fast tokenizer with a chat template
    (and, for an `encoder`, [CLS]/[SEP]/[MASK] tokens and the [CLS] text [SEP] framing)."""
    specials = SPECIAL_TOKENS + (ENCODER_TOKENS if encoder else [])
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"tokenize.vocab_size={vocab_size}: must be at least {256 + len(specials)} for "
            "byte-level BPE"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    if not encoder:
        return PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            eos_token=EOS,
            pad_token=PAD,
            additional_special_tokens=[IM_START, IM_END],
            chat_template=CHAT_TEMPLATE,
        )
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, bpe.token_to_id(CLS)), (SEP, bpe.token_to_id(SEP))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=PAD,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )


def frames_with_cls(tokenizer: PreTrainedTokenizerBase) -> bool:
    """An encoder's tokenizer: it has both a [CLS] and a [SEP] token."""
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def document_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids around each document in the token stream: [CLS] doc [SEP] for an encoder
    (the framing its fine-tuning inputs get), doc EOS for a decoder."""
    if frames_with_cls(tokenizer):
        return [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    return [], [tokenizer.eos_token_id]


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def base_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the pretrained model named by `model.init_from`.

    SFT needs a chat template that marks assistant tokens ({% generation %}); a ChatML
    model whose template lacks the markers gets ours, which renders the same turns.
    """
    source = resolve_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    template = tokenizer.chat_template or ""
    if "{% generation %}" not in template:
        vocab = tokenizer.get_vocab()
        if IM_START in vocab and IM_END in vocab:
            tokenizer.chat_template = CHAT_TEMPLATE
        else:
            log.warning(
                "%s: chat template has no {%% generation %%} markers: SFT on it will fail", spec
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- bulk encoding -------------------------------------------------------------------------

BatchEncoder = Callable[[list[str]], list[list[int]]]
# The GPT-2 pre-tokenization regex, which `pre_tokenizers.ByteLevel(use_regex=True)` applies.
_BYTE_LEVEL_SPLIT = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def tiktoken_equivalent(tokenizer: PreTrainedTokenizerBase) -> tiktoken.Encoding | None:
    """The same byte-level BPE as a tiktoken encoding, or None when it cannot be the same.

    tiktoken merges the adjacent pair whose joined bytes have the lowest rank; `tokenizers`
    merges the pair with the lowest merge rank. With no normaliser, GPT-2 pre-tokenization
    and tokens numbered in merge order (as BpeTrainer numbers them) the two agree; anything
    else (dropout, byte fallback, prefix space, other pre-tokenizers) returns None.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (
        spec.get("normalizer")
        or model.get("type") != "BPE"
        or model.get("dropout")
        or model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
    ):
        return None
    vocab: dict[str, int] = model["vocab"]
    merged_ids = [
        vocab.get(m.replace(" ", "", 1) if isinstance(m, str) else "".join(m))
        for m in model["merges"]
    ]
    if None in merged_ids or merged_ids != sorted(merged_ids):
        return None  # tokens not numbered in merge order
    added = spec.get("added_tokens", [])
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None  # tiktoken matches special tokens as exact strings only
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    specials = {token["content"]: token["id"] for token in added}
    try:
        ranks = {
            bytes(to_byte[c] for c in token): rank
            for token, rank in vocab.items()
            if token not in specials
        }
    except KeyError:  # a token outside the byte alphabet
        return None
    # Added tokens split the text before pre-tokenization in `tokenizers`, even in
    # documents' own text: tiktoken does the same with them as allowed special tokens.
    return tiktoken.Encoding(
        "lmpipe-bpe", pat_str=_BYTE_LEVEL_SPLIT, mergeable_ranks=ranks, special_tokens=specials
    )


# Documents of the first batch that tiktoken's ids are checked on against `tokenizers`.
CHECKED_DOCS = 64


def batch_encoder(tokenizer: PreTrainedTokenizerBase, engine: str = "auto") -> BatchEncoder:
    """texts -> token ids (no special tokens), as fast as this machine allows.

    `auto` uses tiktoken's BPE engine (about 4x `tokenizers` on the same text) when it is
    provably the same tokenization, checked once more on the first documents against
    `tokenizers`; otherwise, or with `engine="tokenizers"`, the Rust `tokenizers` batch
    encoder without offsets. Both run on every core.
    """
    backend = tokenizer.backend_tokenizer

    def with_tokenizers(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    encoding = tiktoken_equivalent(tokenizer) if engine == "auto" else None
    if encoding is None:
        return with_tokenizers
    encode_tiktoken = tiktoken_batches(encoding)
    use_tiktoken, checked = True, False

    def with_tiktoken(texts: list[str]) -> list[list[int]]:
        nonlocal use_tiktoken, checked
        if not use_tiktoken:
            return with_tokenizers(texts)
        ids = encode_tiktoken(texts)
        if not checked:
            checked = True
            # A sample of the first batch: the whole batch cost a tenth of the stage's time.
            if ids[:CHECKED_DOCS] != with_tokenizers(texts[:CHECKED_DOCS]):
                log.warning("tiktoken and tokenizers disagree here: using tokenizers")
                use_tiktoken = False
                return with_tokenizers(texts)
        return ids

    return with_tiktoken


@functools.cache
def _encoding_pool() -> ThreadPoolExecutor:
    """One thread per core for the whole process, however many encoders are made."""
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="tiktoken")


def tiktoken_batches(encoding: tiktoken.Encoding, chunks_per_thread: int = 4) -> BatchEncoder:
    """texts -> ids with tiktoken's encoder on every core, added tokens allowed.

    One pool for all batches, and each thread given a few interleaved chunks of the batch:
    tiktoken's own `encode_batch` starts a pool per call and hands it one document at a
    time, which made it about a quarter slower here (50 MB, 2 cores: 2.7 s against 2.05 s).
    """
    pool = _encoding_pool()
    chunks = (os.cpu_count() or 1) * chunks_per_thread  # the pool has a thread per core
    allowed = encoding.special_tokens_set

    def encode_chunk(texts: list[str]) -> list[list[int]]:
        return [encoding.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]

    def encode(texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = [[] for _ in texts]
        parts = pool.map(encode_chunk, [texts[i::chunks] for i in range(chunks)])
        for start, part in enumerate(parts):
            ids[start::chunks] = part
        return ids

    return encode


def corpus_text_chars(corpus_dir: Path) -> int:
    """Characters of the corpus text, counted (a second or two per GB): the Parquet
    metadata's sizes would make the BPE sample depend on how the documents are split into
    files and row groups (clean.shards), not only on the documents."""
    total = 0
    for batch in iter_corpus_batches(corpus_dir, 8192, columns=["text"]):
        total += int(pc.sum(pc.utf8_length(batch.column("text"))).as_py() or 0)
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
