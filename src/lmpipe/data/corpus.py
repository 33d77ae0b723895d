"""The cleaned corpus: the clean stage's pipeline and the Parquet shards it writes.

The work runs as datatrove tasks (`lmpipe.data.engine`), in three steps:

1. **judge** (`clean.shards` tasks): task r reads its run of input units (whole files, in
   corpus order), repairs and judges each document, and writes the ones that pass as
   candidates, with their dedup records and signatures (`lmpipe.data.dedup`);
2. **dedup** (as many tasks): each sorts one hash partition of the records and confirms the
   candidate pairs; one pass in this process then decides which copies go;
3. **write** (`clean.shards` tasks): task r writes its kept candidates as part files.

Each task's output depends only on its rank and the number of tasks, so the corpus is the
same for any executor and worker count, and a rerun after an interruption skips the tasks
that completed. Memory holds a batch and the duplicates, never the corpus.

A corpus directory holds `part-NNNNN.parquet` files with columns id, source, text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep
from omegaconf import DictConfig, OmegaConf

from lmpipe.data import dedup
from lmpipe.data.engine import INLINE_BYTES, check_settings, run_step
from lmpipe.data.filters import QUALITY_RULES, REPAIRS, DocumentFilter
from lmpipe.data.sources import SOURCE_PROBLEMS, Document, InputUnit, input_units, unit_documents
from lmpipe.runs.config import CleanConfig, DataConfig

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])
# Text repairs, and "encoding": bytes that were not valid UTF-8 (repaired while decoding).
REPAIR_COUNTS = (*REPAIRS, "encoding")
DROP_RULES = (*SOURCE_PROBLEMS, *QUALITY_RULES, "blocklist", dedup.DUPLICATE, dedup.NEAR_DUPLICATE)
# Document lengths are histogrammed in powers of two: bin k holds 2**k <= chars < 2**(k+1).
LENGTH_BINS = 32
PREVIEW_CHARS = 1000
# A row group closes at this many characters even if it has few documents.
BATCH_CHARS = 8_000_000
# Documents whose dedup records are written to the partitions at once.
RECORD_BATCH = 4096
# Bump when what a task writes changes, so a resumed run never mixes the two.
WORK_FORMAT = 1


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
    # (source, unit) -> md5 of the unit's documents as read (ids and raw text)
    unit_digests: list[tuple[str, str]] = field(default_factory=list)

    def source_digests(self) -> dict[str, str]:
        """source -> md5 over its units' digests, in corpus order: the corpus's lineage."""
        digests: dict[str, Any] = {}
        for source, digest in self.unit_digests:
            digests.setdefault(source, hashlib.md5(usedforsecurity=False)).update(digest.encode())
        return {source: digest.hexdigest() for source, digest in digests.items()}

    def sample(self, reason: str, doc_id: str, text: str, limit: int) -> None:
        samples = self.dropped_samples.setdefault(reason, [])
        if len(samples) < limit:
            samples.append({"id": doc_id, "text": text[:PREVIEW_CHARS]})

    def merge(self, other: CleanReport, limit: int) -> None:
        """Add a later task's report: counts add up, samples keep the first `limit`."""
        for name in ("docs_in", "docs_out", "chars_in", "chars_out", "near_duplicate_clusters"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("repaired", "dropped", "per_source_in", "per_source_out"):
            getattr(self, name).update(getattr(other, name))
        self.length_in.update(other.length_in)
        self.length_out.update(other.length_out)
        for reason, samples in other.dropped_samples.items():
            for sample in samples:
                self.sample(reason, sample["id"], sample["text"], limit)
        self.unit_digests += other.unit_digests

    def save(self, path: Path) -> None:
        # not asdict: it would rebuild each Counter from (key, count) pairs, counting them
        path.write_text(json.dumps({f.name: getattr(self, f.name) for f in fields(self)}))

    @classmethod
    def load(cls, path: Path) -> CleanReport:
        raw = json.loads(path.read_text())
        report = cls(**raw)
        for name in ("repaired", "dropped", "per_source_in", "per_source_out"):
            setattr(report, name, Counter(raw[name]))
        report.length_in = Counter({int(k): v for k, v in raw["length_in"].items()})
        report.length_out = Counter({int(k): v for k, v in raw["length_out"].items()})
        report.unit_digests = [tuple(pair) for pair in raw["unit_digests"]]
        return report

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
    group at a time, so memory holds one row group, never a whole shard. Files are named
    `<prefix>-NNNNN.parquet`, numbered from `first`."""

    def __init__(
        self,
        directory: Path,
        shard_docs: int,
        row_group_docs: int = 2048,
        prefix: str = "part",
        first: int = 0,
    ) -> None:
        self.directory = directory
        self.shard_docs = shard_docs
        self.row_group_docs = min(row_group_docs, shard_docs)
        self.prefix = prefix
        self.first = first
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

    def add_table(self, table: pa.Table) -> None:
        """Append rows already in Arrow form (no Python object per document)."""
        self._write_row_group()
        while table.num_rows:
            room = self.shard_docs - self._rows_in_shard
            take = min(room, self.row_group_docs, table.num_rows)
            self._write_table(table.slice(0, take))
            table = table.slice(take)

    def _write_row_group(self) -> None:
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
        self._buffer, self._buffer_chars = [], 0
        self._write_table(table)

    def _write_table(self, table: pa.Table) -> None:
        """One row group, in the current shard (the caller keeps it within shard_docs)."""
        if self._writer is None:
            path = self.directory / f"{self.prefix}-{self.first + self.shards:05d}.parquet"
            self._writer = pq.ParquetWriter(path, SCHEMA)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self._rows_in_shard += table.num_rows
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


# --- the work directory: what tasks hand to each other ---------------------------------------


@dataclass(frozen=True)
class WorkDir:
    root: Path

    def candidates(self, task: int) -> Path:
        return self.root / "candidates" / f"{task:05d}.parquet"

    def signatures(self, task: int) -> Path:
        return self.root / "signatures" / f"{task:05d}.u32"

    def records(self, task: int, partition: int) -> Path:
        return self.root / "records" / f"{task:05d}-{partition:05d}.bin"

    def judge_report(self, task: int) -> Path:
        return self.root / "reports" / f"judge-{task:05d}.json"

    def write_report(self, task: int) -> Path:
        return self.root / "reports" / f"write-{task:05d}.json"

    def exact(self, partition: int) -> Path:
        return self.root / "dedup" / f"exact-{partition:05d}.npy"

    def pairs(self, partition: int) -> Path:
        return self.root / "dedup" / f"pairs-{partition:05d}.npy"

    @property
    def dropped(self) -> Path:
        return self.root / "dedup" / "dropped.npz"

    def logs(self, step: str) -> Path:
        return self.root / "logs" / step

    def make(self) -> None:
        for sub in ("candidates", "signatures", "records", "reports", "dedup", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)


def assign_units(units: list[InputUnit], tasks: int) -> list[list[InputUnit]]:
    """Contiguous runs of units, one per task, of about equal weight: task order is corpus
    order, so concatenating the tasks' outputs gives the corpus in order."""
    total = sum(u.weight for u in units) or 1
    runs: list[list[InputUnit]] = [[] for _ in range(tasks)]
    before = 0
    for unit in units:
        runs[min(tasks - 1, before * tasks // total)].append(unit)
        before += unit.weight
    return runs


# --- step 1: judge ---------------------------------------------------------------------------


class JudgeStep(PipelineStep):
    """Read, repair and judge a task's units; write the documents that pass as candidates,
    with their dedup records (one file per partition) and MinHash signatures."""

    name = "judge"
    type = "lmpipe.clean"

    def __init__(self, data: DataConfig, cfg: CleanConfig, work: WorkDir, runs: list) -> None:
        super().__init__()
        self.data, self.cfg, self.work, self.runs = data, cfg, work, runs

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        report = judge_units(self.runs[rank], self.data, self.cfg, self.work, rank, world_size)
        self.stat_update("documents", value=report.docs_in)
        self.stat_update("candidates", value=report.docs_in - sum(report.dropped.values()))


def judge_units(
    units: list[InputUnit],
    data: DataConfig,
    cfg: CleanConfig,
    work: WorkDir,
    task: int,
    partitions: int,
) -> CleanReport:
    document_filter = DocumentFilter(cfg)
    report = CleanReport()
    shape = dedup.lsh_shape(cfg.dedup)
    near, exact = cfg.dedup.near, cfg.dedup.exact
    candidates = ShardWriter(work.candidates(task).parent, 2**31, prefix=f"{task:05d}")
    records = [work.records(task, p).open("wb") for p in range(partitions)]
    signatures = work.signatures(task).open("wb")
    # UTF-8 needs at most 4 bytes per character: larger inputs cannot pass max_chars.
    max_bytes = 4 * cfg.quality.max_chars if cfg.quality.max_chars is not None else None
    row = 0
    pending: list[np.ndarray] = []  # records not yet written to their partitions
    try:
        for unit in units:
            digest = hashlib.md5(usedforsecurity=False)
            for doc in unit_documents(unit, data, max_bytes):
                update_raw_digest(digest, doc)
                report.docs_in += 1
                report.per_source_in[doc.source] += 1
                if doc.problem is not None:
                    report.dropped[doc.problem] += 1
                    report.sample(doc.problem, doc.id, doc.text, cfg.dropped_sample_size)
                    continue
                report.chars_in += len(doc.text)
                report.length_in[length_bin(len(doc.text))] += 1
                report.repaired["encoding"] += doc.repaired_encoding
                result = document_filter(doc.text)
                report.repaired.update(result.repairs)
                if result.reason is not None:
                    report.dropped[result.reason] += 1
                    report.sample(result.reason, doc.id, doc.text, cfg.dropped_sample_size)
                    continue
                candidates.add(Document(doc.id, doc.source, result.text))
                if near or exact:
                    signature = dedup.minhash_signature(result.text, cfg.dedup) if near else None
                    key = dedup.exact_key(result.text) if exact else b""
                    pending.append(dedup.dedup_records(signature, key, row, task, shape))
                    if signature is not None:
                        signatures.write(signature.tobytes())
                    if len(pending) >= RECORD_BATCH:
                        _write_records(pending, records)
                row += 1
            report.unit_digests.append((_unit_source(unit), digest.hexdigest()))
        _write_records(pending, records)
    finally:
        candidates.flush()
        signatures.close()
        for handle in records:
            handle.close()
    # the candidates are one file per task (an empty task writes an empty one)
    written = work.candidates(task).parent / f"{task:05d}-00000.parquet"
    if written.exists():
        written.replace(work.candidates(task))
    else:
        pq.write_table(SCHEMA.empty_table(), work.candidates(task))
    report.save(work.judge_report(task))
    return report


def update_raw_digest(digest: Any, doc: Document) -> None:
    """Add a document as read (id and raw text, boundaries marked) to its unit's md5."""
    digest.update(f"{doc.id}\0{doc.text}\0".encode("utf-8", "surrogatepass"))


def _write_records(pending: list[np.ndarray], partitions: list[BinaryIO]) -> None:
    """Append the pending records to their partitions' files (by band hash) and clear them."""
    if not pending:
        return
    batch = np.concatenate(pending)
    pending.clear()
    which = batch["band"] % np.uint64(len(partitions))
    for index, handle in enumerate(partitions):
        handle.write(batch[which == index].tobytes())


def _unit_source(unit: InputUnit) -> str:
    return (
        unit.name
        if unit.kind == "embedded"
        else "local"
        if unit.kind == "local"
        else f"hf:{unit.name}"
    )


# --- step 2: dedup ---------------------------------------------------------------------------


class DedupStep(PipelineStep):
    """One hash partition of every task's records: exact duplicates and confirmed near pairs."""

    name = "dedup"
    type = "lmpipe.clean"

    def __init__(self, cfg: CleanConfig, work: WorkDir, tasks: int) -> None:
        super().__init__()
        self.cfg, self.work, self.tasks = cfg, work, tasks

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        parts = [
            np.fromfile(self.work.records(t, rank), dtype=dedup.RECORD) for t in range(self.tasks)
        ]
        records = np.concatenate(parts) if parts else np.zeros(0, dedup.RECORD)
        store = None
        if self.cfg.dedup.near:
            files = {t: self.work.signatures(t) for t in range(self.tasks)}
            store = dedup.SignatureStore(files, self.cfg.dedup.num_perm)
        exact, pairs = [np.zeros(0, np.uint64)], [np.zeros(0, dedup.PAIR)]
        for group in dedup.candidate_groups(records):
            found_exact, found_pairs = dedup.confirmed_pairs(group, store, self.cfg.dedup.threshold)
            exact.append(found_exact)
            pairs.append(found_pairs)
        if store is not None:
            store.close()
        self.stat_update("records", value=len(records))
        np.save(self.work.exact(rank), np.unique(np.concatenate(exact)))
        np.save(self.work.pairs(rank), np.unique(np.concatenate(pairs)))


def decide_drops(work: WorkDir, partitions: int) -> int:
    """Merge the partitions' findings into one decision per document (dropped.npz);
    returns the number of near-duplicate clusters."""
    exact = np.concatenate([np.load(work.exact(p)) for p in range(partitions)])
    pairs = np.concatenate([np.load(work.pairs(p)) for p in range(partitions)])
    exact, near, clusters = dedup.decide(exact, pairs)
    np.savez(work.dropped, exact=exact, near=near)
    return clusters


# --- step 3: write ---------------------------------------------------------------------------


class WriteStep(PipelineStep):
    """A task's kept candidates, as part files numbered after the previous tasks' parts."""

    name = "write"
    type = "lmpipe.clean"

    def __init__(
        self, cfg: CleanConfig, work: WorkDir, out_dir: Path, first_parts: list[int]
    ) -> None:
        super().__init__()
        self.cfg, self.work, self.out_dir, self.first_parts = cfg, work, out_dir, first_parts

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        dropped = _task_drops(self.work, rank)
        writer = ShardWriter(self.out_dir, self.cfg.shard_docs, first=self.first_parts[rank])
        report = CleanReport()
        row = 0
        # Arrow batches filtered as a whole: no Python object per kept document
        for batch in pq.ParquetFile(self.work.candidates(rank)).iter_batches(batch_size=1024):
            rows = np.arange(row, row + batch.num_rows)
            row += batch.num_rows
            drop = np.isin(rows, dropped.rows)
            for index in np.flatnonzero(drop).tolist():
                reason = dropped.reasons[int(rows[index])]
                report.dropped[reason] += 1
                doc_id, text = batch.column("id")[index].as_py(), batch.column("text")[index]
                report.sample(reason, doc_id, text.as_py(), self.cfg.dropped_sample_size)
            kept = pa.Table.from_batches([batch]).filter(pa.array(~drop))
            lengths = pc.utf8_length(kept.column("text")).to_numpy(zero_copy_only=False)
            report.docs_out += kept.num_rows
            report.chars_out += int(lengths.sum())
            report.length_out.update(_length_bins(lengths))
            sources = pc.value_counts(kept.column("source")).to_pylist()
            report.per_source_out.update({s["values"]: s["counts"] for s in sources})
            writer.add_table(kept)
        writer.flush()
        report.save(self.work.write_report(rank))
        self.stat_update("kept", value=report.docs_out)


@dataclass
class TaskDrops:
    rows: np.ndarray  # the task's dropped candidate rows, sorted
    reasons: dict[int, str]


def _task_drops(work: WorkDir, task: int) -> TaskDrops:
    """The task's dropped candidates (the duplicates only: few) and why."""
    reasons: dict[int, str] = {}
    with np.load(work.dropped) as decided:
        for key, reason in (("exact", dedup.DUPLICATE), ("near", dedup.NEAR_DUPLICATE)):
            tasks, rows = dedup.split_ordinals(decided[key])
            reasons.update(dict.fromkeys(rows[tasks == task].tolist(), reason))
    return TaskDrops(np.array(sorted(reasons), dtype=np.int64), reasons)


def _length_bins(lengths: np.ndarray) -> Counter[int]:
    """`length_bin` of many lengths at once."""
    bins = np.zeros(len(lengths), dtype=np.int64)
    positive = lengths > 0
    bins[positive] = np.minimum(np.floor(np.log2(lengths[positive])), LENGTH_BINS - 1)
    values, counts = np.unique(bins, return_counts=True)
    return Counter(dict(zip(values.tolist(), counts.tolist(), strict=True)))


# --- the pipeline --------------------------------------------------------------------------


def as_dataclass(cfg: Any) -> Any:
    """The config's plain dataclass (cheap to pickle for task processes), from a node."""
    return OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg


# Settings that change how the work runs, never what it produces.
ENGINE_KEYS = ("executor", "workers", "slurm")


def work_fingerprint(data: DataConfig, cfg: CleanConfig, units: list[InputUnit]) -> str:
    """What the tasks' files depend on: config (less the engine's settings) and the inputs
    (local files by size and modification time)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ENGINE_KEYS}
    inputs = []
    for unit in units:
        path = Path(unit.name)
        stamp = (
            path.stat().st_mtime_ns if unit.kind == "local" and unit.name and path.exists() else 0
        )
        inputs.append([unit.kind, unit.name, unit.weight, stamp])
    blob = json.dumps([WORK_FORMAT, asdict(data), settings, inputs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def clean_corpus(
    data: DataConfig | DictConfig, cfg: CleanConfig | DictConfig, out_dir: Path
) -> CleanReport:
    """Read the configured sources, repair, filter and deduplicate, write shards to out_dir.
    Intermediate files live in `.work-<fingerprint>` beside out_dir until the end: a run
    interrupted after some tasks completed resumes there."""
    cfg, data = as_dataclass(cfg), as_dataclass(data)
    check_settings(cfg)
    if cfg.shards < 1:
        raise ValueError(f"clean.shards={cfg.shards}: needs at least 1")
    DocumentFilter(cfg)  # a bad blocklist fails before any task starts
    units = input_units(data)  # a missing path or unknown source too
    tasks = cfg.shards
    work = WorkDir(out_dir.parent / f".work-{work_fingerprint(data, cfg, units)}")
    work.make()
    runs = assign_units(units, tasks)
    # the embedded packages are a few MB; local files are weighed by their size
    inline = data.kind == "embedded" or sum(u.weight for u in units) < INLINE_BYTES
    judge = JudgeStep(data, cfg, work, runs)
    run_step("clean/judge", [judge], tasks, cfg, work.logs("judge"), inline=inline)
    dedup_step = DedupStep(cfg, work, tasks)
    run_step("clean/dedup", [dedup_step], tasks, cfg, work.logs("dedup"), inline=inline)
    clusters = decide_drops(work, tasks)
    report = CleanReport()
    for task in range(tasks):
        report.merge(CleanReport.load(work.judge_report(task)), cfg.dropped_sample_size)
    first_parts = _first_parts(work, tasks, cfg.shard_docs)
    # the write step's completions belong to this output directory only
    write_logs = work.logs(f"write-{out_dir.name}")
    write = WriteStep(cfg, work, out_dir, first_parts)
    run_step("clean/write", [write], tasks, cfg, write_logs, inline=inline)
    for task in range(tasks):
        report.merge(CleanReport.load(work.write_report(task)), cfg.dropped_sample_size)
    report.near_duplicate_clusters = clusters
    if report.docs_in == 0:
        raise ValueError("clean found no document in the configured source: check data.*")
    if report.docs_out == 0:
        raise ValueError(
            f"clean kept no document out of {report.docs_in} (dropped: {dict(report.dropped)}):"
            " check data.* and clean.*"
        )
    for stale in out_dir.parent.glob(".work-*"):
        shutil.rmtree(stale, ignore_errors=True)
    log.info(
        "clean: %d -> %d documents, %.1f -> %.1f M chars; dropped %s",
        report.docs_in,
        report.docs_out,
        report.chars_in / 1e6,
        report.chars_out / 1e6,
        dict(report.dropped),
    )
    return report


def _first_parts(work: WorkDir, tasks: int, shard_docs: int) -> list[int]:
    """Number of the first part file of each task: the corpus is numbered continuously."""
    with np.load(work.dropped) as decided:
        dropped_tasks = np.concatenate(
            [dedup.split_ordinals(decided[k])[0] for k in ("exact", "near")]
        )
    counts = (
        np.bincount(dropped_tasks, minlength=tasks) if dropped_tasks.size else np.zeros(tasks, int)
    )
    first, parts = [], 0
    for task in range(tasks):
        first.append(parts)
        kept = pq.ParquetFile(work.candidates(task)).metadata.num_rows - int(counts[task])
        parts += math.ceil(kept / shard_docs)
    return first


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
