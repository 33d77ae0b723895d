"""Fine-tuning data selection against random subsets, the longest examples and the full data,
measured in one run.

For each base model, the same fine-tuning run (the config's steps, batch, lr and early
stopping on the validation loss; only the training examples differ) on:

  full         every training example
  verifier-filter  (checkable answers) the examples whose reply the answer checker verifies:
               the oracle on noisy data (finetune.reasoning_gym.noise_share)
  dedup+rules  the examples dedup and the quality rules keep (no budget; no dedup on
               generated problems, see `filters`)
  selection    finetune.selection: dedup, quality, IFD, k-center diversity, to the budget
  ifd-rank     dedup, quality, IFD, then the most difficult first to the budget (no diversity)
  random (xN)  seeded random subsets of the budget
  longest      the longest examples to the budget

at two budgets: 25% of the training examples, and 25% of the training tokens (`--units`).
Each tuned model is scored on the held-out test split: response loss (nats/token) and, on a
task with checkable answers (the default, finetune=sft), exact match of the final answer
with its exact 95% interval beside retrieval and the most frequent answer, and each arm's
paired difference on the same problems from the full data and from the first random subset
of its budget (exact interval, McNemar's one-sided p each way); on chat
(finetune=chat) chrF / ROUGE-L of its greedy replies beside the TF-IDF retrieval baseline.
It also times IFD scoring against one plain forward pass over the same batches.

    python benchmarks/sft_selection.py --models tiny       # the demo model (after make demo)
    python benchmarks/sft_selection.py --models smollm2    # SmolLM2-135M-Instruct with LoRA
    python benchmarks/sft_selection.py --models tiny finetune=chat   # Hydra overrides
    python benchmarks/sft_selection.py --models tiny --share 0.5 --units examples \
        finetune.reasoning_gym.noise_share=0.3          # selection where data is noisy
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from models import DATA, base_model, config, paired_cell
from omegaconf import DictConfig, OmegaConf

from lmpipe.data.tokenizer import load_tokenizer
from lmpipe.evaluation.intervals import paired_binary_summary
from lmpipe.feedback.judge import judge
from lmpipe.runs.processes import process_env
from lmpipe.runs.tracking import MetricLogger
from lmpipe.selection.run import select_for_task
from lmpipe.selection.scoring import length_batches, score_candidates
from lmpipe.tasks.finetuning import finetuning_task, prepare_finetuning
from lmpipe.tasks.sft import VERIFIABLE_DATASETS
from lmpipe.training.loop import seed_everything, train
from lmpipe.training.model import load_model

log = logging.getLogger("sft_selection")

# Per model: the experiment its fine-tuning config comes from, and its base.
MODELS = {"tiny": [], "smollm2": ["experiment=smollm2-lora"]}


def filters(f: DictConfig) -> list[str]:
    """The selection steps before ranking. Not dedup on generated problems: their prompts
    share a template and differ in a digit ("... 7 + 5 - 3 =" and "... 7 + 5 - 2 ="), so
    near-duplicate detection (3-gram MinHash at 0.8) calls 91% of chain sums duplicates of
    another, different problem; the generator's splits already hold each question once."""
    steps = ["dedup", "quality"]
    return steps[1:] if f.dataset in VERIFIABLE_DATASETS else steps


# An arm's override that is not a selection setting: keep only the training examples whose
# reply the answer checker verifies (the oracle filter for noisy verifiable data).
VERIFIED_ONLY = "verified_only"


def arms(f: DictConfig, share: float, seeds: int) -> list[tuple[str, str, dict]]:
    """(arm, budget unit, selection overrides) of every run."""
    steps = filters(f)
    runs: list[tuple[str, str, dict]] = [
        ("full", "-", {}),
        ("dedup+rules", "-", {"steps": steps}),
    ]
    if f.dataset in VERIFIABLE_DATASETS:
        runs.append(("verifier-filter", "-", {"steps": steps, VERIFIED_ONLY: True}))
    for unit in ("examples", "tokens"):
        budget = {"budget.unit": unit, "budget.share": share}
        runs += [
            ("selection", unit, {"steps": [*steps, "ifd", "diversity"], **budget}),
            ("ifd-rank", unit, {"steps": [*steps, "ifd"], **budget}),
            *[(f"random-{s}", unit, {**budget, "budget.fill": "random", "seed": s})
              for s in range(seeds)],
            ("longest", unit, {**budget, "budget.fill": "longest"}),
        ]  # fmt: skip
    return runs


