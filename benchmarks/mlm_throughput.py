"""Masked-LM training throughput against causal-LM training of a model of equal size.

Trains, in one run and through the shared loop, on the same random tokens (throughput does
not depend on the text): the decoder preset as a causal LM, the encoder preset by masked LM
as lmpipe trains it (the vocabulary head at the targets only, in fixed slots), and, as the
control, masked LM with the head at every position (what it did before). Both presets have
the same size: llama-125m's SwiGLU (3 x 768 x 2048) and bert-base's GELU MLP (2 x 768 x 3072)
hold the same weights per layer. Prints tokens/s (median of the steps after warm-up) and
the ratios; the target is MLM >= 0.95x causal LM.

    python benchmarks/mlm_throughput.py                       # CUDA: bf16, compiled
    python benchmarks/mlm_throughput.py --small --device cpu  # 256 x 4 layers, fp32
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmpipe.data.batches import IGNORE_INDEX, window_batches
from lmpipe.data.tokenizer import train_tokenizer
from lmpipe.runs.config import HardwareConfig, ModelConfig, OptimConfig, PretrainConfig
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.tasks.masked_lm import MaskedLM
from lmpipe.training.loop import enable_tf32, seed_everything, train
from lmpipe.training.model import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]


class FullHeadMaskedLM(MaskedLM):
    """The control: the vocabulary head at every position, the loss at the targets."""

    def loss_sum(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        count = self.target_count(batch)
        labels = torch.full((ids.numel(),), IGNORE_INDEX, device=ids.device)
        labels[batch["target_positions"][:count]] = batch["target_labels"][:count]
        logits = model(input_ids=ids).logits.float()
        return F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE_INDEX,
                               reduction="sum")  # fmt: skip


def preset(name: str, small: bool) -> ModelConfig:
    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "conf/model" / f"{name}.yaml")
        )
    )
    if small:  # same ratio of MLP weights: 3 x 688 (SwiGLU) against 2 x 1032 (GELU)
        width = 688 if cfg.family == "decoder" else 1032
        cfg = replace(cfg, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                      intermediate_size=width)  # fmt: skip
    return cfg


def measure(args, tokenizer, tokens: np.ndarray, model_cfg: ModelConfig, task, device) -> dict:
    seed_everything(0)
    model = build_model(replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, args.seq_len)),
                        tokenizer)  # fmt: skip
    p = PretrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, log_every=1, eval_every=10**9,
                       optim=OptimConfig(lr=3e-4, warmup_steps=5))  # fmt: skip
    if isinstance(task, MaskedLM):
        setup = task.setup(p, model, tokenizer, tokens, tokens[: 1 << 16], 0, device)
        batches, model = setup.batches, setup.model
    else:
        batches = window_batches(tokens, args.seq_len, args.batch_size, 0)
    hardware = HardwareConfig(device=device.type, precision=args.precision,
                              compile=args.compile)  # fmt: skip
    logger = MetricLogger(None)
    train(model, batches, p, hardware, device, logger, objective=task)
    rows = logger.state_dict()["train"][args.warmup :]
    return {"tokens_per_second": float(np.median([r["tokens_per_second"] for r in rows])),
            "parameters": count_parameters(model)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", default="llama-125m")
    parser.add_argument("--encoder", default="bert-base")
    parser.add_argument("--small", action="store_true", help="256 wide, 4 layers (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    args.precision, args.compile = ("bf16", True) if device.type == "cuda" else ("fp32", False)
    enable_tf32(device, args.precision)

    text = [f"token {i} of a small sample to give the tokenizer a vocabulary" for i in range(3000)]
    tokenizer = train_tokenizer(text, vocab_size=min(args.vocab_size, 2048), encoder=True)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(args.vocab_size - len(tokenizer))])
    tokens = np.random.default_rng(0).integers(10, len(tokenizer), 20_000_000, np.uint32)
    decoder, encoder = preset(args.decoder, args.small), preset(args.encoder, args.small)
    print(f"{device}, {args.precision}{' compiled' if args.compile else ''}, vocab "
          f"{len(tokenizer)}, batch {args.batch_size} x {args.seq_len}")  # fmt: skip
    causal = measure(args, tokenizer, tokens, decoder, CausalLM(), device)
    mlm = measure(args, tokenizer, tokens, encoder, MaskedLM(PretrainConfig().mlm, 0), device)
    full = measure(args, tokenizer, tokens, encoder, FullHeadMaskedLM(PretrainConfig().mlm, 0),
                   device)  # fmt: skip
    for label, r in (("causal LM", causal), ("MLM, head at the targets", mlm),
                     ("MLM, head everywhere", full)):  # fmt: skip
        print(
            f"{label:26} {r['tokens_per_second']:10.0f} tokens/s  "
            f"({r['parameters'] / 1e6:.1f}M parameters)"
        )
    ratio = mlm["tokens_per_second"] / causal["tokens_per_second"]
    print(f"MLM / causal LM: {ratio:.2f}x (target >= 0.95: {'met' if ratio >= 0.95 else 'MISSED'})")
    print(
        f"head at the targets / everywhere: "
        f"{mlm['tokens_per_second'] / full['tokens_per_second']:.2f}x"
    )


if __name__ == "__main__":
    main()
