"""Text repairs and document-level quality rules for the clean stage.

Repairs change text (overstrikes, control characters, markup, Unicode form) and say which
repairs fired; rules decide to keep or drop a document and name the rule that dropped it,
so every drop is counted per rule. The repetition and word rules follow the heuristics of
large-corpus pipelines (Gopher, as in datatrove/dolma); every threshold is configurable and
null switches a rule off.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from lmpipe.runs.config import BlocklistConfig, CleanConfig, QualityConfig

# nroff bold/underline: "c\bc" and "_\bc" render as c. Applied repeatedly for stacked marks.
_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")
# C0 and C1 controls and DEL, except tab and newline; \r is folded into \n first.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# A cheap pre-check so plain text never goes through the HTML parser.
_MARKUP_HINT = re.compile(r"<[A-Za-z!/][^<>]*>|&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")
_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
_SYMBOLS = re.compile(r"#|\.\.\.|…")

REPAIRS = ("overstrike", "control", "markup", "replacement_char")


def fix_overstrike(text: str) -> str:
    while "\x08" in text:
        fixed = _OVERSTRIKE.sub("", text)
        if fixed == text:  # a backspace with nothing before it
            return text.replace("\x08", "")
        text = fixed
    return text


def _strip_control_counted(text: str) -> tuple[str, int]:
    return _CONTROL.subn("", text.replace("\r\n", "\n").replace("\r", "\n"))


def strip_control(text: str) -> str:
    return _strip_control_counted(text)[0]


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML/XML fragment, without script/style bodies."""

    _SKIP = frozenset({"script", "style", "noscript", "template"})
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def strip_markup(text: str) -> str:
    """HTML/XML tags removed and entities decoded (stdlib html.parser: tolerant of bad markup)."""
    if not _MARKUP_HINT.search(text):
        return text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return re.sub(r"\n{3,}", "\n\n", "".join(parser.parts))


def repair(text: str, cfg: CleanConfig) -> tuple[str, set[str]]:
    """Normalised, stripped text and the repairs that changed it. Order matters: overstrikes
    need the backspaces that control stripping removes."""
    fired: set[str] = set()
    if "\ufffd" in text:  # bytes that were not valid UTF-8, already replaced while decoding
        text = text.replace("\ufffd", "")
        fired.add("replacement_char")
    if cfg.fix_overstrike and "\x08" in text:
        text = fix_overstrike(text)
        fired.add("overstrike")
    if cfg.strip_control:
        text, removed = _strip_control_counted(text)
        if removed:
            fired.add("control")
    if cfg.strip_markup:
        stripped = strip_markup(text)
        if stripped != text:
            fired.add("markup")
        text = stripped
    if cfg.normalize:
        text = unicodedata.normalize(cfg.normalize, text)
    return text.strip(), fired


# --- quality rules -------------------------------------------------------------------------


def _ngram_char_fractions(words: list[str], lengths: np.ndarray, n: int) -> tuple[float, float]:
    """(share of characters in the most frequent n-gram's occurrences, share of characters
    covered by n-grams that occur more than once), both over all word characters."""
    if len(words) < n:
        return 0.0, 0.0
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))
    counts = Counter(grams)
    total = float(lengths.sum()) or 1.0
    top_gram, top_count = counts.most_common(1)[0]
    top = sum(len(w) for w in top_gram) * top_count / total if top_count > 1 else 0.0
    if top_count == 1:
        return top, 0.0
    covered = np.zeros(len(words), dtype=bool)
    for start, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[start : start + n] = True
    return top, float(lengths[covered].sum()) / total


def _duplicate_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def quality_reason(text: str, q: QualityConfig) -> str | None:
    """The first quality rule this (repaired) text breaks, or None."""
    if not text:
        return "empty"
    if q.min_chars is not None and len(text) < q.min_chars:
        return "too_short"
    if q.max_chars is not None and len(text) > q.max_chars:
        return "too_long"
    words = _WORD.findall(text)
    n_words = len(words)
    if q.min_words is not None and n_words < q.min_words:
        return "too_few_words"
    if q.max_words is not None and n_words > q.max_words:
        return "too_many_words"
    if n_words == 0:
        return "too_few_words"
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=n_words)
    mean_length = float(lengths.mean())
    if q.min_mean_word_length is not None and mean_length < q.min_mean_word_length:
        return "mean_word_length"
    if q.max_mean_word_length is not None and mean_length > q.max_mean_word_length:
        return "mean_word_length"
    if (
        q.max_symbol_word_ratio is not None
        and len(_SYMBOLS.findall(text)) / n_words > q.max_symbol_word_ratio
    ):
        return "symbol_ratio"
    if q.min_alpha_word_fraction is not None:
        alpha = sum(1 for w in words if _ALPHA.search(w))
        if alpha / n_words < q.min_alpha_word_fraction:
            return "alpha_words"
    if n_words < q.repetition_min_words:
        return None
    if (
        q.max_duplicate_line_fraction is not None
        and _duplicate_line_fraction(text) > q.max_duplicate_line_fraction
    ):
        return "duplicate_lines"
    if q.max_top_ngram_fraction or q.max_duplicate_ngram_fraction:
        lowered = [w.lower() for w in words]
        sizes = {int(n) for n in (*q.max_top_ngram_fraction, *q.max_duplicate_ngram_fraction)}
        for n in sorted(sizes):
            top, duplicated = _ngram_char_fractions(lowered, lengths, n)
            top_max = q.max_top_ngram_fraction.get(str(n))
            if top_max is not None and top > top_max:
                return "top_ngram"
            dup_max = q.max_duplicate_ngram_fraction.get(str(n))
            if dup_max is not None and duplicated > dup_max:
                return "duplicate_ngrams"
    return None


QUALITY_RULES = (
    "empty",
    "too_short",
    "too_long",
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "symbol_ratio",
    "alpha_words",
    "duplicate_lines",
    "top_ngram",
    "duplicate_ngrams",
)


# --- blocklist -----------------------------------------------------------------------------


def load_blocklist(cfg: BlocklistConfig) -> list[str]:
    """Configured words plus the lines of `file` ('#' starts a comment); a missing file is an
    error naming it."""
    words = [w.strip() for w in cfg.words if w.strip()]
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise FileNotFoundError(f"clean.blocklist.file: '{path}' does not exist")
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = line.split("#", 1)[0].strip()
            if entry:
                words.append(entry)
    return words


def blocklist_pattern(words: list[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex matching any entry as a whole word or phrase."""
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


@dataclass
class FilterResult:
    text: str
    reason: str | None
    repairs: set[str]


class DocumentFilter:
    """Repairs then judges one document: quality rules first, then the blocklist."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.blocklist = blocklist_pattern(load_blocklist(cfg.blocklist))

    def __call__(self, raw: str) -> FilterResult:
        text, repairs = repair(raw, self.cfg)
        reason = quality_reason(text, self.cfg.quality)
        if reason is None and self.blocklist is not None:
            for hits, _ in enumerate(self.blocklist.finditer(text), 1):
                if hits > self.cfg.blocklist.max_hits:
                    reason = "blocklist"
                    break
        return FilterResult(text, reason, repairs)
