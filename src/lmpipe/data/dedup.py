"""Deduplication: exact (digest of normalised text) and near (MinHash + LSH, datasketch).

In the clean stage the work is out of core and split into tasks (`lmpipe.data.corpus`):

1. each input task signs its documents and writes, per document, one record per LSH band
   (band hash, ordinal, exact key) into hash partitions on disk, and its full signatures
   to a memory-mapped file;
2. each partition task sorts its records; documents that share a band hash are candidates:
   all but the first of an exact key are exact duplicates, and each candidate pair of the
   others is confirmed on the full signatures (`confirmed_pairs`);
3. one pass over the confirmed pairs, in corpus order, drops every document that has an
   earlier kept near copy (`decide`).

Exact copies share every band (equal word n-grams give equal signatures), so step 2 sees
all copies of a text together. Memory grows with the duplicates, never with the corpus,
and the result is the same as judging the documents one by one in corpus order, keeping
the first copy: independent of the number of tasks, workers and partitions.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from lmpipe.runs.config import DedupConfig

if TYPE_CHECKING:  # datasketch (0.3 s) only where deduplication runs, not at every stage's start
    from datasketch import MinHash

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_SCHEME = "affine32"
# Why a document is dropped, as decided here.
DUPLICATE, NEAR_DUPLICATE = "duplicate", "near_duplicate"
# FNV-style odd multiplier to fold word hashes into n-gram hashes with numpy.
_MIX = np.uint64(1099511628211)
_LOW32 = np.uint64(0xFFFFFFFF)
# (false positive, false negative) weights for choosing LSH bands. Candidates are confirmed
# on full signatures, so a false positive only costs a comparison while a false negative
# keeps a duplicate: favour recall (at threshold 0.8: 87% of pairs found at the threshold,
# 97% at 0.85, against 40% and 69% with datasketch's equal weights).
LSH_WEIGHTS = (0.1, 0.9)


# One record per (document, band): the band's hash, the document's ordinal (task << 32 |
# row: corpus order) and its exact key folded to 64 bits.
RECORD = np.dtype([("band", "<u8"), ("ordinal", "<u8"), ("key", "<u8")])
# Pairs (earlier, later) of documents confirmed to be near copies.
PAIR = np.dtype([("a", "<u8"), ("b", "<u8")])
# Rows of the similarity matrix computed at once inside a large candidate group.
_CONFIRM_ROWS = 64


def exact_key(text: str) -> bytes:
    """Whitespace- and case-insensitive digest: reflowed copies count as the same text."""
    return hashlib.blake2b(_SPACE.sub(" ", text).strip().lower().encode(), digest_size=16).digest()


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
    from datasketch import MinHash

    # Drawing the permutations costs ~125 us, a quarter of a signature: do it once, then copy.
    return MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme=_SCHEME)


def minhash_signature(text: str, cfg: DedupConfig) -> np.ndarray:
    """The document's MinHash signature (num_perm uint32 values)."""
    minhash = _empty_minhash(cfg.num_perm, cfg.seed).copy()
    shingles = shingle_hashes(text, cfg.ngram)
    if shingles.size:
        minhash.update_batch(shingles.tolist())
    return np.asarray(minhash.hashvalues, dtype=np.uint32)


def lsh_shape(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band) that datasketch chooses for the threshold, weighted to recall."""
    from datasketch import MinHashLSH

    banding = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
    return banding.b, banding.r


def band_hashes(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """64-bit hash of each band; the band's index seeds it, so bands never collide."""
    cut = signature[: bands * rows].reshape(bands, rows)
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(band.tobytes(), seed=i) for i, band in enumerate(cut)),
        dtype=np.uint64,
        count=bands,
    )


def key_hash(key: bytes) -> int:
    return int.from_bytes(key[:8], "little")


def ordinal(task: int, row: int) -> int:
    return (task << 32) | row


