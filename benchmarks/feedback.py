"""Learning from feedback on the model's own outputs against SFT alone, every arm from the
same SFT model, in one run per model and setting.

On a verifiable task (chain sums with worked replies; `--setting demo` is the demo's three
one-digit terms, `hard` four terms of up to two digits), per base model:

  start            S SFT steps (--sft-steps, at the SFT config's lr): every arm starts here
  control N        SFT continued for N steps, as many as an arm took: the control for the
                   same optimizer steps
  control cpu      SFT continued for the CPU seconds of the costliest arm
  rs xR            rejection sampling for R rounds of D steps (finetune.rejection_sampling:
                   the replies the checker verifies, their working too)
  grpo             D GRPO steps (finetune.grpo)
  rpo              D steps of DPO with the chosen replies' NLL on verifier pairs
  kto              D KTO steps on the start's own replies, judged
  self-correction  one round of D steps on its verified revisions after the verifier's
                   step words (finetune.self_correction), scored at attempt 1 and at
                   attempt 2 beside the start and the control given the same words

Each arm's settings are the shipped recipe's (conf/finetune/<method>.yaml, its group of
finetune.*, with the model config's batch size, LoRA and data), its steps D and its lr as
given: `--arm "grpo:optim.lr=3e-4,grpo.group_size=4"` adds a configuration (any finetune.*
key), each labelled by what it changes, so every configuration tried is in the report
(the JSON accumulates across runs). Each is scored by exact match of the final answer on
every held-out test problem with its exact 95% interval, and its paired difference from the
control with the same steps, from the CPU-time control and from the start: the exact
interval and McNemar's one-sided p that it is better. CPU seconds include sampling.

    python benchmarks/feedback.py --model tiny --setting demo      # after make demo
    python benchmarks/feedback.py --model tiny --setting hard
    python benchmarks/feedback.py --model smollm2 --setting demo   # SmolLM2-135M, LoRA
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import yaml
from models import DATA, ROOT, Trained, base_model, config, paired_cell, scores, trained
from omegaconf import DictConfig, OmegaConf

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.evaluation.intervals import paired_binary_summary
from lmpipe.feedback import revisions, rollouts
from lmpipe.tasks.finetuning import finetuning_task
from lmpipe.tasks.sft import sft_phase_config
from lmpipe.training.model import load_model

log = logging.getLogger("feedback")

# Per model: the overrides its config comes from (SFT settings, data sizes, LoRA).
MODELS = {
    "tiny": ["finetune=sft"],
    "smollm2": ["experiment=smollm2-verifier", "finetune.task=sft"],
}
# Per setting: the chain sums' difficulty.
SETTINGS = {
    "demo": [],
    "hard": [
        "finetune.reasoning_gym.options.min_terms=4",
        "finetune.reasoning_gym.options.max_terms=4",
        "finetune.reasoning_gym.options.max_digits=2",
    ],
}
# Arm -> (task, the recipe file whose finetune.<group> settings it takes, that group).
METHODS = {
    "rs": ("rejection_sampling", "rejection_sampling", "rejection_sampling"),
    "grpo": ("grpo", "grpo", "grpo"),
    "rpo": ("preference", "verifier", "preference"),
    "kto": ("kto", "kto", "kto"),
    "self-correction": ("self_correction", "self_correction", "self_correction"),
}
DEFAULT_ARMS = ["rs", "grpo", "rpo", "kto", "self-correction"]
KIND = "step"  # self-correction's second turn in the table (every kind is in the JSON)


def recipe(name: str) -> dict:
    """conf/finetune/<name>.yaml's own keys (its defaults list left out)."""
    settings = yaml.safe_load((ROOT / "conf" / "finetune" / f"{name}.yaml").read_text())
    settings.pop("defaults", None)
    return settings


