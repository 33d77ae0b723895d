"""Preference optimisation on verifier pairs against SFT alone, measured in one run.

On the verifiable task of `finetune=verifier` (chain sums with worked replies), per base model:

  base            the model before tuning
  sft-S           S SFT steps (finetune.preference.sft_steps): the start and the reference
  sft-(S+D)       SFT alone for the same total steps: the control
  dpo x1          sft-S, then D DPO steps on pairs sampled from sft-S and judged by the
                  answer checker
  dpo x2          sft-S, then D/2 DPO steps, then D/2 more on pairs sampled from the first
                  round's model (which is the second round's reference)
  rpo x1, rpo x2  the same with finetune.preference.sft_weight × the chosen replies' NLL
                  added (RPO; when the config sets it)

Each is scored by exact match of the final answer on every held-out test problem, with its
exact 95% interval, and its paired difference from the control and (preference arms) from
sft-S on the same problems: the exact interval and McNemar's one-sided p that it is better;
beside the most frequent training answer and retrieval (the answer of the most similar
training question).

    python benchmarks/verifier_preference.py --models tiny      # after make demo
    python benchmarks/verifier_preference.py --models smollm2   # SmolLM2-135M-Instruct, LoRA
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from models import DATA, base_model, config, paired_cell, scores, trained
from omegaconf import DictConfig, OmegaConf

from lmpipe.evaluation.intervals import paired_binary_summary
from lmpipe.tasks.finetuning import finetuning_task

log = logging.getLogger("verifier_preference")

# Per model: the overrides its config comes from.
MODELS = {"tiny": ["finetune=verifier"], "smollm2": ["experiment=smollm2-verifier"]}


def preference_round(f: DictConfig, steps: int, sft_weight: float) -> DictConfig:
    """`f` as one round of `steps` preference steps from a model already tuned (no SFT
    phase), with `sft_weight` × the chosen replies' NLL (RPO) or without (0: DPO)."""
    f = f.copy()
    f.steps = steps
    f.preference.sft_steps = 0
    f.preference.sft_weight = sft_weight
    return f


def run(name: str, extra: list[str], plain_dpo: bool = True) -> dict:
    cfg = config([*MODELS[name], "evaluate.num_generations=null", *extra])
    f = cfg.finetune
    base = base_model(name, cfg)
    home = DATA / "verifier" / name
    preference = finetuning_task("preference")
    sft_f = preference.sft_first(f)
    if sft_f is None:
        raise SystemExit("finetune.preference.sft_steps is 0: there is no SFT phase to compare")
    s, d = sft_f.steps, f.steps
    control_f = sft_f.copy()
    control_f.steps = s + d
    sft = finetuning_task("sft")
    seconds: dict[str, float] = {}
    paths: dict[str, Path] = {"base": base}
    for label, arm_f in ((f"sft-{s}", sft_f), (f"sft-{s + d}", control_f)):
        done = trained(arm_f, cfg, base, home, sft)
        paths[label], seconds[label] = done.path, done.seconds
    start = paths[f"sft-{s}"]
    # DPO as configured, and (when it has an SFT term) plain DPO beside it.
    weights = {"rpo" if f.preference.sft_weight else "dpo": f.preference.sft_weight}
    if f.preference.sft_weight and plain_dpo:
        weights["dpo"] = 0.0
    preference_arms = [f"{method} x{rounds}" for method in weights for rounds in (1, 2)]
    for method, weight in weights.items():
        one = preference_round(f, d, weight)
        done = trained(one, cfg, start, home, preference)
        paths[f"{method} x1"], seconds[f"{method} x1"] = done.path, done.seconds
        half = preference_round(f, d // 2, weight)
        first = trained(half, cfg, start, home, preference)
        second = trained(half, cfg, first.path, home, preference)
        paths[f"{method} x2"] = second.path
        seconds[f"{method} x2"] = first.seconds + second.seconds
    table, hits, _ = scores(cfg, paths)
    # Paired differences on the same problems: from SFT alone for the same steps (the
    # control) and, for the preference arms, from the model they started from.
    against = {"vs_control": hits[label], "vs_start": hits[f"sft-{s}"]}
    for arm, row in table.items():
        for name, other in against.items():
            if (
                arm not in hits
                or arm == label
                or (name == "vs_start" and arm not in preference_arms)
            ):
                continue
            row |= paired_binary_summary(hits[arm], other, name)
        row["seconds"] = seconds.get(arm)
    return {"sft_steps": s, "preference_steps": d, "test_problems": len(hits[label]),
            "config": OmegaConf.to_container(f, resolve=True), "arms": table}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2")
    parser.add_argument("--out", type=Path, default=DATA / "verifier_preference.json")
    parser.add_argument(
        "--skip-plain-dpo",
        action="store_true",
        help="with an SFT term configured, do not also run DPO without it",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("lmpipe.training.loop", "lmpipe.taskdata.conversations", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "models": {}}
    for name in args.models.split(","):
        report["models"][name] = run(name, args.overrides, not args.skip_plain_dpo)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    for name, entry in report["models"].items():
        print(f"\n## {name}: {entry['sft_steps']} SFT steps, then {entry['preference_steps']} "
              f"preference steps; {entry['test_problems']} test problems")  # fmt: skip
        print("| arm | exact match [95% CI] | minus the control [95% CI], McNemar p | minus "
              "its start [95% CI], McNemar p | CPU s |")  # fmt: skip
        print("|---|---|---|---|---|")
        for arm, row in entry["arms"].items():
            control, start = (paired_cell(row, name) for name in ("vs_control", "vs_start"))
            secs = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
            print(f"| {arm} | {row['']:.3f} [{row['_low']:.3f}, {row['_high']:.3f}] | {control} "
                  f"| {start} | {secs} |")  # fmt: skip


if __name__ == "__main__":
    main()