def split_ordinals(ordinals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(task, row) arrays of ordinals."""
    ordinals = ordinals.astype(np.uint64)
    return (ordinals >> np.uint64(32)).astype(np.int64), (ordinals & _LOW32).astype(np.int64)


class SignatureStore:
    """The full signatures of every task's candidates, on disk: each lookup reads its row
    (not memory-mapped, so the rows read do not stay resident in the process)."""

    def __init__(self, files: dict[int, Path], num_perm: int) -> None:
        self.row_bytes = num_perm * 4
        self._files = {task: path.open("rb") for task, path in files.items()}

    def get(self, ordinals: np.ndarray) -> np.ndarray:
        tasks, rows = split_ordinals(ordinals)
        out = np.empty((len(ordinals), self.row_bytes // 4), dtype=np.uint32)
        for i, (task, row) in enumerate(zip(tasks.tolist(), rows.tolist(), strict=True)):
            raw = os.pread(self._files[task].fileno(), self.row_bytes, row * self.row_bytes)
            out[i] = np.frombuffer(raw, dtype=np.uint32)
        return out

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def candidate_groups(records: np.ndarray) -> list[np.ndarray]:
    """Records sorted by (band, ordinal), cut into the groups of two or more that share a
    band hash."""
    records = records[np.lexsort((records["ordinal"], records["band"]))]
    bands = records["band"]
    starts = np.flatnonzero(np.concatenate([[True], bands[1:] != bands[:-1], [True]]))
    return [records[a:b] for a, b in itertools.pairwise(starts) if b - a > 1]


def confirmed_pairs(
    group: np.ndarray, signatures: SignatureStore | None, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(exact duplicates, confirmed near pairs) in one candidate group sorted by ordinal.
    Without signatures (near dedup off) only exact duplicates are found."""
    _, first = np.unique(group["key"], return_index=True)
    is_first = np.zeros(len(group), dtype=bool)
    is_first[first] = True
    exact = group["ordinal"][~is_first]
    unique = group["ordinal"][is_first]  # already in ordinal order
    if signatures is None or len(unique) < 2:
        return exact, np.zeros(0, dtype=PAIR)
    sigs = signatures.get(unique)
    pairs = []
    for start in range(0, len(unique) - 1, _CONFIRM_ROWS):
        rows = sigs[start : start + _CONFIRM_ROWS]
        similarity = (rows[:, None, :] == sigs[None, :, :]).mean(axis=-1)
        i, j = np.nonzero(similarity >= threshold)
        later = j > i + start  # each pair once, earlier document first
        pairs.append(make_pairs(unique[i[later] + start], unique[j[later]]))
    return exact, np.concatenate(pairs)


def make_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=PAIR)
    out["a"], out["b"] = a, b
    return out


def decide(exact: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(exact-duplicate ordinals, near-duplicate ordinals, clusters), both sorted.

    A document is a near duplicate when an earlier document that is kept is confirmed
    similar to it; pairs are visited by later document, then earlier, so every earlier
    document's fate is settled before it is used. A cluster is a kept document that
    absorbed at least one copy."""
    exact = np.unique(exact.astype(np.uint64))
    dropped_exact = set(exact.tolist())
    pairs = np.unique(pairs)  # sorts by (a, b); re-sort by (b, a) below
    pairs = pairs[np.lexsort((pairs["a"], pairs["b"]))]
    near: set[int] = set()
    heads: set[int] = set()
    for a, b in zip(pairs["a"].tolist(), pairs["b"].tolist(), strict=True):
        if b in near or b in dropped_exact or a in near or a in dropped_exact:
            continue
        near.add(b)
        heads.add(a)
    return exact, np.array(sorted(near), dtype=np.uint64), len(heads)


def dedup_records(
    signature: np.ndarray | None, key: bytes, row: int, task: int, shape: tuple[int, int]
) -> np.ndarray:
    """A document's records: one per band, or one keyed by its exact digest alone when near
    dedup is off. Without exact dedup the key is the ordinal, unique to the document."""
    position = ordinal(task, row)
    folded = key_hash(key) if key else position
    bands = band_hashes(signature, *shape) if signature is not None else np.array([folded])
    out = np.zeros(len(bands), dtype=RECORD)
    out["band"], out["ordinal"], out["key"] = bands, position, folded
    return out


def find_duplicates(texts: list[str], cfg: DedupConfig) -> tuple[list[str | None], int]:
    """Why each text is dropped (None: kept) and the number of near-duplicate clusters: the
    clean stage's dedup, in memory, for a list that fits in it."""
    shape = lsh_shape(cfg)
    near = cfg.near
    signatures = [minhash_signature(t, cfg) if near else None for t in texts]
    keys = [exact_key(t) if cfg.exact else b"" for t in texts]
    if not texts or not (cfg.exact or near):
        return [None] * len(texts), 0
    records = np.concatenate(
        [
            dedup_records(sig, key, i, 0, shape)
            for i, (sig, key) in enumerate(zip(signatures, keys, strict=True))
        ]
    )
    store = _MemoryStore(np.stack(signatures)) if near else None
    exact_parts, pair_parts = [np.zeros(0, np.uint64)], [np.zeros(0, PAIR)]
    for group in candidate_groups(records):
        exact, pairs = confirmed_pairs(group, store, cfg.threshold)
        exact_parts.append(exact)
        pair_parts.append(pairs)
    exact, near_dropped, clusters = decide(np.concatenate(exact_parts), np.concatenate(pair_parts))
    reasons: list[str | None] = [None] * len(texts)
    for position in exact.tolist():
        reasons[position] = DUPLICATE
    for position in near_dropped.tolist():
        reasons[position] = NEAR_DUPLICATE
    return reasons, clusters


class _MemoryStore(SignatureStore):
    def __init__(self, signatures: np.ndarray) -> None:  # one task, rows in order
        self.signatures = signatures

    def get(self, ordinals: np.ndarray) -> np.ndarray:
        return self.signatures[split_ordinals(ordinals)[1]]

    def close(self) -> None:
        return None
