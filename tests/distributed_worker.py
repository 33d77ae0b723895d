"""Train a tiny model for a few steps with the shared loop; run alone or under torchrun.

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT --batch-size 2 --strategy ddp
    python tests/distributed_worker.py OUT --batch-size 4

Batches are SFT-like (padding, prompt tokens masked out of the loss), so the comparison
also checks that the loss is weighted by tokens across processes, not averaged per process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lmpipe.data.sft import IGNORE_INDEX, shuffled_batches
from lmpipe.runs.config import HardwareConfig, OptimConfig, TrainConfig
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training import checkpoint
from lmpipe.training.checkpoint import Checkpoints
from lmpipe.training.distributed import all_gather_object, full_model_state
from lmpipe.training.loop import seed_everything, setup_hardware, train

CAUSAL_LM = CausalLM()


def examples(count: int = 64) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for _ in range(count):
        length = int(torch.randint(6, 24, (1,), generator=generator))
        prompt = int(torch.randint(1, length - 2, (1,), generator=generator))
        ids = torch.randint(3, 90, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


class CrashingLogger(MetricLogger):
    """Every process dies at the same step, like a job killed mid-run."""

    def __init__(self, crash_at: int | None) -> None:
        super().__init__(None)
        self.crash_at = crash_at

    def log(self, metrics, step, series="train") -> None:
        if step == self.crash_at:
            raise SystemExit(f"crashing at step {step}")
        super().log(metrics, step, series)


def forbid_checkpoint_reads() -> None:
    """Rank 0 alone reads a checkpoint and broadcasts it: on any other rank, reading one of
    its files fails (torch.load of in-memory buffers, as object collectives use, still works)."""
    torch_load = torch.load

    def refuse(source, *args, **kwargs):
        if isinstance(source, str | Path):
            raise AssertionError(f"rank other than 0 read the checkpoint file {source}")
        return torch_load(source, *args, **kwargs)

    checkpoint.load_file = refuse
    torch.load = refuse


def skewed_eval(rank: int):
    """Val losses that make rank 0 see a new best at steps 1, 2 and 4, and rank 1 at 1 and 3:
    ranks deciding for themselves would enter the collective `best` save apart."""
    losses = iter({0: [3.0, 2.0, 2.5, 1.0], 1: [3.0, 3.5, 2.0, 4.0]}[rank])
    return lambda model: next(losses)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpoints", type=Path, help="checkpoint every 2 steps, resume")
    parser.add_argument("--crash-at", type=int, help="die while logging this step")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) | cuda (NCCL)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument(
        "--skewed-eval", action="store_true",
        help="validate every step, each rank with its own val losses (they disagree on 'best')",
    )  # fmt: skip
    args = parser.parse_args()

    hardware = HardwareConfig(device=args.device, precision=args.precision,
                              strategy=args.strategy, num_threads=1)  # fmt: skip
    device, env = setup_hardware(hardware)
    seed_everything(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True, pad_token_id=0, attention_dropout=args.dropout,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        checkpoint_every=2,
        eval_every=1,
        optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1),
    )
    batches = shuffled_batches(examples(), args.batch_size, 0, 3, env.rank, env.world_size)
    metrics = CrashingLogger(args.crash_at)
    checkpoints = Checkpoints(args.checkpoints, "worker", env) if args.checkpoints else None
    if checkpoints is not None and not env.is_main:
        forbid_checkpoint_reads()
    evaluate = skewed_eval(env.rank) if args.skewed_eval else None
    result = train(model, batches, cfg, hardware, device, metrics, evaluate, checkpoints,
                   env=env, objective=CAUSAL_LM)  # fmt: skip
    best_steps = all_gather_object(result.best_step)
    state = full_model_state(model)
    if env.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        # tied lm_head shares the embedding tensor: store a copy per name
        save_file({k: v.clone() for k, v in state.items()}, args.out / "weights.safetensors")
        losses = [row["train_loss"] for row in metrics.state_dict()["train"]]
        summary = {"losses": losses, "tokens": result.tokens, "world_size": env.world_size,
                   "resumed_from": result.resumed_from, "best_steps": best_steps}  # fmt: skip
        (args.out / "result.json").write_text(json.dumps(summary))
    torch.distributed.destroy_process_group() if env.enabled else None


if __name__ == "__main__":
    main()
