"""Byte-level BPE tokenizer (trained with `tokenizers`, saved HF-loadable) and token shards.

Token shards are flat arrays of token ids (`train.bin`, `val.bin`): each document's tokens
followed by EOS. `meta.json` records dtype and counts so readers can memory-map them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmpipe.data.corpus import iter_corpus

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
META_FILE = "meta.json"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2
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


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split by document id: stable across runs, machines and Python versions."""
    bucket = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return bucket / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class TokenStats:
    vocab_size: int
    dtype: str
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    chars: int
    chars_per_token: float
    encode_seconds: float
    tokens_per_second: float


def encode_corpus(
    tokenizer: PreTrainedTokenizerBase,
    corpus_dir: Path,
    out_dir: Path,
    val_fraction: float,
    batch_docs: int = 1024,
) -> TokenStats:
    """Encode every document (Rust-side batch encoding), append EOS, split by id hash."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    eos_id = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer  # raw `tokenizers` object: no Python per-token work
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    chars = 0
    start = time.perf_counter()
    with (out_dir / "train.bin").open("wb") as train_f, (out_dir / "val.bin").open("wb") as val_f:
        files = {"train": train_f, "val": val_f}
        progress = tqdm(desc="tokenize", unit="tok", unit_scale=True, mininterval=2)
        for rows in iter_corpus(corpus_dir, batch_docs):
            texts = [row["text"] for row in rows]
            chars += sum(len(t) for t in texts)
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            for row, enc in zip(rows, encodings, strict=True):
                split = "val" if is_validation(row["id"], val_fraction) else "train"
                ids = np.asarray([*enc.ids, eos_id], dtype=dtype)
                files[split].write(ids.tobytes())
                counts[split] += ids.size
                docs[split] += 1
                progress.update(ids.size)
        progress.close()
    seconds = time.perf_counter() - start
    total = counts["train"] + counts["val"]
    if counts["val"] == 0 or counts["train"] == 0:
        empty = "val" if not counts["val"] else "train"
        raise ValueError(
            f"tokenize.val_fraction={val_fraction} left the {empty} split empty"
            f" ({docs['train'] + docs['val']} documents): change it or add data"
        )
    stats = TokenStats(
        vocab_size=vocab_size,
        dtype=dtype.name,
        train_tokens=counts["train"],
        val_tokens=counts["val"],
        train_docs=docs["train"],
        val_docs=docs["val"],
        chars=chars,
        chars_per_token=chars / max(total, 1),
        encode_seconds=seconds,
        tokens_per_second=total / max(seconds, 1e-9),
    )
    (out_dir / META_FILE).write_text(json.dumps(asdict(stats), indent=2) + "\n")
    return stats


def load_tokens(token_dir: Path, split: str) -> np.ndarray:
    """Memory-map one split's token array."""
    meta = json.loads((token_dir / META_FILE).read_text())
    return np.memmap(token_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


def corpus_texts(corpus_dir: Path, val_fraction: float, limit: int | None = None) -> Iterator[str]:
    """Training-split texts (validation documents never shape the vocabulary)."""
    seen = 0
    for rows in iter_corpus(corpus_dir):
        for row in rows:
            if is_validation(row["id"], val_fraction):
                continue
            if limit is not None and seen >= limit:
                return
            seen += 1
            yield row["text"]
