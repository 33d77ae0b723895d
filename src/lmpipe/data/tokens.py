"""Token shards: the tokenize stage's output and what pretrain and evaluate read.

Each split (train, val) is one token stream: every document's tokens followed by EOS, the
documents of the split in corpus order, cut into fixed-length blocks. The stream is stored
as flat `uint16` (vocab <= 65536) or `uint32` arrays in shard files holding whole blocks
(`train-00000.bin`, ...); the last partial block of a split is dropped, as in the usual
concatenate-and-chunk recipe. `index.json` says how to read them:

    {"format": "lmpipe.tokens/1", "dtype": "uint16", "vocab_size": 8192, "eos_id": 0,
     "block_size": 1024, "splits": {"train": {"tokens": ..., "blocks": ..., "documents": ...,
     "dropped_tail_tokens": ..., "shards": [{"file": "train-00000.bin", "tokens": ...}]}}}

Which split a document goes to depends only on a hash of its id, so the split is stable
across runs, machines, worker counts and corpus order.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from lmpipe.data.corpus import is_validation
from lmpipe.data.engine import run_step
from lmpipe.data.tokenizer import batch_encoder, document_frame
from lmpipe.runs.config import CleanConfig

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
# Tokens copied at a time when the tasks' streams are joined into block shards.
MERGE_TOKENS = 1 << 24

FORMAT = "lmpipe.tokens/1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenShardWriter:
    """Appends one split's token stream to shard files of whole blocks."""

    def __init__(
        self, directory: Path, split: str, dtype: np.dtype, block_size: int, shard_tokens: int
    ) -> None:
        self.directory = directory
        self.split = split
        self.dtype = dtype
        self.block_size = block_size
        self.blocks_per_shard = max(1, shard_tokens // block_size)
        self.documents = 0
        self.shards: list[dict[str, Any]] = []
        self._carry = np.zeros(0, dtype=dtype)  # fewer than block_size tokens, not yet written
        self._file: BinaryIO | None = None
        self._blocks_in_shard = 0

    def write(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        data = np.concatenate([self._carry, tokens]) if self._carry.size else tokens
        n_blocks = len(data) // self.block_size
        self._carry = data[n_blocks * self.block_size :].copy()
        blocks = data[: n_blocks * self.block_size].reshape(n_blocks, self.block_size)
        while len(blocks):
            if self._file is None or self._blocks_in_shard == self.blocks_per_shard:
                self._open_shard()
            room = self.blocks_per_shard - self._blocks_in_shard
            chunk, blocks = blocks[:room], blocks[room:]
            assert self._file is not None
            self._file.write(chunk.tobytes())
            self._blocks_in_shard += len(chunk)
            self.shards[-1]["tokens"] += chunk.size

    def _open_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = (self.directory / name).open("wb")
        self._blocks_in_shard = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict[str, Any]:
        if self._file is not None:
            self._file.close()
        tokens = sum(s["tokens"] for s in self.shards)
        return {
            "tokens": tokens,
            "blocks": tokens // self.block_size,
            "documents": self.documents,
            "dropped_tail_tokens": int(self._carry.size),
            "shards": self.shards,
        }


class TokenSplit:
    """One split's token stream, memory-mapped across its shards. Supports len() and
    contiguous slicing (returning a numpy array), so it reads like one flat array."""

    def __init__(self, directory: Path, split: str) -> None:
        index = read_index(directory)
        if split not in index["splits"]:
            raise KeyError(f"{directory}/{INDEX_FILE}: no split '{split}'")
        info = index["splits"][split]
        self.dtype = np.dtype(index["dtype"])
        self.block_size = int(index["block_size"])
        self._shards = [
            np.memmap(directory / s["file"], dtype=self.dtype, mode="r")
            for s in info["shards"]
            if s["tokens"]
        ]
        self._starts = np.cumsum([0, *(len(s) for s in self._shards)])
        self._length = int(self._starts[-1])

    def __len__(self) -> int:
        return self._length

    @property
    def blocks(self) -> int:
        return self._length // self.block_size

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenSplit supports contiguous slices only")
        start, stop, _ = key.indices(self._length)
        if start >= stop:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while start < stop:
            shard = self._shards[first]
            offset = start - int(self._starts[first])
            take = min(stop - start, len(shard) - offset)
            parts.append(shard[offset : offset + take])
            start += take
            first += 1
        return np.asarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)


def read_index(directory: Path) -> dict[str, Any]:
    path = directory / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `dvc repro tokenize`")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {index.get('format')!r} (expected {FORMAT})")
    return index


def load_tokens(directory: Path, split: str) -> TokenSplit:
    return TokenSplit(directory, split)


@dataclass
class TokenStats:
    vocab_size: int
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    train_blocks: int
    val_blocks: int
    dropped_tail_tokens: int
    chars: int
    chars_per_token: float
    encode_seconds: float
    tokens_per_second: float


