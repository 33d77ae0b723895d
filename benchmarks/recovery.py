"""Recovery after structured pruning, against the skeptic's control, in one run: the demo's
fine-tuned model pruned (`deploy.prune`), then `--steps` recovery steps with distillation
from the dense model (the default objective), with the labels alone, and none; beside the
dense model itself and the dense model fine-tuned for the same extra steps at the same lr
(a gain that also comes to an unpruned model is no recovery). Each on finetune's validation
split and on the held-out test split (response loss, and exact match with its interval).

    python benchmarks/recovery.py                         # after `make demo`
    python benchmarks/recovery.py --steps 200 deploy.prune.mlp_ratio=0.75
    python benchmarks/recovery.py --model-dir <a project's outputs/finetune/model> \
        --steps 40 experiment=smollm2-lora deploy.prune.mlp_ratio=0.1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from models import ROOT, config
from omegaconf import OmegaConf

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.deploy.compress import compress, loss_of, recovery_config
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.finetuning import checked_task, prepare_finetuning
from lmpipe.training.loop import seed_everything, train

CPU = torch.device("cpu")


def held_out(task, c, model, tokenizer, splits) -> dict[str, float]:
    frame = task.predict({"model": model}, tokenizer, splits, c.finetune, c.evaluate)
    scores = task.score(frame, ["model"], splits)
    return {k.removeprefix("model_"): v for k, v in scores.items() if k.startswith("model_")}


def dense_arm(task, c, steps: int, model_dir: Path) -> dict[str, float]:
    """The dense model, and fine-tuned `steps` more steps as recovery would be."""
    tokenizer = load_tokenizer(model_dir)
    splits = task.splits(c.finetune)
    prune = OmegaConf.merge(c.deploy.prune, {"recovery_steps": steps})
    r = recovery_config(c.finetune, prune, task.supervised_task().name)
    setup = prepare_finetuning(r, model_dir, tokenizer, c.seed, CPU, task=task.supervised_task())
    rows = {"dense": {"val_loss": loss_of(setup.evaluate(setup.model)),
                      **held_out(task, c, setup.model, tokenizer, splits)}}  # fmt: skip
    if steps:
        start = time.perf_counter()
        train(setup.model, setup.batches, r, c.hardware, CPU, MetricLogger(None),
              setup.evaluate, objective=setup.objective, desc="dense control")  # fmt: skip
        rows[f"dense + {steps} steps (control)"] = {
            "val_loss": loss_of(setup.evaluate(setup.model)),
            **held_out(task, c, setup.model, tokenizer, splits),
            "seconds": time.perf_counter() - start,
        }
    return rows


def pruned_arm(
    task, c, weight: float | None, steps: int, out: str, model_dir: Path
) -> dict[str, float]:
    recovery = {"recovery_steps": steps if weight is not None else 0,
                "distill_weight": weight or 0.0}  # fmt: skip
    c = OmegaConf.merge(c, {"deploy": {"prune": recovery}})
    start = time.perf_counter()
    result = compress(model_dir, task, task.splits(c.finetune), c, device=CPU,
                      out_dir=ROOT / "benchmarks" / ".data" / "recovery" / out,
                      metrics=MetricLogger(None))  # fmt: skip
    m = result.metrics
    val = m.get("prune.pruned_val_loss", m["prune.pruned_val_loss_before_recovery"])
    scores = {k.removeprefix("pruned_"): v for k, v in m.items()
              if k.startswith("pruned_") and not k.startswith("pruned_int8")}  # fmt: skip
    return {"val_loss": val, **scores, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=ROOT / "outputs" / "finetune" / "model",
        help="the fine-tuned model (default: the demo's)",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    c = config(["deploy.sparsity.levels=[]", "deploy.quantize.variants=[]",
                "deploy.prune.recovery_lr=5e-4", *args.overrides])  # fmt: skip
    task = checked_task(c)
    seed_everything(c.seed)
    rows = dense_arm(task, c, args.steps, args.model_dir)
    p = c.deploy.prune
    for label, weight in (("pruned, no recovery", None),
                          (f"pruned + {args.steps} steps, labels alone", 0.0),
                          (f"pruned + {args.steps} steps, distilled (w {p.distill_weight}, "
                           f"T {p.distill_temperature})", p.distill_weight)):  # fmt: skip
        seed_everything(c.seed)
        rows[label] = pruned_arm(task, c, weight, args.steps, label.split(",")[0], args.model_dir)
    print(f"\nMLP {p.mlp_ratio:.0%} pruned, recovery lr {p.recovery_lr:g}, "
          f"{args.steps} steps of {c.finetune.batch_size}")  # fmt: skip
    print("| model | val loss | test loss | exact match [95% CI] | seconds |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        em = r.get("exact_match")
        shown = (f"{em:.3f} [{r['exact_match_low']:.3f}, {r['exact_match_high']:.3f}]"
                 if em is not None else "-")  # fmt: skip
        print(f"| {label} | {r['val_loss']:.4f} | {r['sft_test_loss']:.4f} | {shown} | "
              f"{r.get('seconds', 0):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
