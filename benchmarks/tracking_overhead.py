"""What MLflow tracking costs the training loop, measured in the same run.

The same training (same model, batches and steps) runs with metrics going nowhere and with
metrics going to a real MLflow run in a fresh SQLite store (loss, lr, grad norm, tokens/s,
peak memory every `log_every` steps; validation every 10 steps; the batched, asynchronous
`tracking.MetricLogger` the stages use), at log_every=1 and log_every=10. Runs alternate
and each variant keeps its fastest of `--repeats`, so drift of the machine cancels out.
Prints milliseconds per step and the overhead of each (target < 2% of step time).

The model is small on purpose: the shorter a step, the larger the share that logging can
take. On a CPU the store's work (about 0.25 ms of CPU per metric value in MLflow's SQL
store) competes with training for the same cores; on a GPU it runs on otherwise idle cores.

    python benchmarks/tracking_overhead.py           # about 3 min on 2 cores
    python benchmarks/tracking_overhead.py --hidden-size 256 --layers 4 --seq-len 256 \
        --batch-size 16 --steps 60 --repeats 2      # demo-sized steps (~0.5 s), ~6 min
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

from lmpipe.data.batches import window_batches
from lmpipe.data.tokenizer import train_tokenizer
from lmpipe.runs.config import HardwareConfig, ModelConfig, OptimConfig, TrainConfig
from lmpipe.runs.tracking import MetricLogger
from lmpipe.tasks.causal_lm import CausalLM
from lmpipe.training.loop import seed_everything, train
from lmpipe.training.model import build_model

CAUSAL_LM = CausalLM()

TEXT = [
    "The committee met on Tuesday to review the budget for the coming year.",
    "Members raised questions about road repairs, school funding and the new library.",
]


def one_run(
    cfg: TrainConfig, model_cfg: ModelConfig, tokens: np.ndarray, tokenizer, run_id: str | None
) -> float:
    """Seconds for the whole training, the last metric sends included."""
    seed_everything(0)
    model = build_model(model_cfg, tokenizer)
    with tempfile.TemporaryDirectory() as curves:
        logger = MetricLogger(run_id, csv_dir=Path(curves) if run_id else None)
        batches = window_batches(tokens, model_cfg.max_seq_len, cfg.batch_size, seed=0)
        start = time.perf_counter()
        train(model, batches, cfg, HardwareConfig(), torch.device("cpu"), logger,
              evaluate=lambda m: 1.0, objective=CAUSAL_LM)  # fmt: skip
        logger.close()  # waits for the last sends: part of the cost
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    # 4 heads and the Llama MLP ratio of the presets (tiny: 256 -> 688)
    model_cfg = ModelConfig(
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4, num_kv_heads=4,
        intermediate_size=int(args.hidden_size * 2.6875), max_seq_len=args.seq_len,
    )  # fmt: skip
    logging.basicConfig(level=logging.WARNING)

    tokenizer = train_tokenizer(TEXT * 200, vocab_size=512)
    tokens = np.tile(np.asarray(tokenizer(" ".join(TEXT))["input_ids"], dtype=np.uint16), 2000)
    variants = {"untracked": 1, "mlflow log_every=1": 1, "mlflow log_every=10": 10}
    times: dict[str, list[float]] = {name: [] for name in variants}
    logged: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as store:
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        experiment = mlflow.create_experiment("overhead", artifact_location=Path(store).as_uri())
        names = list(variants)
        for repeat in range(args.repeats + 1):  # round 0 warms allocator, kernels and store
            # rotating who goes first cancels order effects
            for name in names[repeat % 3 :] + names[: repeat % 3]:
                cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size,
                                  log_every=variants[name],
                                  eval_every=10, optim=OptimConfig(lr=1e-3))  # fmt: skip
                if name == "untracked":
                    seconds = one_run(cfg, model_cfg, tokens, tokenizer, None)
                else:
                    with mlflow.start_run(experiment_id=experiment) as run:
                        seconds = one_run(cfg, model_cfg, tokens, tokenizer, run.info.run_id)
                    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "lr")
                    logged[name] = len(history)
                if repeat:
                    times[name].append(seconds)
    base = min(times["untracked"])
    print(f"{args.steps} steps, best of {args.repeats}; torch threads {torch.get_num_threads()}")
    print(f"untracked:            {base / args.steps * 1e3:7.2f} ms/step")
    for name in names[1:]:
        tracked = min(times[name])
        print(f"{name + ':':21} {tracked / args.steps * 1e3:7.2f} ms/step  "
              f"overhead {(tracked - base) / base:+.2%}  ({logged[name]} steps logged)"
              )  # fmt: skip
    print("target: overhead < 2% of step time")


if __name__ == "__main__":
    main()
