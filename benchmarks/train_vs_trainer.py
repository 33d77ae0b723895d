"""Our training loop against the transformers `Trainer`, measured in the same run.

Same model (the `tiny` preset, identical initial weights), same batches in the same order
(the windows our seeded sampler yields, fed to Trainer through a sequential sampler), same
batch size, sequence length, steps, AdamW settings, warmup + cosine-to-min schedule and
clipping; fp32 on CPU; neither side logs to a tracker or writes checkpoints. Each side is
timed from the call that trains to its return.

Prints tokens/s for both, the ratio ours/Trainer (target >= 1.1) and the final training
loss of both (target: within 2%).

    python benchmarks/train_vs_trainer.py              # about 4 min on 2 cores
    python benchmarks/train_vs_trainer.py --steps 200  # closer losses, longer
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_corpus import generate

from lmpipe.config import HardwareConfig, ModelConfig, OptimConfig, TrainConfig
from lmpipe.data.batches import window_batches
from lmpipe.model import build_model
from lmpipe.tokenizer import train_tokenizer
from lmpipe.tracking import MetricLogger
from lmpipe.train import seed_everything, train


def corpus_tokens(mb: int, vocab_size: int) -> tuple[np.ndarray, object]:
    texts = []
    for path in sorted(generate(mb).glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    tokenizer = train_tokenizer(texts, vocab_size)
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts):
        ids += [*encoding.ids, tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.uint16), tokenizer


class Windows(Dataset):
    """The exact windows our sampler hands out, in its order."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.rows = [row for batch in batches for row in batch["input_ids"]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


class SameOrderTrainer(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class LossRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--mb", type=int, default=10, help="synthetic corpus size")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tokens, tokenizer = corpus_tokens(args.mb, 8192)
    optim = OptimConfig(lr=2e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, log_every=1, optim=optim)
    seed_everything(0)
    model = build_model(ModelConfig(preset="tiny"), tokenizer)
    initial = copy.deepcopy(model.state_dict())

    order = window_batches(tokens, args.seq_len, args.batch_size, seed=0)
    batches = [next(order) for _ in range(args.steps)]

    # Trainer first, so that ours is not favoured by a warm allocator or page cache.
    model.load_state_dict(initial)
    recorder = LossRecorder()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=optim.lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.beta1,
            adam_beta2=optim.beta2,
            max_grad_norm=optim.grad_clip,
            warmup_steps=optim.warmup_steps,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": optim.min_lr_ratio},
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
        )
        trainer = SameOrderTrainer(
            model=model, args=training_args, train_dataset=Windows(batches),
            callbacks=[recorder],
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        trainer_seconds = time.perf_counter() - start

    model.load_state_dict(initial)
    logger = MetricLogger(None)
    start = time.perf_counter()
    ours_batches = window_batches(tokens, args.seq_len, args.batch_size, seed=0)  # same order
    result = train(model, ours_batches, cfg, HardwareConfig(), torch.device("cpu"), logger)
    ours_seconds = time.perf_counter() - start

    tokens_total = args.steps * args.batch_size * args.seq_len
    ours_tps, trainer_tps = tokens_total / ours_seconds, tokens_total / trainer_seconds
    # Final loss: the mean of the last 10 steps on both sides (same batches), less noisy
    # than a single step.
    ours_losses = [row["train_loss"] for row in logger.state_dict()["train"]]
    ours_final, trainer_final = np.mean(ours_losses[-10:]), np.mean(recorder.losses[-10:])
    print(f"model: tiny, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"transformers Trainer: {trainer_seconds:7.1f} s  {trainer_tps:8.0f} tokens/s  "
          f"final loss {trainer_final:.4f}")  # fmt: skip
    print(f"lmpipe train():       {ours_seconds:7.1f} s  {ours_tps:8.0f} tokens/s  "
          f"final loss {ours_final:.4f}  (last step {result.train_loss:.4f})")  # fmt: skip
    print(f"tokens/s ratio ours/Trainer: {ours_tps / trainer_tps:.3f}  (target >= 1.1)")
    print(f"final loss difference: {abs(ours_final - trainer_final) / trainer_final:.2%}  "
          "(target <= 2%)")  # fmt: skip


if __name__ == "__main__":
    main()
