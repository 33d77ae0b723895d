"""Sampling throughput: lmpipe.feedback.rollouts.sample against transformers' `generate` on
the same rows, at the same batch size, reply length and temperature.

    python benchmarks/rollouts.py --models tiny       # after make demo: its fine-tuned model
    python benchmarks/rollouts.py --models tiny,smollm2

The rows are k replies to each held-out problem of the demo's verifiable task (chain_sum),
k rows of a prompt next to each other as `sample` lays them out. The baseline is what a
user would write: the same rows through the chat template, left-padded, one `generate`
call per batch. Every reply is forced to `--tokens` new tokens (min_new_tokens), so both
generate the same number of tokens and tokens/s compare like for like. Runs alternate,
`--repeats` times each; the ratio is ours over the baseline's median tokens/s
(target: >= 1.0).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from models import DATA, ROOT, base_model, config
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.feedback.rollouts import Sampling, prompt_ids, sample
from lmpipe.tasks.sft import conversation_splits
from lmpipe.training.model import load_model

log = logging.getLogger("benchmarks.rollouts")
CPU = torch.device("cpu")
MODELS = {"tiny": ["finetune=verifier"], "smollm2": ["experiment=smollm2-verifier"]}


def baseline(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[str],
    sampling: Sampling, batch_size: int,
) -> None:  # fmt: skip
    """The rows through `generate` directly, `batch_size` at a time."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            encoded = [prompt_ids(tokenizer, row) for row in rows[start : start + batch_size]]
            width = max(map(len, encoded))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
            mask = torch.arange(width) >= torch.tensor([width - len(e) for e in encoded])[:, None]
            out = model.generate(input_ids=ids, attention_mask=mask.long(), pad_token_id=pad,
                                 max_new_tokens=sampling.max_new_tokens,
                                 min_new_tokens=sampling.min_new_tokens,
                                 **sampling.generate_kwargs())  # fmt: skip
            tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def measure(name: str, args: argparse.Namespace) -> dict:
    cfg = config(MODELS[name])
    path = ROOT / "outputs" / "finetune" / "model" if name == "tiny" else base_model(name, cfg)
    if not path.is_dir():
        raise SystemExit(f"no {path}: run `make demo` first")
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)
    problems = [c.prompt for c in conversation_splits(cfg.finetune)["test"]][: args.prompts]
    rows = [p for p in problems for _ in range(args.k)]
    sampling = Sampling(args.tokens, args.temperature, min_new_tokens=args.tokens)
    tokens = len(rows) * args.tokens
    ours, theirs = [], []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        sample(model, tokenizer, problems, args.k, sampling, repeat, args.batch_size, CPU)
        ours.append(tokens / (time.perf_counter() - start))
        torch.manual_seed(repeat)
        start = time.perf_counter()
        baseline(model, tokenizer, rows, sampling, args.batch_size)
        theirs.append(tokens / (time.perf_counter() - start))
        log.info("%s repeat %d: ours %.0f tokens/s, generate %.0f", name, repeat, ours[-1],
                 theirs[-1])  # fmt: skip
    row = {"model": name, "rows": len(rows), "batch_size": args.batch_size,
           "tokens_per_reply": args.tokens, "temperature": args.temperature,
           "ours_tokens_per_s": statistics.median(ours),
           "generate_tokens_per_s": statistics.median(theirs)}  # fmt: skip
    row["ratio"] = row["ours_tokens_per_s"] / row["generate_tokens_per_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=4, help="replies per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per generate call")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per reply")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DATA / "rollouts.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = [measure(name, args) for name in args.models.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"{'model':8} {'rows':>5} {'batch':>5} {'ours tok/s':>11} {'generate tok/s':>15} "
          f"{'ratio':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:8} {r['rows']:5d} {r['batch_size']:5d} "
              f"{r['ours_tokens_per_s']:11.0f} {r['generate_tokens_per_s']:15.0f} "
              f"{r['ratio']:6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
