"""What each quantized variant costs and saves, on the demo's fine-tuned model and on
SmolLM2-135M-Instruct, in one run: held-out quality (bits per byte of WikiText-2's test
text, whose relative change is the loss's), serialized size, and the latency of one 64-token
forward pass, each as a ratio against the fp32 model measured in the same run.

    python benchmarks/quantization.py                  # both models
    python benchmarks/quantization.py --models tiny    # the demo's (after `make demo`)

Latency: `--rounds` rounds of `--repeats` timed passes each (after two warm-ups), the
variants interleaved round by round so that drift hits them alike; the table gives the
median over rounds of each round's p50, and the spread (min-max) of those p50s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from models import ROOT, base_model, config

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.deploy.quantize import quantizer, state_size_bytes
from lmpipe.evaluation.lm_metrics import bits_per_byte
from lmpipe.taskdata import wikitext
from lmpipe.training.model import load_model

CPU = torch.device("cpu")
VARIANTS = [  # (label, method, group size, symmetric)
    ("int8 (weight-only)", "int8", 32, True),
    ("int8-dynamic", "int8-dynamic", 32, True),
    ("int4 g32 asym (Q4_1)", "int4", 32, False),
    ("int4 g32 sym (Q4_0)", "int4", 32, True),
    ("int4 g64 asym", "int4", 64, False),
    ("int4 g128 asym", "int4", 128, False),
]


def forward_p50s(models: dict[str, torch.nn.Module], ids: torch.Tensor, rounds: int,
                 repeats: int) -> dict[str, list[float]]:  # fmt: skip
    """Each model's p50 seconds per forward pass, one per round, rounds interleaved."""
    p50s: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(2):
                model(input_ids=ids, use_cache=False)
        for _ in range(rounds):
            for name, model in models.items():
                seconds = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    seconds.append(time.perf_counter() - start)
                p50s[name].append(statistics.median(seconds))
    return p50s


def run(name: str, args: argparse.Namespace) -> None:
    if name == "tiny":
        path = ROOT / "outputs" / "finetune" / "model"
        seq_len = 256
    else:
        path = base_model(name, config(["experiment=smollm2-lora"]))
        seq_len = 512
    tokenizer = load_tokenizer(path)
    text = wikitext.head(wikitext.wikitext_text("test"), args.max_bytes)
    fp32 = load_model(path).eval()
    models = {"fp32": fp32}
    for label, method, group, symmetric in VARIANTS:
        models[label] = quantizer(method, group, symmetric)(copy.deepcopy(fp32))
    quality = {label: bits_per_byte(model, tokenizer, text, seq_len - 1, 8, CPU)["bpb"]
               for label, model in models.items()}  # fmt: skip
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:64]])
    p50s = forward_p50s(models, ids, args.rounds, args.repeats)
    base_p50 = statistics.median(p50s["fp32"])
    base_size = state_size_bytes(fp32)
    print(f"\n{name}: {path.name}, WikiText-2 test, {len(text.encode()):,} bytes; "
          f"fp32 forward(64) p50 {base_p50 * 1e3:.1f} ms, {base_size / 1e6:.1f} MB")  # fmt: skip
    print("| variant | size | forward(64) p50 vs fp32 [spread] | WikiText-2 bpb | change |")
    print("|---|---|---|---|---|")
    for label, model in models.items():
        p50 = statistics.median(p50s[label])
        spread = f"{min(p50s[label]) / base_p50:.2f}-{max(p50s[label]) / base_p50:.2f}"
        change = quality[label] / quality["fp32"] - 1
        print(f"| {label} | {state_size_bytes(model) / 1e6:.1f} MB | {p50 / base_p50:.2f}x "
              f"[{spread}] | {quality[label]:.4f} | {change:+.2%} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--max-bytes", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.models.split(","):
        run(name, args)


if __name__ == "__main__":
    main()
