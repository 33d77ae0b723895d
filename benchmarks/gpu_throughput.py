"""Training throughput and MFU of a model preset on one CUDA GPU (bf16 autocast, compile).

Runs the shared training loop on random tokens (throughput does not depend on the text)
for `--steps` steps after `--warmup` steps that include compilation, and prints tokens/s
and MFU against the GPU's dense bf16 peak (lmpipe.train.PEAK_BF16_FLOPS, or --peak-flops).
The baseline in the same run is the same loop without torch.compile.

    python benchmarks/gpu_throughput.py --preset llama-125m --batch-size 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lmpipe.config import HardwareConfig, ModelConfig, OptimConfig, TrainConfig
from lmpipe.data.batches import window_batches
from lmpipe.model import build_model
from lmpipe.tokenizer import train_tokenizer
from lmpipe.tracking import MetricLogger
from lmpipe.train import flops_per_token, peak_flops, seed_everything, train

ROOT = Path(__file__).resolve().parents[1]


def measure(args, tokenizer, tokens: np.ndarray, compile_model: bool) -> tuple[float, float]:
    """tokens/s over the steps after warm-up, and the model's FLOPs per token."""
    cfg_model = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig),
                        OmegaConf.load(ROOT / "conf" / "model" / f"{args.preset}.yaml"))
    )  # fmt: skip
    seed_everything(0)
    model = build_model(cfg_model, tokenizer)
    hardware = HardwareConfig(device="cuda", precision="bf16", compile=compile_model)
    total = args.warmup + args.steps
    cfg = TrainConfig(steps=total, batch_size=args.batch_size, log_every=1,
                      optim=OptimConfig(lr=3e-4, warmup_steps=10))  # fmt: skip
    logger = MetricLogger(None)
    train(model, window_batches(tokens, args.seq_len, args.batch_size, 0), cfg, hardware,
          torch.device("cuda"), logger)  # fmt: skip
    rows = logger.state_dict()["train"][args.warmup :]
    tokens_per_second = float(np.median([row["tokens_per_second"] for row in rows]))
    return tokens_per_second, flops_per_token(model, args.seq_len)


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
    torch.backends.cuda.matmul.allow_tf32 = True

    text = [f"token {i} of a small sample to give the tokenizer a vocabulary" for i in range(5000)]
    tokenizer = train_tokenizer(text, vocab_size=min(args.vocab_size, 4096))
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(args.vocab_size - len(tokenizer))])
    tokens = np.random.default_rng(0).integers(0, len(tokenizer), 50_000_000, np.uint32)
    peak = args.peak_flops or peak_flops(
        HardwareConfig(device="cuda", precision="bf16"), torch.device("cuda")
    )
    print(
        f"{torch.cuda.get_device_name()}, {args.preset}, vocab {len(tokenizer)}, "
        f"batch {args.batch_size} x {args.seq_len}, bf16; peak {peak and peak / 1e12} TFLOP/s"
    )
    results = {}
    for compile_model in (False, True):
        tps, fpt = measure(args, tokenizer, tokens, compile_model)
        mfu = tps * fpt / peak if peak else float("nan")
        results[compile_model] = tps
        print(f"compile={compile_model!s:5}: {tps:10.0f} tokens/s  MFU {mfu:.1%}  "
              f"({fpt / 1e9:.2f} GFLOP/token)")  # fmt: skip
    print(f"compile speed-up: {results[True] / results[False]:.2f}x")


if __name__ == "__main__":
    main()
