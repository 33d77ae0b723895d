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

import torch
from models import DATA, base_model, config, paired_cell
from omegaconf import DictConfig, OmegaConf

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.evaluation.intervals import paired_binary_summary
from lmpipe.runs.keys import directory_digest, key_of
from lmpipe.runs.processes import process_env
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.base import FinetuningTask
from lmpipe.tasks.finetuning import finetuning_task, prepare_finetuning
from lmpipe.tasks.preference import Preference
from lmpipe.tasks.sft import MOST_FREQUENT, RETRIEVAL
from lmpipe.training.loop import seed_everything, train
from lmpipe.training.model import load_model, save_model

log = logging.getLogger("verifier_preference")

# Per model: the overrides its config comes from.
MODELS = {"tiny": ["finetune=verifier"], "smollm2": ["experiment=smollm2-verifier"]}
CPU = torch.device("cpu")


def trained(
    f: DictConfig, cfg: DictConfig, base: Path, home: Path, task: FinetuningTask
) -> tuple[Path, float]:
    """`task` trained by `f` from `base` into a directory under `home` named by the config
    and the starting model (reused when there), and its seconds."""
    key = key_of({"f": OmegaConf.to_container(f, resolve=True), "seed": cfg.seed,
                  "base": directory_digest(base)})  # fmt: skip
    out = home / f"{f.task}-{f.steps}-{key}"
    if (out / "config.json").is_file():
        log.info("reusing %s", out)
        return out, 0.0
    tokenizer = load_tokenizer(base)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    if isinstance(task, Preference):
        task, _ = task.prepare(f, base, tokenizer, CPU, DATA / "verifier-pairs",
                               process_env(), seed=cfg.seed)  # fmt: skip
    setup = prepare_finetuning(f, base, tokenizer, cfg.seed, CPU, task=task)
    train(setup.model, setup.batches, setup.config, cfg.hardware, CPU, MetricLogger(None),
          setup.evaluate, desc=f"{f.task} {out.name}", objective=setup.objective)  # fmt: skip
    seconds = time.perf_counter() - start
    save_model(setup.final_model(), tokenizer, out)
    return out, seconds


def preference_round(f: DictConfig, steps: int, sft_weight: float) -> DictConfig:
    """`f` as one round of `steps` preference steps from a model already tuned (no SFT
    phase), with `sft_weight` × the chosen replies' NLL (RPO) or without (0: DPO)."""
    f = f.copy()
    f.steps = steps
    f.preference.sft_steps = 0
    f.preference.sft_weight = sft_weight
    return f


def scores(cfg: DictConfig, models: dict[str, Path]) -> tuple[dict, dict]:
    """Exact match with interval of each model and baseline on the test split, and each
    model's per-problem hits (for paired differences)."""
    sft = finetuning_task("sft")
    f = cfg.finetune
    splits = sft.splits(f)
    tokenizer = load_tokenizer(next(iter(models.values())))
    loaded = {label: load_model(path) for label, path in models.items()}
    frame = sft.predict(loaded, tokenizer, splits, f, cfg.evaluate)
    metrics = sft.score(frame, list(models), splits)
    hits = {}
    for label in [*models, RETRIEVAL, MOST_FREQUENT]:
        per_problem = sft.example_scores(frame, f"{label}_exact_match")
        if per_problem is not None:
            hits[label] = per_problem["value"].to_numpy()
    table = {
        label: {key: metrics[f"{label}_exact_match{key}"] for key in ("", "_low", "_high")}
        for label in [*models, RETRIEVAL, MOST_FREQUENT]
    }
    return table, hits


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
    paths[f"sft-{s}"], seconds[f"sft-{s}"] = trained(sft_f, cfg, base, home, sft)
    label = f"sft-{s + d}"
    paths[label], seconds[label] = trained(control_f, cfg, base, home, sft)
    start = paths[f"sft-{s}"]
    # DPO as configured, and (when it has an SFT term) plain DPO beside it.
    weights = {"rpo" if f.preference.sft_weight else "dpo": f.preference.sft_weight}
    if f.preference.sft_weight and plain_dpo:
        weights["dpo"] = 0.0
    preference_arms = [f"{method} x{rounds}" for method in weights for rounds in (1, 2)]
    for method, weight in weights.items():
        one = preference_round(f, d, weight)
        paths[f"{method} x1"], seconds[f"{method} x1"] = trained(one, cfg, start, home, preference)
        half = preference_round(f, d // 2, weight)
        first, first_seconds = trained(half, cfg, start, home, preference)
        paths[f"{method} x2"], second_seconds = trained(half, cfg, first, home, preference)
        seconds[f"{method} x2"] = first_seconds + second_seconds
    table, hits = scores(cfg, paths)
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