def scoring_rate(task, f: DictConfig, base: Path, tokenizer, device: torch.device) -> dict:
    """Examples/s of IFD scoring (two passes, embeddings) against one plain forward pass of
    the model over the same batches."""
    candidates = task.candidates(f, tokenizer)
    model = task.scoring_model(base).to(device).eval()
    pad = tokenizer.pad_token_id
    start = time.perf_counter()
    score_candidates(model, candidates, f.selection.batch_size, pad, device, losses=True)
    scoring = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for _, batch in length_batches([c.example for c in candidates], f.selection.batch_size,
                                       pad):  # fmt: skip
            model(input_ids=batch["input_ids"].to(device),
                  attention_mask=batch["attention_mask"].to(device))  # fmt: skip
    plain = time.perf_counter() - start
    n = len(candidates)
    return {"examples": n, "scoring_examples_per_s": n / scoring,
            "forward_examples_per_s": n / plain, "ratio": plain / scoring}  # fmt: skip


def verified_ids(task, f: DictConfig) -> set[str]:
    """The training examples whose reply the answer checker verifies."""
    return {c.id for c in task.splits(f)["train"]
            if judge(c.messages[-1]["content"], c.answer).correct}  # fmt: skip


def fine_tune_and_score(
    task, cfg: DictConfig, base: Path, tokenizer, device: torch.device, overrides: dict
) -> dict:
    f = cfg.finetune.copy()
    overrides = dict(overrides)
    verified_only = overrides.pop(VERIFIED_ONLY, False)
    for key, value in overrides.items():
        OmegaConf.update(f, f"selection.{key}", value)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    chosen = select_for_task(task, f, base, tokenizer, device, cfg.seed,
                             DATA / "selection-scores", process_env())  # fmt: skip
    ids = chosen.selected_ids
    checked = {}
    if task.answers_checkable(f):  # the share of chosen replies the checker rejects (noise)
        right = verified_ids(task, f)
        if verified_only:
            ids = [i for i in ids if i in right]
        checked["wrong_replies"] = sum(i not in right for i in ids) / max(len(ids), 1)
    setup = prepare_finetuning(f, base, tokenizer, cfg.seed, device, train_ids=ids)
    result = train(setup.model, setup.batches, setup.config, cfg.hardware, device,
                   MetricLogger(None), setup.evaluate, desc="finetune",
                   objective=setup.objective)  # fmt: skip
    model = setup.final_model()
    seconds = time.perf_counter() - start
    return {
        "examples": len(ids),
        "tokens": int(chosen.table.loc[chosen.table["id"].isin(ids), "tokens"].sum()),
        "best_step": result.best_step,
        **checked,
        **held_out(task, cfg, model, tokenizer, "tuned"),
        "seconds": seconds,
    }


# Per kind of held-out reply score: the metrics of the model and of the baselines reported.
QUALITY = {
    "exact_match": ["exact_match", "exact_match_low", "exact_match_high"],
    "chrf": ["chrf", "rougeL"],
}


def held_out(task, cfg: DictConfig, model, tokenizer, label: str) -> dict:
    """Test loss and reply quality of `model`: exact match with its interval where answers
    are checkable (beside retrieval and the most frequent answer), else chrF and ROUGE-L
    (beside retrieval)."""
    splits = task.splits(cfg.finetune)
    frame = task.predict({label: model}, tokenizer, splits, cfg.finetune, cfg.evaluate)
    scores = task.score(frame, [label], splits)
    kind = "exact_match" if f"{label}_exact_match" in scores else "chrf"
    row = {"test_loss": scores[f"{label}_sft_test_loss"]}
    row |= {key: scores[f"{label}_{key}"] for key in QUALITY[kind]}
    if kind == "exact_match":  # per problem, in the test split's order, for paired differences
        row["hits"] = task.example_scores(frame, f"{label}_exact_match")["value"].tolist()
    for baseline in ("retrieval", "most_frequent"):
        row |= {f"{baseline}_{key}": scores[f"{baseline}_{key}"] for key in QUALITY[kind]
                if f"{baseline}_{key}" in scores}  # fmt: skip
    return row


def before_tuning(task, cfg: DictConfig, base: Path, tokenizer) -> dict:
    return held_out(task, cfg, load_model(base), tokenizer, "base")


def quality_kind(row: dict) -> str:
    return "exact_match" if "exact_match" in row else "chrf"


def paired_differences(rows: list[dict]) -> None:
    """Add to each arm's row (in place) its paired difference on the same test problems from
    the full data (`vs_full`) and from the first random subset of its budget (`vs_random`)."""
    controls = {("full", "-"): "vs_full"}
    references = {name: next((r for r in rows if (r["arm"], r["unit"]) == key), None)
                  for key, name in controls.items()}  # fmt: skip
    for row in rows:
        if "hits" not in row:
            continue
        random_first = next((r for r in rows if r["arm"] == "random-0"
                             and r["unit"] == row["unit"]), None)  # fmt: skip
        for name, control in [*references.items(), ("vs_random", random_first)]:
            if control is None or control is row or "hits" not in control:
                continue
            row |= paired_binary_summary(row["hits"], control["hits"], name)


