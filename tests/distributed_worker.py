"""Train a tiny model for a few steps with the shared loop; run alone or under torchrun.

    torchrun --nproc_per_node 2 tests/distributed_worker.py OUT --batch-size 2 --strategy ddp
    python tests/distributed_worker.py OUT --batch-size 4

Batches are SFT-like (padding, prompt tokens masked out of the loss), so the comparison
also checks that the loss is weighted by tokens across processes, not averaged per process;
with `--objective preference` they are preference pairs (DPO), weighted per pair; with
`--objective grpo` groups of replies sampled from the policy (lmpipe.tasks.grpo), rewarded
by a stand-in judge (an even number of words), weighted per token (dapo). `--peft`
trains adapters of that peft method; `--sigkill-at` kills the process outright (SIGKILL)
while it logs that step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lmpipe.data.batches import shuffled_examples
from lmpipe.runs.config import (
    HardwareConfig,
    OptimConfig,
    PeftSettings,
    PreferenceConfig,
    TrainConfig,
)
from lmpipe.runs.tracking import MetricLogger
from lmpipe.taskdata.conversations import IGNORE_INDEX, shuffled_batches
from lmpipe.taskdata.pairs import Pair, PairExample, collate_pairs
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training import adapters, checkpoint
from lmpipe.training.checkpoint import Checkpoints
from lmpipe.training.distributed import all_gather_object, full_model_state
from lmpipe.training.logprobs import reference_logps
from lmpipe.training.loop import seed_everything, setup_hardware, train
from lmpipe.training.pair_losses import PreferenceLoss

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


def pair_examples(count: int = 48) -> list[PairExample]:
    """Pairs of random replies to random prompts; each reply labelled on its own tokens."""
    generator = torch.Generator().manual_seed(11)

    def draw(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, 90, (length,), generator=generator).tolist()

    out = []
    for index in range(count):
        prompt, chosen, rejected = draw(3, 10), draw(2, 12), draw(2, 12)
        rows = [{"input_ids": prompt + reply, "labels": [IGNORE_INDEX] * len(prompt) + reply}
                for reply in (chosen, rejected)]  # fmt: skip
        out.append(PairExample(Pair(str(index), [], "c", "r"), *rows))
    return out


class CrashingLogger(MetricLogger):
    """Every process dies at the same step, like a job killed mid-run (SystemExit), or
    killed outright (SIGKILL: no handler, no cleanup runs)."""

    def __init__(self, crash_at: int | None, sigkill_at: int | None = None) -> None:
        super().__init__(None)
        self.crash_at = crash_at
        self.sigkill_at = sigkill_at

    def log(self, metrics, step, series="train") -> None:
        if step == self.crash_at:
            raise SystemExit(f"crashing at step {step}")
        if step == self.sigkill_at:
            os.kill(os.getpid(), signal.SIGKILL)
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


def grpo_setup(args: argparse.Namespace, device: torch.device, env) -> tuple:
    """A small chat model, 16 arithmetic problems and GRPO's sampled batches and objective;
    the judge is replaced by a stand-in that rewards some replies of a random model."""
    from lmpipe.data.tokenizer import load_tokenizer, train_tokenizer
    from lmpipe.feedback.judge import Verdict
    from lmpipe.runs.config import FinetuneConfig, ModelConfig
    from lmpipe.taskdata.conversations import Conversation
    from lmpipe.tasks import grpo
    from lmpipe.training.model import build_model

    path = args.out.parent / f"{args.out.name}-tokenizer-{env.rank}"
    train_tokenizer(["What is two plus three? It is five.", "Hello, how are you today?"] * 40,
                    vocab_size=300).save_pretrained(path)  # fmt: skip
    tokenizer = load_tokenizer(path)
    seed_everything(0)
    model = build_model(ModelConfig(preset="test", hidden_size=32, num_layers=2, num_heads=2,
                                    num_kv_heads=2, intermediate_size=64, max_seq_len=64),
                        tokenizer)  # fmt: skip
    grpo.judge = lambda reply, answer, steps=False: Verdict(len(reply.split()) % 2 == 0, None,
                                                            "stand-in")  # fmt: skip
    f = FinetuneConfig(task="grpo", batch_size=args.batch_size, grad_accum=args.grad_accum)
    f.grpo.group_size, f.grpo.max_new_tokens = 3, 6
    problems = [Conversation(f"q{i}", [{"role": "user", "content": f"What is {i} plus two?"},
                                       {"role": "assistant", "content": f"#### {i + 2}"}],
                             answer=str(i + 2)) for i in range(16)]  # fmt: skip
    batches = grpo.GroupBatches(model, None, tokenizer, problems, f, 3, device, env.rank,
                                env.world_size)  # fmt: skip
    return model, batches, grpo.GrpoLoss(f.grpo)


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--objective", default="causal_lm",
                        help="causal_lm | preference | grpo")  # fmt: skip
    parser.add_argument("--peft", default="none", help="finetune.peft.method")
    parser.add_argument("--sigkill-at", type=int, help="SIGKILL the process at this step")
    parser.add_argument(
        "--skewed-eval", action="store_true",
        help="validate every step, each rank with its own val losses (they disagree on 'best')",
    )  # fmt: skip
    args = parser.parse_args(argv)

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
        # best checkpoints are written only where they become the model
        final_weights="best" if args.skewed_eval else "last",
        optim=OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1),
    )
    objective = CAUSAL_LM
    batches = shuffled_batches(examples(), args.batch_size, 0, 3, env.rank, env.world_size)
    if args.objective == "preference":
        pairs = pair_examples()
        filled = reference_logps(model, pairs, 8, 0, device)  # the starting model's
        pairs = [PairExample(f, p.chosen, p.rejected) for f, p in zip(filled, pairs, strict=True)]
        batches = shuffled_examples(pairs, args.batch_size, partial(collate_pairs, pad_id=0), 3,
                                    env.rank, env.world_size)  # fmt: skip
        objective = PreferenceLoss(PreferenceConfig(beta=0.5))
    if args.objective == "grpo":
        model, batches, objective = grpo_setup(args, device, env)
    added = None
    if args.peft != "none":
        settings = PeftSettings(
            method=args.peft,
            r=4,
            alpha=8,
            dropout=0.1,
            target_modules=["q_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"] if args.peft == "ia3" else [],
        )
        added = adapters.add_adapters(model, settings, args.steps)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = CrashingLogger(args.crash_at, args.sigkill_at)
    checkpoints = Checkpoints(args.checkpoints, "worker", env) if args.checkpoints else None
    if checkpoints is not None and not env.is_main:
        forbid_checkpoint_reads()
    evaluate = skewed_eval(env.rank) if args.skewed_eval else None
    result = train(model, batches, cfg, hardware, device, metrics, evaluate, checkpoints,
                   env=env, objective=objective,
                   step_hook=added.step_hook if added else None)  # fmt: skip
    best_steps = all_gather_object(result.best_step)
    state = full_model_state(model)
    if env.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        # tied lm_head shares the embedding tensor: store a copy per name
        save_file({k: v.clone() for k, v in state.items()}, args.out / "weights.safetensors")
        rows = metrics.state_dict()["train"]
        losses = [row["train_loss"] for row in rows]
        summary = {"losses": losses, "tokens": result.tokens, "world_size": env.world_size,
                   "resumed_from": result.resumed_from, "best_steps": best_steps,
                   "logged": rows}  # fmt: skip
        if added is not None:  # the adapted model's logits, then the merged model saved
            probe = torch.tensor([list(range(5, 29))])
            model.eval()  # no adapter dropout
            with torch.no_grad():
                save_file({"logits": model(input_ids=probe).logits}, args.out / "probe.safetensors")
            save_file(start, args.out / "start.safetensors")  # the trainable tensors at step 0
            if added.step_hook is not None:
                summary["ranks"] = added.step_hook.ranks()
            added.merged().save_pretrained(args.out / "merged")
        (args.out / "result.json").write_text(json.dumps(summary))
    torch.distributed.destroy_process_group() if env.enabled else None


if __name__ == "__main__":
    main()
