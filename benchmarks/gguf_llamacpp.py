"""Our GGUF exports in llama.cpp against the transformers model they came from, in one run:
greedy replies to the held-out reasoning-gym problems (the evaluate stage's test split) from
each GGUF type (F16, Q8_0 and Q4_0 unless --kinds says otherwise) in a real llama.cpp
(node-llama-cpp's prebuilt CPU build, tools/llamacpp), each beside transformers' fp32
replies: how many are identical, and exact match with its interval and the paired difference
from fp32 (exact, McNemar).

    python benchmarks/gguf_llamacpp.py                       # the demo's fine-tuned model
    python benchmarks/gguf_llamacpp.py --models tiny,smollm2 # and SmolLM2-135M-Instruct
    python benchmarks/gguf_llamacpp.py --model-dir smollm2-sft=path/to/model ...
    python benchmarks/gguf_llamacpp.py --kinds Q5_1,Q5_0,Q4_1 ...        # other types
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from models import DATA, ROOT, base_model, config, paired_cell

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.deploy.gguf_export import export_gguf
from lmpipe.deploy.llamacpp import greedy_replies
from lmpipe.evaluation.answers import is_correct
from lmpipe.evaluation.intervals import paired_binary_summary, proportion_interval
from lmpipe.feedback.rollouts import Sampling, complete
from lmpipe.tasks.finetuning import finetuning_task
from lmpipe.training.model import load_model

KINDS = "F16,Q8_0,Q4_0"
MODELS = {"tiny": [], "smollm2": ["experiment=smollm2-verifier", "finetune.task=sft"]}
log = logging.getLogger("benchmarks")


def model_dir(name: str, overrides: list[str]) -> Path:
    """`tiny`: the demo's fine-tuned model; `smollm2`: SmolLM2-135M-Instruct as published."""
    if name == "tiny":
        return ROOT / "outputs" / "finetune" / "model"
    return base_model(name, config(overrides))


def measure(
    label: str, path: Path, overrides: list[str], problems: int, threads: int, kinds: list[str]
) -> dict:
    cfg = config(overrides)
    test = finetuning_task("sft").splits(cfg.finetune)["test"][:problems]
    prompts = [[m for m in c.messages if m["role"] != "assistant"] for c in test]
    max_tokens = int(cfg.evaluate.max_new_tokens)
    tokenizer = load_tokenizer(path)
    started = time.process_time()
    reference = complete(load_model(path).eval(), tokenizer, prompts, Sampling(max_tokens),
                         batch_size=int(cfg.evaluate.batch_size))  # fmt: skip
    expected = [c.token_ids[:-1] if c.finished else c.token_ids for c in reference]
    hits = {"fp32": np.array([is_correct(c.text, t.answer)
                              for c, t in zip(reference, test, strict=True)])}  # fmt: skip
    rows = {"fp32": {"seconds": time.process_time() - started}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            gguf = export_gguf(path, Path(tmp) / f"{label}-{kind}.gguf", kind)
            started = time.perf_counter()
            _, replies = greedy_replies(gguf, prompts, max_tokens, threads)
            seconds = time.perf_counter() - started
            hits[kind] = np.array([is_correct(r.reply.strip(), t.answer)
                                   for r, t in zip(replies, test, strict=True)])  # fmt: skip
            same = sum(r.reply_tokens == tuple(e) for r, e in zip(replies, expected, strict=True))
            rows[kind] = {"identical": same, "seconds": seconds,
                          "size_mb": gguf.stat().st_size / 1e6,
                          **paired_binary_summary(hits[kind], hits["fp32"], "vs_fp32")}  # fmt: skip
    for kind, row in rows.items():
        low, high = proportion_interval(hits[kind])
        row.update(exact_match=float(hits[kind].mean()), low=low, high=high)
    return {"problems": len(test), "max_tokens": max_tokens, "rows": rows}


def report(label: str, result: dict) -> None:
    n = result["problems"]
    print(f"\n{label}: {n} held-out problems, greedy, up to {result['max_tokens']} tokens")
    print("| model | identical to fp32 | exact match [95% CI] | minus fp32 [95% CI], p | MB |")
    print("|---|---|---|---|---|")
    for kind, row in result["rows"].items():
        same = f"{row['identical']} / {n}" if "identical" in row else ""
        size = f"{row['size_mb']:.1f}" if "size_mb" in row else ""
        print(f"| {kind} | {same} | {row['exact_match']:.3f} [{row['low']:.3f}, "
              f"{row['high']:.3f}] | {paired_cell(row, 'vs_fp32')} | {size} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2")
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        help="LABEL=PATH[:CONFIG] another model directory (tiny's config)",
    )
    parser.add_argument("--kinds", default=KINDS, help="comma-separated GGUF types")
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp's threads")
    parser.add_argument("--out", type=Path, default=DATA / "gguf_llamacpp.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    todo = [(name, model_dir(name, MODELS[name]), MODELS[name])
            for name in args.models.split(",") if name]  # fmt: skip
    for spec in args.model_dir:
        label, _, rest = spec.partition("=")
        path, _, model = rest.partition(":")
        todo.append((label, Path(path), MODELS[model or "tiny"]))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kinds = args.kinds.split(",")
    for label, path, overrides in todo:
        results[label] = measure(label, path, overrides, args.problems, args.threads, kinds)
        report(label, results[label])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