def arm_config(f: DictConfig, method: str, steps: int, changes: dict[str, str]) -> DictConfig:
    """`f` (the model's SFT settings) as one run of `method` for `steps` steps from a tuned
    model: the recipe's group settings and lr, no SFT phase of its own, then `changes`."""
    task, recipe_name, group = METHODS[method]
    shipped = recipe(recipe_name)
    arm = f.copy()
    arm.task = task
    arm[group] = OmegaConf.merge(arm[group], shipped.get(group, {}))
    arm[group].sft_steps = 0
    if "max_len" in shipped:
        arm.max_len = shipped["max_len"]
    arm.optim.lr = shipped.get("optim", {}).get("lr", arm.optim.lr)
    arm.optim.warmup_steps = shipped.get("optim", {}).get("warmup_steps", arm.optim.warmup_steps)
    arm.steps = steps
    arm.final_weights, arm.early_stopping_patience = "last", None
    arm.eval_every = arm.checkpoint_every = steps
    for key, value in changes.items():
        OmegaConf.update(arm, key, yaml.safe_load(value), merge=False)
    return arm


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """ "grpo:optim.lr=3e-4,grpo.group_size=4" -> ("grpo", {...})."""
    method, _, rest = text.partition(":")
    if method not in METHODS:
        raise SystemExit(f"unknown arm {method!r} (known: {sorted(METHODS)})")
    changes = dict(item.split("=", 1) for item in rest.split(",") if item)
    return method, changes


def label_of(method: str, changes: dict[str, str], rounds: int | None = None) -> str:
    name = method if rounds is None else f"{method} x{rounds}"
    return name + "".join(f" {k.split('.')[-1]}={v}" for k, v in changes.items())


def continued_sft(f: DictConfig, steps: int, lr: float) -> DictConfig:
    """The control: SFT from the start for `steps` more steps at `lr`."""
    control = sft_phase_config(f, steps, lr)
    control.final_weights, control.early_stopping_patience = "last", None
    control.eval_every = control.checkpoint_every = steps
    return control


