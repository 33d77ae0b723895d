"""Training throughput and MFU of a model preset on one CUDA GPU: bf16 against eager fp32.

Runs the shared training loop on random tokens (throughput does not depend on the text)
for `--steps` steps after `--warmup` steps that include compilation, in three set-ups:
eager fp32 (the baseline: full fp32, no TF32), eager bf16 autocast (TF32 for what stays
fp32), and bf16 with torch.compile. Prints tokens/s, MFU against the GPU's dense bf16 peak
(lmpipe.training.loop.PEAK_BF16_FLOPS, or --peak-flops; an unknown GPU gets no MFU) and peak memory
for each, and the speed-ups over eager fp32 measured in the same run.

    python benchmarks/gpu_throughput.py --preset llama-125m --batch-size 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lmpipe.data.batches import window_batches
from lmpipe.data.tokenizer import train_tokenizer
from lmpipe.runs.config import HardwareConfig, ModelConfig, OptimConfig, TrainConfig
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training.loop import (
    device_name,
    enable_tf32,
    flops_per_token,
    peak_flops,
    seed_everything,
    train,
)
from lmpipe.training.model import build_model

CAUSAL_LM = CausalLM()

ROOT = Path(__file__).resolve().parents[1]


SETUPS = [("fp32", False), ("bf16", False), ("bf16", True)]  # fp32 first: before TF32 is on


def measure(args, tokenizer, tokens: np.ndarray, precision: str, compile_model: bool) -> dict:
    """tokens/s (median over the steps after warm-up), peak memory, FLOPs per token."""
    cfg_model = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig),
                        OmegaConf.load(ROOT / "conf" / "model" / f"{args.preset}.yaml"))
    )  # fmt: skip
    seed_everything(0)
    model = build_model(cfg_model, tokenizer)
    device = torch.device("cuda")
    hardware = HardwareConfig(device="cuda", precision=precision, compile=compile_model)
    enable_tf32(device, precision)
    total = args.warmup + args.steps
    cfg = TrainConfig(steps=total, batch_size=args.batch_size, log_every=1,
                      optim=OptimConfig(lr=3e-4, warmup_steps=10))  # fmt: skip
    logger = MetricLogger(None)
    train(model, window_batches(tokens, args.seq_len, args.batch_size, 0), cfg, hardware,
          device, logger, objective=CAUSAL_LM)  # fmt: skip
    rows = logger.state_dict()["train"][args.warmup :]
    return {
        "tokens_per_second": float(np.median([row["tokens_per_second"] for row in rows])),
        "peak_memory_gb": max(row["peak_memory_gb"] for row in rows),
        "flops_per_token": flops_per_token(model, args.seq_len),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-125m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--peak-flops", type=float, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    text = [f"token {i} of a small sample to give the tokenizer a vocabulary" for i in range(5000)]
    tokenizer = train_tokenizer(text, vocab_size=min(args.vocab_size, 4096))
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(args.vocab_size - len(tokenizer))])
    tokens = np.random.default_rng(0).integers(0, len(tokenizer), 50_000_000, np.uint32)
    device = torch.device("cuda")
    peak = args.peak_flops or peak_flops(HardwareConfig(device="cuda", precision="bf16"), device)
    print(
        f"{device_name(device)}, {args.preset}, vocab {len(tokenizer)}, "
        f"batch {args.batch_size} x {args.seq_len}; dense bf16 peak "
        f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (no MFU; --peak-flops)'}"
    )
    results = {}
    for precision, compile_model in SETUPS:
        result = measure(args, tokenizer, tokens, precision, compile_model)
        tps = result["tokens_per_second"]
        mfu = f"{tps * result['flops_per_token'] / peak:.1%}" if peak else "n/a"
        results[precision, compile_model] = tps
        print(f"{precision} compile={compile_model!s:5}: {tps:10.0f} tokens/s  MFU {mfu:>6} "
              f"(of the bf16 peak)  peak memory {result['peak_memory_gb']:.1f} GB  "
              f"({result['flops_per_token'] / 1e9:.2f} GFLOP/token)")  # fmt: skip
    baseline = results["fp32", False]
    print(f"bf16 eager / fp32 eager:   {results['bf16', False] / baseline:.2f}x")
    print(f"bf16 compile / fp32 eager: {results['bf16', True] / baseline:.2f}x")
    print(f"compile / eager (bf16):    {results['bf16', True] / results['bf16', False]:.2f}x")


if __name__ == "__main__":
    main()
