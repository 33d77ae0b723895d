"""The cleaned corpus: the clean stage's pipeline and the Parquet shards it writes.

Documents stream from the sources in batches to worker processes, which repair, judge and
sign them (exact digest, MinHash); results come back in corpus order and the deduplication
decisions are made here, one document at a time. The output is therefore the same for any
number of workers, and memory is bounded by a few batches plus the dedup indexes.

A corpus directory holds `part-NNNNN.parquet` files with columns id, source, text.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lmpipe.data.dedup import ExactDeduplicator, NearDeduplicator, exact_key, minhash_signature
from lmpipe.data.filters import QUALITY_RULES, REPAIRS, DocumentFilter
from lmpipe.data.sources import SOURCE_PROBLEMS, Document, iter_documents
from lmpipe.runs.config import CleanConfig, DataConfig

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])
# Text repairs, and "encoding": bytes that were not valid UTF-8 (repaired while decoding).
REPAIR_COUNTS = (*REPAIRS, "encoding")
DROP_RULES = (*SOURCE_PROBLEMS, *QUALITY_RULES, "blocklist", "duplicate", "near_duplicate")
# Document lengths are histogrammed in powers of two: bin k holds 2**k <= chars < 2**(k+1).
LENGTH_BINS = 32
PREVIEW_CHARS = 1000
# A batch sent to a worker closes at this many characters even if it has few documents.
BATCH_CHARS = 8_000_000


@dataclass
class CleanReport:
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    repaired: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    # rule -> a few dropped documents, for a person to judge whether the rule is right
    dropped_samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    per_source_in: Counter[str] = field(default_factory=Counter)
    per_source_out: Counter[str] = field(default_factory=Counter)
    length_in: Counter[int] = field(default_factory=Counter)
    length_out: Counter[int] = field(default_factory=Counter)
    near_duplicate_clusters: int = 0
    # source -> md5 of its documents as read (ids and raw text): the lineage of the corpus
    raw_digests: dict[str, Any] = field(default_factory=dict)

    def add_raw(self, doc: Document) -> None:
        digest = self.raw_digests.setdefault(doc.source, hashlib.md5(usedforsecurity=False))
        digest.update(f"{doc.id}\0{doc.text}\0".encode("utf-8", "surrogatepass"))

    def source_digests(self) -> dict[str, str]:
        return {source: digest.hexdigest() for source, digest in self.raw_digests.items()}

    def stats(self) -> dict[str, float]:
        """Flat numbers for stats.json (a DVC metric) and MLflow."""
        out: dict[str, float] = {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "near_duplicate_clusters": self.near_duplicate_clusters,
        }
        out.update({f"repaired_{name}": self.repaired.get(name, 0) for name in REPAIR_COUNTS})
        out.update({f"dropped_{rule}": self.dropped.get(rule, 0) for rule in DROP_RULES})
        return out

    def length_histogram(self) -> dict[str, list[int]]:
        """Document lengths (characters) before and after cleaning, in power-of-two bins."""
        top = max([*self.length_in, *self.length_out, 0]) + 1
        return {
            "bin_start_chars": [2**k for k in range(top)],
            "before": [self.length_in.get(k, 0) for k in range(top)],
            "after": [self.length_out.get(k, 0) for k in range(top)],
        }


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split by document id: stable across runs, machines and Python versions."""
    bucket = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return bucket / 2**64 < val_fraction


def length_bin(chars: int) -> int:
    return min(int(math.log2(chars)) if chars > 0 else 0, LENGTH_BINS - 1)


