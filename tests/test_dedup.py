"""Out-of-core dedup against a one-by-one reference on datasketch's own LSH index, and the
clean stage's decisions independent of how its work is split."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

from lmpipe.data.corpus import clean_corpus, iter_corpus
from lmpipe.data.dedup import LSH_WEIGHTS, exact_key, find_duplicates, minhash_signature
from lmpipe.runs.config import CleanConfig, DataConfig, DedupConfig, QualityConfig

WORDS = [f"w{i}" for i in range(400)]


def reference(texts: list[str], cfg: DedupConfig) -> list[str | None]:
    """Judge texts one at a time in order: datasketch's MinHashLSH holds the kept ones, and
    a candidate counts only if its full signature agrees (the rule clean has always had)."""
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
    seen: set[bytes] = set()
    kept: dict[int, np.ndarray] = {}
    out: list[str | None] = []
    for i, text in enumerate(texts):
        key = exact_key(text)
        if key in seen:
            out.append("duplicate")
            continue
        seen.add(key)
        signature = minhash_signature(text, cfg)
        sketch = MinHash(
            num_perm=cfg.num_perm, hashvalues=signature.astype(np.uint64), scheme="affine32"
        )
        similar = [c for c in lsh.query(sketch) if np.mean(kept[c] == signature) >= cfg.threshold]
        if similar:
            out.append("near_duplicate")
            continue
        lsh.insert(i, sketch)
        kept[i] = signature
        out.append(None)
    return out


def edited(rng: random.Random, words: list[str], edits: int) -> list[str]:
    words = list(words)
    for _ in range(edits):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return words


def family_corpus(seed: int, families: int = 60) -> list[str]:
    """Families of texts: an original, chains of growing edits (A ~ B ~ C, A !~ C), exact
    copies re-spaced and re-cased, all shuffled."""
    rng = random.Random(seed)
    texts = []
    for _ in range(families):
        base = [rng.choice(WORDS) for _ in range(120)]
        chain = base
        texts.append(" ".join(base))
        for _ in range(rng.randrange(0, 4)):
            chain = edited(rng, chain, rng.choice([1, 3, 6]))
            texts.append(" ".join(chain))
        if rng.random() < 0.5:
            texts.append("  ".join(base).upper())
    rng.shuffle(texts)
    return texts


def test_out_of_core_decisions_equal_the_one_by_one_reference() -> None:
    for seed, threshold in ((0, 0.8), (1, 0.7), (2, 0.9)):
        cfg = DedupConfig(threshold=threshold)
        texts = family_corpus(seed)
        expected = reference(texts, cfg)
        reasons, clusters = find_duplicates(texts, cfg)
        assert reasons == expected
        assert expected.count("near_duplicate") > 5 and expected.count("duplicate") > 5
        assert 0 < clusters <= expected.count(None)


def test_a_chain_keeps_its_far_end() -> None:
    """A ~ B and B ~ C but A !~ C: B goes, and C stays, as B was dropped (not kept)."""
    cfg = DedupConfig(threshold=0.8, ngram=1, num_perm=256)
    a = [f"t{i}" for i in range(100)]
    b = a[:90] + [f"u{i}" for i in range(10)]
    c = a[:80] + [f"u{i}" for i in range(10)] + [f"v{i}" for i in range(10)]
    reasons, clusters = find_duplicates([" ".join(a), " ".join(b), " ".join(c)], cfg)
    assert reasons == [None, "near_duplicate", None]
    assert clusters == 1


def test_clean_decides_the_same_whatever_the_number_of_shards(tmp_path: Path) -> None:
    """Copies spread over files that land in different tasks: the kept documents and their
    order do not depend on clean.shards, and the first copy in corpus order is the one kept."""
    texts = family_corpus(3, families=40)
    src = tmp_path / "src"
    src.mkdir()
    for f in range(6):
        with (src / f"part-{f}.jsonl").open("w") as handle:
            for text in texts[f::6]:
                handle.write(json.dumps({"text": text}) + "\n")
    data = DataConfig(kind="local", paths=[str(src)])
    kept = {}
    for shards in (1, 4):
        cfg = CleanConfig(
            quality=QualityConfig(min_chars=10, max_words=None),
            dedup=DedupConfig(threshold=0.8),
            shards=shards,
            workers=1,
        )
        report = clean_corpus(data, cfg, tmp_path / f"out-{shards}")
        kept[shards] = [r["text"] for rows in iter_corpus(tmp_path / f"out-{shards}") for r in rows]
        assert report.docs_out == len(kept[shards])
    assert kept[1] == kept[4]
    in_order = [t for f in range(6) for t in texts[f::6]]
    reasons = reference(in_order, DedupConfig(threshold=0.8))
    assert kept[1] == [t for t, r in zip(in_order, reasons, strict=True) if r is None]
