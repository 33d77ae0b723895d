"""Deduplication. Exact: a document whose normalised text was already seen is dropped."""

from __future__ import annotations

import hashlib
import re

_SPACE = re.compile(r"\s+")


def exact_key(text: str) -> bytes:
    """Whitespace- and case-insensitive digest: reflowed copies count as the same text."""
    return hashlib.blake2b(_SPACE.sub(" ", text).strip().lower().encode(), digest_size=16).digest()


class ExactDeduplicator:
    """Remembers 16-byte digests, so memory grows with unique documents, not their size."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        key = exact_key(text)
        if key in self._seen:
            return True
        self._seen.add(key)
        return False