def summary(rows: list[dict]) -> list[dict]:
    """Random arms folded into mean and spread (sample standard deviation)."""
    out, randoms = [], {}
    for row in rows:
        if row["arm"].startswith("random-"):
            randoms.setdefault(row["unit"], []).append(row)
        else:
            out.append(row)
    for unit, group in randoms.items():
        folded = {"arm": f"random (x{len(group)})", "unit": unit}
        kind = quality_kind(group[0])
        checked = ["wrong_replies"] if "wrong_replies" in group[0] else []
        for key in ("examples", "tokens", "test_loss", *checked, *QUALITY[kind]):
            values = [r[key] for r in group]
            folded[key] = statistics.mean(values)
            folded[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(folded)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2")
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--arms", default=None, help="comma-separated arm names to run (default: all)"
    )
    parser.add_argument("--units", default="examples,tokens",
                        help="budget units, comma-separated: examples, tokens")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DATA / "sft_selection.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("lmpipe.training.loop", "lmpipe.taskdata.conversations", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = torch.device("cpu")
    report: dict = {"date": time.strftime("%Y-%m-%d"), "share": args.share, "models": {}}
    for name in args.models.split(","):
        # every test prompt answered
        cfg = config([*MODELS[name], "evaluate.num_generations=null", *args.overrides])
        base = base_model(name, cfg)
        tokenizer = load_tokenizer(base)
        task = finetuning_task("sft")
        entry: dict = {"scoring": scoring_rate(task, cfg.finetune, base, tokenizer, device)}
        log.info("%s scoring: %s", name, entry["scoring"])
        entry["before_tuning"] = before_tuning(task, cfg, base, tokenizer)
        log.info("%s before tuning: %s", name, entry["before_tuning"])
        rows = []
        wanted = set(args.arms.split(",")) if args.arms else None
        units = args.units.split(",")
        for arm, unit, overrides in arms(cfg.finetune, args.share, args.seeds):
            if (wanted is not None and arm not in wanted) or unit not in ("-", *units):
                continue
            scores = fine_tune_and_score(task, cfg, base, tokenizer, device, overrides)
            row = {"arm": arm, "unit": unit, **scores}
            log.info("%s %s", name, json.dumps(row))
            rows.append(row)
        paired_differences(rows)
        entry["runs"] = rows
        entry["summary"] = summary(rows)
        report["models"][name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    for name, entry in report["models"].items():
        print_model(name, entry)


def print_model(name: str, entry: dict) -> None:
    s = entry["scoring"]
    print(
        f"\n## {name}  (scoring {s['scoring_examples_per_s']:.0f} ex/s vs forward "
        f"{s['forward_examples_per_s']:.0f} ex/s: ratio {s['ratio']:.2f}, target >= 0.4)"
    )
    b = entry["before_tuning"]
    exact = quality_kind(b) == "exact_match"
    if exact:
        print(f"before tuning: test loss {b['test_loss']:.3f}, exact match "
              f"{interval(b, 'exact_match')}; retrieval {interval(b, 'retrieval_exact_match')}, "
              f"most frequent answer {interval(b, 'most_frequent_exact_match')}")  # fmt: skip
        print("| budget | arm | examples | tokens | wrong replies | test loss | exact match "
              "[95% CI] | minus full data [95% CI], p | minus random-0 [95% CI], p |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
    else:
        print(f"before tuning: test loss {b['test_loss']:.3f}, chrF {b['chrf']:.1f}, "
              f"ROUGE-L {b['rougeL']:.3f}; retrieval baseline chrF {b['retrieval_chrf']:.1f}, "
              f"ROUGE-L {b['retrieval_rougeL']:.3f}")  # fmt: skip
        print("| budget | arm | examples | tokens | test loss | chrF | ROUGE-L |")
        print("|---|---|---|---|---|---|---|")
    for row in entry["summary"]:

        def cell(key: str, fmt: str, row: dict = row) -> str:
            value = format(row[key], fmt)
            return f"{value} ± {format(row[key + '_sd'], fmt)}" if key + "_sd" in row else value

        quality = (
            (cell("wrong_replies", ".3f") + " | " if "wrong_replies" in row else " | ")
            + cell("test_loss", ".3f") + " | "
            + (interval(row, "exact_match") if "exact_match_sd" not in row
               else cell("exact_match", ".3f"))
            + f" | {paired_cell(row, 'vs_full')} | {paired_cell(row, 'vs_random')}"
            if exact else f"{cell('test_loss', '.3f')} | {cell('chrf', '.1f')} | "
            f"{cell('rougeL', '.3f')}"
        )  # fmt: skip
        print(f"| {row['unit']} | {row['arm']} | {cell('examples', '.0f')} | "
              f"{cell('tokens', '.0f')} | {quality} |")  # fmt: skip


def interval(row: dict, key: str) -> str:
    return f"{row[key]:.3f} [{row[key + '_low']:.3f}, {row[key + '_high']:.3f}]"


if __name__ == "__main__":
    main()
