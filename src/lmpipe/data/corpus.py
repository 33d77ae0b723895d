"""The cleaned corpus: the clean stage's pipeline and the Parquet shards it writes.

A corpus directory holds `part-NNNNN.parquet` files with columns id, source, text.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from lmpipe.config import CleanConfig, DataConfig
from lmpipe.data.dedup import ExactDeduplicator
from lmpipe.data.filters import drop_reason, repair
from lmpipe.data.sources import Document, iter_documents

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])
DROP_RULES = ("empty", "too_short", "too_long", "undecodable", "duplicate")


@dataclass
class CleanReport:
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    repaired_encoding: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    # rule -> a few dropped documents, for a person to judge whether the rule is right
    dropped_samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    per_source_out: Counter[str] = field(default_factory=Counter)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "repaired_encoding": self.repaired_encoding,
        }
        out.update({f"dropped_{rule}": self.dropped.get(rule, 0) for rule in DROP_RULES})
        return out


class ShardWriter:
    """Appends documents to Parquet shards of at most `shard_docs` rows each."""

    def __init__(self, directory: Path, shard_docs: int) -> None:
        self.directory = directory
        self.shard_docs = shard_docs
        self.shards = 0
        self._buffer: list[Document] = []
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, doc: Document) -> None:
        self._buffer.append(doc)
        if len(self._buffer) >= self.shard_docs:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        table = pa.table(
            {
                "id": [d.id for d in self._buffer],
                "source": [d.source for d in self._buffer],
                "text": [d.text for d in self._buffer],
            },
            schema=SCHEMA,
        )
        pq.write_table(table, self.directory / f"part-{self.shards:05d}.parquet")
        self.shards += 1
        self._buffer = []


def clean_corpus(data: DataConfig, cfg: CleanConfig, out_dir: Path) -> CleanReport:
    """Read the configured sources, repair, filter and deduplicate, write shards to out_dir."""
    report = CleanReport()
    dedup = ExactDeduplicator() if cfg.dedup == "exact" else None
    writer = ShardWriter(out_dir, cfg.shard_docs)
    for doc in tqdm(iter_documents(data), desc="clean", unit="doc", mininterval=2):
        report.docs_in += 1
        report.bytes_in += len(doc.text.encode("utf-8", "replace"))
        report.repaired_encoding += doc.repaired_encoding
        text = repair(doc.text, cfg)
        reason = drop_reason(text, cfg)
        if reason is None and dedup is not None and dedup.is_duplicate(text):
            reason = "duplicate"
        if reason is not None:
            report.dropped[reason] += 1
            samples = report.dropped_samples.setdefault(reason, [])
            if len(samples) < cfg.dropped_sample_size:
                samples.append({"id": doc.id, "text": doc.text[:2000]})
            continue
        writer.add(Document(doc.id, doc.source, text))
        report.docs_out += 1
        report.bytes_out += len(text.encode("utf-8"))
        report.per_source_out[doc.source] += 1
    writer.flush()
    if report.docs_out == 0:
        raise ValueError(
            f"clean kept no document out of {report.docs_in}: check data.* and clean.*"
        )
    log.info(
        "clean: %d -> %d documents, %.1f -> %.1f MB; dropped %s",
        report.docs_in,
        report.docs_out,
        report.bytes_in / 1e6,
        report.bytes_out / 1e6,
        dict(report.dropped),
    )
    return report


def iter_corpus(directory: Path, batch_size: int = 1024) -> Iterator[list[dict[str, str]]]:
    """Batches of {id, source, text} rows from a corpus directory, in shard order."""
    shards = sorted(directory.glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no part-*.parquet shards")
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_size):
            yield batch.to_pylist()