class ShardWriter:
    """Appends documents to Parquet shards of at most `shard_docs` rows each, written a row
    group at a time, so memory holds one row group, never a whole shard."""

    def __init__(self, directory: Path, shard_docs: int, row_group_docs: int = 2048) -> None:
        self.directory = directory
        self.shard_docs = shard_docs
        self.row_group_docs = min(row_group_docs, shard_docs)
        self.shards = 0
        self._rows_in_shard = 0
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[Document] = []
        self._buffer_chars = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, doc: Document) -> None:
        self._buffer.append(doc)
        self._buffer_chars += len(doc.text)
        room = self.shard_docs - self._rows_in_shard
        if len(self._buffer) >= min(self.row_group_docs, room) or self._buffer_chars > BATCH_CHARS:
            self._write_row_group()

    def _write_row_group(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            path = self.directory / f"part-{self.shards:05d}.parquet"
            self._writer = pq.ParquetWriter(path, SCHEMA)
        table = pa.table(
            {
                "id": [d.id for d in self._buffer],
                "source": [d.source for d in self._buffer],
                "text": [d.text for d in self._buffer],
            },
            schema=SCHEMA,
        )
        self._writer.write_table(table)
        self._rows_in_shard += len(self._buffer)
        self._buffer, self._buffer_chars = [], 0
        if self._rows_in_shard >= self.shard_docs:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.shards += 1
            self._rows_in_shard = 0

    def flush(self) -> None:
        """Write what is buffered and close the current shard."""
        self._write_row_group()
        self._close_shard()


# --- work done in the worker processes -----------------------------------------------------

# (text or preview, drop reason, repairs, exact digest, MinHash signature)
Judged = tuple[str, str | None, tuple[str, ...], bytes | None, np.ndarray | None]

_worker: tuple[DocumentFilter, CleanConfig] | None = None


def _init_worker(cfg: CleanConfig, document_filter: DocumentFilter | None = None) -> None:
    global _worker
    _worker = (document_filter or DocumentFilter(cfg), cfg)


def _judge_batch(batch: list[tuple[str, str | None]]) -> list[Judged]:
    """Repair and judge (text, source problem) pairs; sign the documents that pass."""
    assert _worker is not None, "worker not initialised"
    document_filter, cfg = _worker
    out: list[Judged] = []
    for raw, problem in batch:
        if problem is not None:
            out.append((raw[:PREVIEW_CHARS], problem, (), None, None))
            continue
        result = document_filter(raw)
        if result.reason is not None:
            out.append((raw[:PREVIEW_CHARS], result.reason, tuple(result.repairs), None, None))
            continue
        key = exact_key(result.text) if cfg.dedup.exact else None
        signature = minhash_signature(result.text, cfg.dedup) if cfg.dedup.near else None
        out.append((result.text, None, tuple(sorted(result.repairs)), key, signature))
    return out


# --- the pipeline --------------------------------------------------------------------------


def _batches(docs: Iterable[Document], batch_docs: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= batch_docs or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _judged_batches(
    batches: Iterator[list[Document]],
    cfg: CleanConfig,
    document_filter: DocumentFilter,
    workers: int,
) -> Iterator[tuple[list[Document], list[Judged]]]:
    """Each batch with its judgements, in input order. At most 2 batches per worker are in
    flight, so a huge corpus never piles up in memory ahead of the writer. With one worker
    the judging runs here, with `document_filter`; workers build their own."""
    if workers <= 1:
        _init_worker(cfg, document_filter)
        for batch in batches:
            yield batch, _judge_batch([(d.text, d.problem) for d in batch])
        return
    # forkserver, not fork: the stage process has threads (tqdm, MLflow) that fork would copy.
    context = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(cfg,))
    pending: deque[tuple[list[Document], Future[list[Judged]]]] = deque()
    try:
        for batch in batches:
            payload = [(d.text, d.problem) for d in batch]
            pending.append((batch, pool.submit(_judge_batch, payload)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def as_clean_config(cfg: CleanConfig | DictConfig) -> CleanConfig:
    """A plain dataclass (cheap to send to worker processes) from a config node."""
    if isinstance(cfg, DictConfig):
        obj: Any = OmegaConf.to_object(cfg)
        return obj
    return cfg


def clean_corpus(data: DataConfig, cfg: CleanConfig | DictConfig, out_dir: Path) -> CleanReport:
    """Read the configured sources, repair, filter and deduplicate, write shards to out_dir."""
    cfg = as_clean_config(cfg)
    document_filter = DocumentFilter(cfg)  # a bad blocklist fails before any worker starts
    workers = cfg.workers or os.cpu_count() or 1
    report = CleanReport()
    exact = ExactDeduplicator() if cfg.dedup.exact else None
    near = NearDeduplicator(cfg.dedup) if cfg.dedup.near else None
    writer = ShardWriter(out_dir, cfg.shard_docs)
    # UTF-8 needs at most 4 bytes per character: larger inputs cannot pass max_chars.
    max_bytes = 4 * cfg.quality.max_chars if cfg.quality.max_chars is not None else None
    docs = iter_documents(data, max_bytes)
    progress = tqdm(desc="clean", unit="doc", mininterval=2)
    for batch, judgements in _judged_batches(
        _batches(docs, cfg.batch_docs), cfg, document_filter, workers
    ):
        progress.update(len(batch))
        for doc, (text, reason, repairs, key, signature) in zip(batch, judgements, strict=True):
            report.docs_in += 1
            report.per_source_in[doc.source] += 1
            report.add_raw(doc)
            report.repaired.update(repairs)
            if doc.problem is None:
                report.chars_in += len(doc.text)
                report.length_in[length_bin(len(doc.text))] += 1
                report.repaired["encoding"] += doc.repaired_encoding
            # key and signature are None when their dedup is switched off
            if reason is None and exact is not None and key is not None and exact.seen_key(key):
                reason = "duplicate"
            elif reason is None and near is not None and signature is not None:
                reason = "near_duplicate" if near.is_duplicate(signature) else None
            if reason is not None:
                report.dropped[reason] += 1
                samples = report.dropped_samples.setdefault(reason, [])
                if len(samples) < cfg.dropped_sample_size:
                    samples.append({"id": doc.id, "text": text[:PREVIEW_CHARS]})
                continue
            writer.add(Document(doc.id, doc.source, text))
            report.docs_out += 1
            report.chars_out += len(text)
            report.length_out[length_bin(len(text))] += 1
            report.per_source_out[doc.source] += 1
    progress.close()
    writer.flush()
    report.near_duplicate_clusters = len(near.clusters) if near is not None else 0
    if report.docs_in == 0:
        raise ValueError("clean found no document in the configured source: check data.*")
    if report.docs_out == 0:
        raise ValueError(
            f"clean kept no document out of {report.docs_in} (dropped: {dict(report.dropped)}):"
            " check data.* and clean.*"
        )
    log.info(
        "clean: %d -> %d documents, %.1f -> %.1f M chars; dropped %s",
        report.docs_in,
        report.docs_out,
        report.chars_in / 1e6,
        report.chars_out / 1e6,
        dict(report.dropped),
    )
    return report


def iter_corpus(
    directory: Path, batch_size: int = 1024, columns: list[str] | None = None
) -> Iterator[list[dict[str, str]]]:
    """Batches of {id, source, text} rows from a corpus directory, in shard order."""
    for batch in iter_corpus_batches(directory, batch_size, columns):
        yield batch.to_pylist()


def iter_corpus_batches(
    directory: Path, batch_size: int = 1024, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Arrow record batches of a corpus directory, in shard order (no per-row Python objects)."""
    shards = sorted(directory.glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no part-*.parquet shards")
    for shard in shards:
        yield from pq.ParquetFile(shard).iter_batches(batch_size=batch_size, columns=columns)
