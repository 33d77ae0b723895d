"""WikiText-2's test split in lm-evaluation-harness's definition (every article, detokenized,
scored in rolling windows at each model's own context; `lmpipe.evaluation.held_out_lm`,
equal to lm-eval's within 1e-3 by tests/test_harness.py) for pretrained models and model
directories: bits per byte, byte and word perplexity, and the time each took.

    python benchmarks/wikitext.py --models smollm2-135m          # ~40 min on 2 CPU cores
    python benchmarks/wikitext.py --models outputs/pretrain/model,outputs/finetune/model
    python benchmarks/wikitext.py --models smollm2-135m --max-articles 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from lmpipe.data.tokenizer import base_tokenizer, load_tokenizer
from lmpipe.evaluation.held_out_lm import article_scores, context_length
from lmpipe.taskdata import wikitext
from lmpipe.training.model import load_base, load_model

DATA = Path(__file__).resolve().parent / ".data"
log = logging.getLogger("benchmarks")


def load(spec: str) -> tuple[torch.nn.Module, object]:
    """A model directory, or anything `model.init_from` takes (a packaged name, a GGUF file,
    a hub id), with its own tokenizer."""
    if Path(spec).is_dir():
        return load_model(Path(spec)).eval(), load_tokenizer(spec)
    return load_base(spec).eval(), base_tokenizer(spec)


def measure(spec: str, pages: list[str], batch_size: int) -> dict:
    model, tokenizer = load(spec)
    context = context_length(model)
    started = time.perf_counter()
    with torch.inference_mode():
        result = article_scores(model, tokenizer, pages, context, batch_size, torch.device("cpu"))
    return {"context": context, "tokens": result.tokens, "bytes": result.bytes,
            "words": result.words, "bits_per_byte": result.bits_per_byte,
            "byte_perplexity": 2**result.bits_per_byte,
            "word_perplexity": result.word_perplexity,
            "seconds": time.perf_counter() - started}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m", help="comma-separated")
    parser.add_argument("--max-articles", type=int, default=None, help="the first N (all: 62)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--out", type=Path, default=DATA / "wikitext.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pages = wikitext.articles("test")[: args.max_articles]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    print(f"WikiText-2 test: {len(pages)} articles, by article at each model's context")
    print("| model | context | tokens | bits per byte | byte perplexity | word perplexity | s |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.models.split(","):
        row = measure(spec, pages, args.batch_size) | {"articles": len(pages)}
        results[spec] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"| {spec} | {row['context']} | {row['tokens']} | {row['bits_per_byte']:.4f} | "
              f"{row['byte_perplexity']:.4f} | {row['word_perplexity']:.2f} | "
              f"{row['seconds']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