def run(model: str, setting: str, args: argparse.Namespace) -> dict:
    cfg = config([*MODELS[model], *SETTINGS[setting], "evaluate.num_generations=null",
                  *args.overrides])  # fmt: skip
    f = cfg.finetune
    base = base_model(model, cfg)
    home = DATA / "feedback" / model / setting
    sft = finetuning_task("sft")
    d = args.steps
    start = trained(sft_phase_config(f, args.sft_steps, f.optim.lr), cfg, base, home, sft)
    runs: dict[str, Trained] = {"start": start}
    steps_of: dict[str, int] = {}
    control_lr = args.control_lr or f.optim.lr

    def control(steps: int | str) -> str:
        """The control's label: its steps (or cpu), and its lr where it is not SFT's."""
        return f"control {steps}" + (f" lr={control_lr:g}" if args.control_lr else "")

    arms = [parse_arm(a) for a in (args.arm or DEFAULT_ARMS)]
    round_figures: dict[str, list[dict]] = {}
    for method, changes in arms:
        arm_f = arm_config(f, method, d, changes)
        task = finetuning_task(arm_f.task)
        if method != "rs":
            label = label_of(method, changes)
            runs[label] = trained(arm_f, cfg, start.path, home, task)
            steps_of[label] = arm_f.steps
            if runs[label].table is not None:
                round_figures[label] = [task.round_metrics(runs[label].table)]
            continue
        if arm_f.rejection_sampling.restart != "current":
            raise SystemExit("the benchmark's rounds each train from the model that sampled "
                             "(rejection_sampling.restart=current)")  # fmt: skip
        current, wall, cpu, figures = start.path, 0.0, 0.0, []
        for rounds in range(1, args.rounds + 1):
            done = trained(arm_f, cfg, current, home, task)
            label = label_of(method, changes, rounds)
            wall, cpu = wall + done.seconds, cpu + done.cpu_seconds
            figures.append(task.round_metrics(done.table))
            runs[label] = Trained(done.path, wall, cpu, done.means, done.table)
            steps_of[label] = rounds * arm_f.steps
            round_figures[label] = list(figures)
            current = done.path
    # The controls: SFT continued for each arm's optimizer steps, and for the CPU seconds of
    # the costliest arm (sampling included).
    arm_labels = list(steps_of)
    for steps in sorted(set(steps_of.values())):
        runs[control(steps)] = trained(continued_sft(f, steps, control_lr), cfg, start.path,
                                       home, sft)  # fmt: skip
        steps_of[control(steps)] = steps
    costliest = max(runs[label].cpu_seconds for label in arm_labels)
    fewest = min(set(steps_of.values()))
    per_step = runs[control(fewest)].cpu_seconds / fewest
    cpu_steps = max(fewest, round(costliest / per_step))
    runs[control("cpu")] = trained(continued_sft(f, cpu_steps, control_lr), cfg, start.path,
                                   home, sft)  # fmt: skip
    steps_of[control("cpu")] = cpu_steps
    table, hits, frame = scores(cfg, {label: r.path for label, r in runs.items()})
    for arm, row in table.items():
        if arm not in runs:
            continue
        row |= {"seconds": runs[arm].seconds, "cpu_seconds": runs[arm].cpu_seconds,
                "steps": steps_of.get(arm, 0)}  # fmt: skip
        if "frac_reward_zero_std" in runs[arm].means:
            row["frac_reward_zero_std"] = runs[arm].means["frac_reward_zero_std"]
            row["reward"] = runs[arm].means.get("reward")
        if arm in round_figures:
            row["rounds"] = round_figures[arm]
        if arm == "start":
            continue
        others = {"vs_control": control(steps_of[arm]), "vs_control_cpu": control("cpu"),
                  "vs_start": "start"}  # fmt: skip
        for name, other in others.items():
            if not arm.startswith("control") or name == "vs_start":
                row |= paired_binary_summary(hits[arm], hits[other], name)
                row[f"{name}_against"] = other
    corrections = second_attempts(cfg, runs, frame, [a for a in runs if a.startswith("self")],
                                  {a: control(steps_of[a]) for a in steps_of})  # fmt: skip
    return {"setting": setting, "overrides": list(args.overrides), "sft_steps": args.sft_steps,
            "steps": d,
            "test_problems": len(hits["start"]), "config": OmegaConf.to_container(f),
            "arms": table, "self_correction": corrections}  # fmt: skip


