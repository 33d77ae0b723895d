"""Repairs, quality rules, blocklist and deduplication, one rule at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmpipe.data.dedup import exact_key, find_duplicates, minhash_signature
from lmpipe.data.filters import (
    DocumentFilter,
    fix_overstrike,
    load_blocklist,
    quality_reason,
    repair,
    strip_control,
    strip_markup,
)
from lmpipe.runs.config import BlocklistConfig, CleanConfig, DedupConfig, QualityConfig
from tests.conftest import PROSE


def test_overstrikes_become_plain_text() -> None:
    assert fix_overstrike("_\bH_\bi") == "Hi"
    assert fix_overstrike("B\bBo\bol\bld\bd") == "Bold"
    assert fix_overstrike("\bstray") == "stray"


def test_control_characters_are_stripped_but_layout_kept() -> None:
    assert strip_control("a\x00b\x1bc\r\nd\te\x7f") == "abc\nd\te"


def test_markup_is_stripped_with_entities_and_scripts() -> None:
    html = "<html><script>var x = 1;</script><p>Fish &amp; chips</p><div>caf&eacute;</div>"
    assert strip_markup(html).split() == ["Fish", "&", "chips", "café"]
    assert strip_markup("a < b and c > d") == "a < b and c > d"  # not markup: untouched


def test_repair_reports_what_it_changed() -> None:
    cfg = CleanConfig(strip_markup=True)
    text, fired = repair("B\bBold\x00 <b>text</b> \ufffd", cfg)
    assert text == "Bold text"
    assert fired == {"overstrike", "control", "markup", "replacement_char"}
    assert repair("cafe\u0301", CleanConfig(normalize="NFC")) == ("caf\u00e9", set())
    assert repair("cafe\u0301", CleanConfig(normalize=None))[0] == "cafe\u0301"


@pytest.mark.parametrize(
    ("text", "settings", "reason"),
    [
        ("", {}, "empty"),
        ("short", {"min_chars": 10}, "too_short"),
        ("x" * 100, {"max_chars": 50}, "too_long"),
        ("two words", {"min_words": 3}, "too_few_words"),
        ("one two three four", {"max_words": 3}, "too_many_words"),
        ("a b c d e f g h i j", {"min_mean_word_length": 3}, "mean_word_length"),
        ("x" * 40 + " " + "y" * 40, {"max_mean_word_length": 12}, "mean_word_length"),
        ("#tag #tag2 #tag3 some words", {"max_symbol_word_ratio": 0.1}, "symbol_ratio"),
        ("12 34 56 78 words", {"min_alpha_word_fraction": 0.8}, "alpha_words"),
        (
            "same line\nsame line\nsame line\nother",
            {"max_duplicate_line_fraction": 0.3},
            "duplicate_lines",
        ),
        ("buy now " * 20, {"max_top_ngram_fraction": {"2": 0.2}}, "top_ngram"),
        (PROSE + " " + PROSE, {"max_duplicate_ngram_fraction": {"5": 0.15}}, "duplicate_ngrams"),
        (
            PROSE,
            {
                "min_words": 5,
                "max_top_ngram_fraction": {"2": 0.2},
                "max_duplicate_ngram_fraction": {"5": 0.15},
                "min_alpha_word_fraction": 0.8,
                "max_symbol_word_ratio": 0.1,
                "max_duplicate_line_fraction": 0.3,
            },
            None,
        ),
    ],
)
def test_quality_rules(text: str, settings: dict, reason: str | None) -> None:
    base = {"min_chars": None, "max_chars": None}
    assert quality_reason(text, QualityConfig(**{**base, **settings})) == reason


def test_repetition_rules_skip_short_documents() -> None:
    q = QualityConfig(max_top_ngram_fraction={"2": 0.2}, repetition_min_words=50)
    assert quality_reason("buy now " * 20, q) is None
    assert quality_reason("buy now " * 30, q) == "top_ngram"


def test_blocklist_matches_whole_words_case_insensitively(tmp_path: Path) -> None:
    listing = tmp_path / "block.txt"
    listing.write_text("# spam words\nviagra\ncheap pills  # phrase\n")
    cfg = CleanConfig(blocklist=BlocklistConfig(words=["casino"], file=str(listing)))
    judge = DocumentFilter(cfg)
    assert load_blocklist(cfg.blocklist) == ["casino", "viagra", "cheap pills"]
    assert judge(PROSE + " Buy CHEAP pills here.").reason == "blocklist"
    assert judge(PROSE + " The Casino.").reason == "blocklist"
    assert judge(PROSE + " Casinos and cheapness.").reason is None  # whole words only
    tolerant = DocumentFilter(CleanConfig(blocklist=BlocklistConfig(words=["casino"], max_hits=1)))
    assert tolerant(PROSE + " casino").reason is None
    assert tolerant(PROSE + " casino casino").reason == "blocklist"


def test_missing_blocklist_file_is_named(tmp_path: Path) -> None:
    cfg = CleanConfig(blocklist=BlocklistConfig(file=str(tmp_path / "nope.txt")))
    with pytest.raises(FileNotFoundError, match=r"clean\.blocklist\.file.*nope\.txt"):
        DocumentFilter(cfg)


def test_exact_dedup_ignores_case_and_spacing() -> None:
    assert exact_key("Hello   World") == exact_key("hello world")
    assert exact_key("hello there") != exact_key("hello world")
    cfg = DedupConfig(near=False)
    reasons, _ = find_duplicates(["Hello   World", "hello world", "hello there"], cfg)
    assert reasons == [None, "duplicate", None]


def _jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(t: str) -> set[tuple[str, ...]]:
        w = t.lower().replace(",", "").replace(".", "").split()
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


def test_minhash_estimates_jaccard() -> None:
    cfg = DedupConfig(num_perm=256)
    edited = PROSE.replace("Tuesday", "Friday").replace("spring", "autumn")
    estimate = float(np.mean(minhash_signature(PROSE, cfg) == minhash_signature(edited, cfg)))
    assert estimate == pytest.approx(_jaccard(PROSE, edited), abs=0.12)
    assert minhash_signature(PROSE, cfg).dtype == np.uint32


def test_near_dedup_drops_edited_copies_keeps_distinct_text() -> None:
    cfg = DedupConfig(threshold=0.7)
    other = (
        "Rain is expected across the northern valleys tonight, with snow on the higher passes "
        "and strong winds along the coast until Thursday morning at the earliest."
    )
    text = PROSE + " " + other
    one_word_changed = text.replace("library", "museum")
    assert _jaccard(text, one_word_changed) > 0.8
    texts = [text, PROSE.replace("budget", "plan"), one_word_changed, text.upper()]
    reasons, clusters = find_duplicates(texts, cfg)
    # the upper-cased copy is an exact copy (case and spacing are folded)
    assert reasons == [None, None, "near_duplicate", "duplicate"]
    assert clusters == 1


def test_near_dedup_threshold_is_respected() -> None:
    # about half the 5-grams shared: a duplicate at 0.3, distinct at 0.8
    half = PROSE[: len(PROSE) // 2] + " completely different words follow here now " * 3
    similarity = _jaccard(PROSE, half)
    assert 0.3 < similarity < 0.8
    for threshold, expected in ((0.3, "near_duplicate"), (0.8, None)):
        reasons, _ = find_duplicates([PROSE, half], DedupConfig(threshold=threshold))
        assert reasons == [None, expected]
