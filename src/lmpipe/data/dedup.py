"""Deduplication: exact (digest of normalised text) and near (MinHash + LSH, datasketch).

Signatures are computed where documents are filtered (in the worker processes); the
decisions are made in one place, in corpus order, so the first copy of a text is the one
kept and the outcome does not depend on the number of workers.
"""

from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from lmpipe.runs.config import DedupConfig

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_SCHEME = "affine32"
# FNV-style odd multiplier to fold word hashes into n-gram hashes with numpy.
_MIX = np.uint64(1099511628211)
_LOW32 = np.uint64(0xFFFFFFFF)
# (false positive, false negative) weights for choosing LSH bands. Candidates are confirmed
# on full signatures, so a false positive only costs a comparison while a false negative
# keeps a duplicate: favour recall (at threshold 0.8: 87% of pairs found at the threshold,
# 97% at 0.85, against 40% and 69% with datasketch's equal weights).
LSH_WEIGHTS = (0.1, 0.9)


def exact_key(text: str) -> bytes:
    """Whitespace- and case-insensitive digest: reflowed copies count as the same text."""
    return hashlib.blake2b(_SPACE.sub(" ", text).strip().lower().encode(), digest_size=16).digest()


class ExactDeduplicator:
    """Remembers 16-byte digests, so memory grows with unique documents, not their size."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def seen_key(self, key: bytes) -> bool:
        """True if `key` was seen before; remembers it either way."""
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """32-bit hashes of the text's lower-cased word n-grams (the whole text if shorter)."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.fromiter(
        (xxhash.xxh32_intdigest(w.encode()) for w in words), dtype=np.uint64, count=len(words)
    )
    n = min(ngram, len(hashes))
    grams = np.zeros(len(hashes) - n + 1, dtype=np.uint64)
    for i in range(n):  # wraps mod 2**64 on purpose: a rolling hash, not arithmetic
        grams = grams * _MIX + hashes[i : len(hashes) - n + 1 + i]
    return np.unique(grams & _LOW32)


@functools.lru_cache(maxsize=4)
def _empty_minhash(num_perm: int, seed: int) -> MinHash:
    # Drawing the permutations costs ~125 us, a quarter of a signature: do it once, then copy.
    return MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme=_SCHEME)


def minhash_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """The document's MinHash signature (num_perm uint32 values)."""
    minhash = _empty_minhash(cfg.num_perm, cfg.seed).copy()
    shingles = shingle_hashes(text, cfg.ngram)
    if shingles.size:
        minhash.update_batch(shingles.tolist())
    return np.asarray(minhash.hashvalues, dtype=np.uint32)


class NearDeduplicator:
    """Keeps the first of every group of documents whose estimated Jaccard similarity is at
    least `threshold`.

    LSH banding: datasketch chooses the bands (b) and rows per band (r) for the threshold;
    a kept document's signature is cut into b bands, and a new document is a candidate
    near-copy of every kept one that shares a band. Each candidate is confirmed on the full
    signatures, so LSH's false positives are never dropped. The band tables are plain
    dicts from a 64-bit band hash to the kept document's row, about 1.5 KB per kept
    document with the signature copy, against about 5 KB in datasketch's MinHashLSH (which
    keeps a set per bucket and a per-key band list): that is what lets a gigabyte of text be
    deduplicated within the stage's memory budget.
    """

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        banding = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
        self.bands, self.rows = banding.b, banding.r
        self._tables: list[dict[int, int | tuple[int, ...]]] = [{} for _ in range(self.bands)]
        self._signatures = np.zeros((1024, cfg.num_perm), dtype=np.uint32)
        self._count = 0
        self.clusters: set[int] = set()  # kept documents that absorbed at least one near copy

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature[: self.bands * self.rows].reshape(self.bands, self.rows)
        return [xxhash.xxh3_64_intdigest(band.tobytes()) for band in bands]

    def is_duplicate(self, signature: np.ndarray) -> bool:
        """True if a kept document is this similar; otherwise remembers this one as kept."""
        keys = self._band_keys(signature)
        candidates: set[int] = set()
        for table, key in zip(self._tables, keys, strict=True):
            hit = table.get(key)
            if hit is not None:
                candidates.update(hit if isinstance(hit, tuple) else (hit,))
        for candidate in sorted(candidates):
            similarity = float(np.mean(self._signatures[candidate] == signature))
            if similarity >= self.cfg.threshold:
                self.clusters.add(candidate)
                return True
        if self._count == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.zeros_like(self._signatures)])
        row = self._count
        self._signatures[row] = signature
        for table, key in zip(self._tables, keys, strict=True):
            hit = table.get(key)
            table[key] = row if hit is None else (*(hit if isinstance(hit, tuple) else (hit,)), row)
        self._count += 1
        return False