def second_attempts(
    cfg: DictConfig, runs: dict[str, Trained], frame: pd.DataFrame, arms: list[str],
    control_of: dict[str, str],
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Attempt 1 and 2 after each kind of second turn, for the start, the control with the
    same steps and each self-correction arm; and each arm's attempt 2 against the
    control's attempt 2 after the same words (McNemar)."""
    e = cfg.evaluate
    answered = frame[frame["generated"]]
    prompts = answered["prompt"].tolist()
    answers = answered["answer"].astype(str).tolist()
    sampling = rollouts.Sampling(e.max_new_tokens)
    controls = {control_of[arm] for arm in arms}
    results = {}
    for label in ["start", *sorted(controls), *arms]:
        model = load_model(runs[label].path)
        tokenizer = load_tokenizer(runs[label].path)
        results[label] = {}
        for kind in revisions.TURN_KINDS:
            results[label][kind] = revisions.two_attempts(
                model, tokenizer, prompts, answers, kind, sampling, batch_size=e.batch_size,
                firsts=answered[f"{label}_reply"].tolist(),
            )  # fmt: skip
    report: dict[str, dict[str, float]] = {}
    for label, by_kind in results.items():
        row: dict[str, float] = {}
        for kind, attempts in by_kind.items():
            first = [a.first_correct for a in attempts]
            second = [a.second_correct for a in attempts]
            row |= revisions.correction_scores(first, second, kind)
            if label in arms:
                same_steps = results[control_of[label]][kind]
                control = [a.second_correct for a in same_steps]
                row |= paired_binary_summary(second, control, f"{kind}_vs_control")
        report[label] = row
    return report


def interval_cell(row: dict, name: str, signed: bool = False) -> str:
    """`name` of a report row with its interval, as a table cell."""
    shown = "+.3f" if signed else ".3f"
    return (f"{row[name]:{shown}} [{row[name + '_low']:{shown}}, "
            f"{row[name + '_high']:{shown}}]")  # fmt: skip


def show(entry: dict, model: str) -> None:
    print(
        f"\n## {model}, {entry['setting']} {' '.join(entry.get('overrides', []))}: "
        f"{entry['sft_steps']} SFT steps, then "
        f"{entry['steps']} steps per arm (per round); {entry['test_problems']} test problems"
    )
    print(
        "| arm | steps | exact match [95% CI] | minus the control, same steps [95% CI], "
        "McNemar p | minus the control, same CPU time | minus the start | CPU s |"
    )
    print("|---|---|---|---|---|---|---|")
    for arm, row in entry["arms"].items():
        cells = [paired_cell(row, n) for n in ("vs_control", "vs_control_cpu", "vs_start")]
        cpu = f"{row['cpu_seconds']:.0f}" if "cpu_seconds" in row else ""
        extra = ""
        if "frac_reward_zero_std" in row:
            extra = (f" (reward {row['reward']:.2f}, frac_reward_zero_std "
                     f"{row['frac_reward_zero_std']:.2f})")  # fmt: skip
        print(f"| {arm}{extra} | {row.get('steps', '')} | {interval_cell(row, '')} | "
              f"{' | '.join(cells)} | {cpu} |")  # fmt: skip
    if not entry["self_correction"]:
        return
    print(
        "\n| model | second turn | attempt 1 | attempt 2 [95% CI] | Δi→c | Δc→i | "
        "attempt 2 minus the control's attempt 2, McNemar p |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, row in entry["self_correction"].items():
        for kind in revisions.TURN_KINDS:
            versus = paired_cell(row, f"{kind}_vs_control")
            print(f"| {label} | {kind} | {row[kind + '_attempt1']:.3f} | "
                  f"{interval_cell(row, kind + '_attempt2')} | "
                  f"{row[kind + '_delta_i_to_c']:.3f} | {row[kind + '_delta_c_to_i']:.3f} | "
                  f"{versus} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
    parser.add_argument("--setting", default="demo", choices=sorted(SETTINGS))
    parser.add_argument("--sft-steps", type=int, default=600, help="S: the shared start")
    parser.add_argument("--steps", type=int, default=400, help="D: steps per arm and round")
    parser.add_argument("--rounds", type=int, default=3, help="rejection sampling: rounds")
    parser.add_argument("--control-lr", type=float, default=None,
                        help="the controls' lr (default: the SFT config's)")  # fmt: skip
    parser.add_argument("--arm", action="append",
                        help='method[:key=value,...], repeatable (default: each method as '
                             'shipped)')  # fmt: skip
    parser.add_argument("--out", type=Path, default=DATA / "feedback.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the model's config")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("lmpipe.training.loop", "lmpipe.taskdata.conversations", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    # One entry per model, setting, overrides and start: its arms accumulate across runs.
    key = "/".join([args.model, args.setting, *args.overrides, f"sft{args.sft_steps}",
                    f"d{args.steps}"])  # fmt: skip
    entry = run(args.model, args.setting, args)
    old = report["runs"].get(key, {"arms": {}, "self_correction": {}})
    entry["arms"] = {**old["arms"], **entry["arms"]}  # every configuration tried stays
    entry["self_correction"] = {**old["self_correction"], **entry["self_correction"]}
    entry["date"] = time.strftime("%Y-%m-%d")
    report["runs"][key] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    show(entry, args.model)


if __name__ == "__main__":
    main()
