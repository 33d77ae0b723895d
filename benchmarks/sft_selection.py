"""Fine-tuning data selection against random subsets, the longest examples and the full data,
measured in one run.

For each base model, the same fine-tuning run (the config's steps, batch, lr and early
stopping on the validation loss; only the training examples differ) on:

  full         every training example
  dedup+rules  the examples dedup and the quality rules keep (no budget)
  selection    finetune.selection: dedup, quality, IFD, k-center diversity, to the budget
  ifd-rank     dedup, quality, IFD, then the most difficult first to the budget (no diversity)
  random (xN)  seeded random subsets of the budget
  longest      the longest examples to the budget

at two budgets: 25% of the training examples, and 25% of the training tokens. Each tuned
model is scored on the held-out test split: response loss (nats/token) and chrF / ROUGE-L
of its greedy replies, beside the model before tuning and the TF-IDF retrieval baseline.
It also times IFD scoring against one plain forward pass over the same batches.

    python benchmarks/sft_selection.py --models tiny       # the demo model (after make demo)
    python benchmarks/sft_selection.py --models smollm2    # SmolLM2-135M-Instruct with LoRA
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from lmpipe import tasks
from lmpipe.data.tokenizer import base_tokenizer, load_tokenizer
from lmpipe.runs.config import validate
from lmpipe.runs.processes import process_env
from lmpipe.runs.tracking import MetricLogger
from lmpipe.selection.run import select_for_task
from lmpipe.selection.scoring import length_batches, score_candidates
from lmpipe.training.loop import seed_everything, train
from lmpipe.training.model import load_base, load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / ".data"
log = logging.getLogger("sft_selection")

# Per model: the experiment its fine-tuning config comes from, and its base.
MODELS = {"tiny": [], "smollm2": ["experiment=smollm2-lora"]}
SELECTION_STEPS = ["dedup", "quality", "ifd", "diversity"]


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return validate(compose("config", overrides))


def base_model(name: str, cfg: DictConfig) -> Path:
    """The starting model as a transformers directory."""
    if name == "tiny":
        path = ROOT / "outputs" / "pretrain" / "model"
        if not path.is_dir():
            sys.exit("no outputs/pretrain/model: run `make demo` first")
        return path
    path = DATA / "smollm2-135m"
    if not (path / "model.safetensors").is_file():
        tokenizer = base_tokenizer(cfg.model.init_from)
        save_model(load_base(cfg.model.init_from), tokenizer, path)
    return path


def arms(share: float, seeds: int) -> list[tuple[str, str, dict]]:
    """(arm, budget unit, selection overrides) of every run."""
    runs: list[tuple[str, str, dict]] = [
        ("full", "-", {}),
        ("dedup+rules", "-", {"steps": ["dedup", "quality"]}),
    ]
    for unit in ("examples", "tokens"):
        budget = {"budget.unit": unit, "budget.share": share}
        runs += [
            ("selection", unit, {"steps": SELECTION_STEPS, **budget}),
            ("ifd-rank", unit, {"steps": ["dedup", "quality", "ifd"], **budget}),
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


def fine_tune_and_score(
    task, cfg: DictConfig, base: Path, tokenizer, device: torch.device, overrides: dict
) -> dict:
    f = cfg.finetune.copy()
    for key, value in overrides.items():
        OmegaConf.update(f, f"selection.{key}", value)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    chosen = select_for_task(task, f, base, tokenizer, device, cfg.seed,
                             DATA / "selection-scores", process_env())  # fmt: skip
    ids = chosen.selected_ids
    setup = tasks.prepare_finetuning(f, base, tokenizer, cfg.seed, device, train_ids=ids)
    result = train(setup.model, setup.batches, f, cfg.hardware, device, MetricLogger(None),
                   setup.evaluate, desc="finetune", objective=setup.objective)  # fmt: skip
    model = setup.final_model()
    seconds = time.perf_counter() - start
    splits = task.splits(f)
    frame = task.predict({"tuned": model}, tokenizer, splits, f, cfg.evaluate)
    scores = task.score(frame, ["tuned"], splits)
    return {
        "examples": len(ids),
        "tokens": int(chosen.table.loc[chosen.table["status"] == "selected", "tokens"].sum()),
        "best_step": result.best_step,
        "test_loss": scores["tuned_sft_test_loss"],
        "chrf": scores["tuned_chrf"],
        "rougeL": scores["tuned_rougeL"],
        "retrieval_chrf": scores["retrieval_chrf"],
        "retrieval_rougeL": scores["retrieval_rougeL"],
        "seconds": seconds,
    }


def before_tuning(task, cfg: DictConfig, base: Path, tokenizer) -> dict:
    model = load_model(base)
    splits = task.splits(cfg.finetune)
    frame = task.predict({"base": model}, tokenizer, splits, cfg.finetune, cfg.evaluate)
    scores = task.score(frame, ["base"], splits)
    return {"test_loss": scores["base_sft_test_loss"], "chrf": scores["base_chrf"],
            "rougeL": scores["base_rougeL"], "retrieval_chrf": scores["retrieval_chrf"],
            "retrieval_rougeL": scores["retrieval_rougeL"]}  # fmt: skip


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
        for key in ("examples", "tokens", "test_loss", "chrf", "rougeL"):
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
    parser.add_argument("--out", type=Path, default=DATA / "sft_selection.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("lmpipe.training.loop", "lmpipe.data.sft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = torch.device("cpu")
    report: dict = {"date": time.strftime("%Y-%m-%d"), "share": args.share, "models": {}}
    for name in args.models.split(","):
        cfg = config([*MODELS[name], "evaluate.num_generations=null"])  # every test prompt
        base = base_model(name, cfg)
        tokenizer = load_tokenizer(base)
        task = tasks.finetuning("sft")
        entry: dict = {"scoring": scoring_rate(task, cfg.finetune, base, tokenizer, device)}
        log.info("%s scoring: %s", name, entry["scoring"])
        entry["before_tuning"] = before_tuning(task, cfg, base, tokenizer)
        log.info("%s before tuning: %s", name, entry["before_tuning"])
        rows = []
        wanted = set(args.arms.split(",")) if args.arms else None
        for arm, unit, overrides in arms(args.share, args.seeds):
            if wanted is not None and arm not in wanted:
                continue
            scores = fine_tune_and_score(task, cfg, base, tokenizer, device, overrides)
            row = {"arm": arm, "unit": unit, **scores}
            log.info("%s %s", name, json.dumps(row))
            rows.append(row)
        entry["runs"] = rows
        entry["summary"] = summary(rows)
        report["models"][name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    for name, entry in report["models"].items():
        s = entry["scoring"]
        print(
            f"\n## {name}  (scoring {s['scoring_examples_per_s']:.0f} ex/s vs forward "
            f"{s['forward_examples_per_s']:.0f} ex/s: ratio {s['ratio']:.2f}, target >= 0.4)"
        )
        b = entry["before_tuning"]
        print(
            f"before tuning: test loss {b['test_loss']:.3f}, chrF {b['chrf']:.1f}, "
            f"ROUGE-L {b['rougeL']:.3f}; retrieval baseline chrF {b['retrieval_chrf']:.1f}, "
            f"ROUGE-L {b['retrieval_rougeL']:.3f}"
        )
        print("| budget | arm | examples | tokens | test loss | chrF | ROUGE-L |")
        print("|---|---|---|---|---|---|---|")
        for row in entry["summary"]:

            def cell(key: str, fmt: str, row: dict = row) -> str:
                value = format(row[key], fmt)
                return f"{value} ± {format(row[key + '_sd'], fmt)}" if key + "_sd" in row else value

            print(
                f"| {row['unit']} | {row['arm']} | {cell('examples', '.0f')} | "
                f"{cell('tokens', '.0f')} | {cell('test_loss', '.3f')} | {cell('chrf', '.1f')} "
                f"| {cell('rougeL', '.3f')} |"
            )


if __name__ == "__main__":
    main()