def _prefetch(batches: Iterator[pa.RecordBatch], depth: int = 4) -> Iterator[pa.RecordBatch]:
    """Read ahead in a thread: Parquet decoding overlaps with encoding (both release the GIL)."""
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                slots.put(batch)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(exc)
        slots.put(done)

    threading.Thread(target=produce, name="corpus-reader", daemon=True).start()
    while (item := slots.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class EncodeStep(PipelineStep):
    """Encode one corpus part file: each split's framed token stream (not yet cut into
    blocks) to `<split>-NNNNN.bin`, with its document and character counts."""

    name = "encode"
    type = "lmpipe.tokenize"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        parts: list[Path],
        work: Path,
        val_fraction: float,
        batch_docs: int,
        engine: str,
    ) -> None:
        super().__init__()
        self.tokenizer, self.parts, self.work = tokenizer, parts, work
        self.val_fraction, self.batch_docs, self.engine = val_fraction, batch_docs, engine

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        tokenizer = self.tokenizer
        dtype = token_dtype(len(tokenizer))
        before, after = (np.asarray(ids, dtype=dtype) for ids in document_frame(tokenizer))
        encode = batch_encoder(tokenizer, self.engine)
        counts = {"chars": 0, **{f"{s}_documents": 0 for s in SPLITS}}
        streams = {s: (self.work / f"{s}-{rank:05d}.bin").open("wb") for s in SPLITS}
        progress = tqdm(desc=f"tokenize {rank}", unit="tok", unit_scale=True, mininterval=5)
        batches = pq.ParquetFile(self.parts[rank]).iter_batches(
            batch_size=self.batch_docs, columns=["id", "text"]
        )
        for batch in _prefetch(batches):
            text_column = batch.column("text")
            counts["chars"] += int(pc.sum(pc.utf8_length(text_column)).as_py() or 0)
            encoded = encode(text_column.to_pylist())
            parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
            for doc_id, ids in zip(batch.column("id").to_pylist(), encoded, strict=True):
                split = "val" if is_validation(doc_id, self.val_fraction) else "train"
                parts[split] += (before, np.asarray(ids, dtype=dtype), after)
                counts[f"{split}_documents"] += 1
            for split, arrays in parts.items():
                if arrays:
                    stream = np.concatenate(arrays)
                    streams[split].write(stream.tobytes())
                    progress.update(stream.size)
        progress.close()
        for handle in streams.values():
            handle.close()
        (self.work / f"counts-{rank:05d}.json").write_text(json.dumps(counts))
        self.stat_update("tokens", value=progress.n)


def encode_corpus(
    tokenizer: PreTrainedTokenizerBase,
    corpus_dir: Path,
    out_dir: Path,
    val_fraction: float,
    block_size: int,
    shard_tokens: int,
    batch_docs: int = 1024,
    engine: str = "auto",
    settings: CleanConfig | None = None,
) -> TokenStats:
    """Encode every document (batched; see `batch_encoder`), frame it (EOS after it; an
    encoder's [CLS] before and [SEP] after), route it to its split by id hash and pack the
    streams into block shards. The corpus's part files are encoded as datatrove tasks on
    the data stages' executor (`settings`: clean.executor); their streams are then joined
    in part order, so the shards are the same for any executor."""
    settings = settings or CleanConfig()
    parts = sorted(corpus_dir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{corpus_dir}: no part-*.parquet shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".work-{out_dir.name}"
    work.mkdir(parents=True, exist_ok=True)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    eos = np.asarray([tokenizer.eos_token_id], dtype=dtype)
    start = time.perf_counter()
    step = EncodeStep(tokenizer, parts, work, val_fraction, batch_docs, engine)
    # On this machine one task at a time: the encoder already keeps every core busy, and
    # parallel tasks would only add processes. On SLURM the tasks spread over nodes.
    run_step("tokenize/encode", [step], len(parts), settings, work / "logs", inline=True)
    writers = {s: TokenShardWriter(out_dir, s, dtype, block_size, shard_tokens) for s in SPLITS}
    chars = 0
    for rank in range(len(parts)):
        counts = json.loads((work / f"counts-{rank:05d}.json").read_text())
        chars += counts["chars"]
        for split in SPLITS:
            # read in chunks, not mapped: mapped pages would count in the stage's memory
            with (work / f"{split}-{rank:05d}.bin").open("rb") as stream:
                while (chunk := np.fromfile(stream, dtype=dtype, count=MERGE_TOKENS)).size:
                    writers[split].write(chunk, 0)
            writers[split].documents += counts[f"{split}_documents"]
    seconds = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    splits = {s: w.close() for s, w in writers.items()}
    for split, info in splits.items():
        if info["blocks"] == 0:
            raise ValueError(
                f"tokenize: the {split} split has {info['dropped_tail_tokens']} tokens, less than"
                f" one block of tokenize.block_size={block_size} ({info['documents']} documents):"
                " lower block_size, change tokenize.val_fraction or add data"
            )
    index = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": int(eos[0]),
        "block_size": block_size,
        "splits": splits,
    }
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    total = sum(info["tokens"] + info["dropped_tail_tokens"] for info in splits.values())
    stats = TokenStats(
        vocab_size=vocab_size,
        train_tokens=splits["train"]["tokens"],
        val_tokens=splits["val"]["tokens"],
        train_docs=splits["train"]["documents"],
        val_docs=splits["val"]["documents"],
        train_blocks=splits["train"]["blocks"],
        val_blocks=splits["val"]["blocks"],
        dropped_tail_tokens=sum(info["dropped_tail_tokens"] for info in splits.values()),
        chars=chars,
        chars_per_token=chars / max(total, 1),
        encode_seconds=seconds,
        tokens_per_second=total / max(seconds, 1e-9),
    )
    log.info(
        "tokenize: %d train + %d val tokens (%s), %.2f chars/token, %.0f tokens/s",
        stats.train_tokens,
        stats.val_tokens,
        dtype.name,
        stats.chars_per_token,
        stats.tokens_per_second,
    )
    return stats
