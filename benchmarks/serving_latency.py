"""Latency of the deployed champion over HTTP (`mlflow models serve`), measured in one run.

Starts MLflow's scoring server for `models:/<name>@champion` of the project's store on
127.0.0.1 (`--env-manager local`), sends `--requests` single-row requests one after another,
and prints errors, p50 and p95. The baseline, measured in the same run on the same inputs,
is the same pyfunc called in-process: the ratio is what the HTTP server adds.

    python benchmarks/serving_latency.py              # lmpipe-sft@champion, 200 requests
    python benchmarks/serving_latency.py --model lmpipe-classify --requests 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd

from lmpipe.runs import tracking
from lmpipe.tasks.finetuning import finetuning_task

# The MLflow server harness is shared with the serving tests (not library code).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import sequential_latency, serve

INPUTS = {"sft": "What is AI?", "classify": "a large wild animal of the cat family"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="lmpipe-sft", help="registered model name")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    uri = tracking.configure()
    model_uri = f"models:/{args.model}@{args.alias}"
    model = mlflow.pyfunc.load_model(model_uri)
    task = (model.model_config or {}).get("task", "sft")
    serving = finetuning_task(task).serving
    row = {serving.input_column: INPUTS[task]}
    params = {"max_new_tokens": args.max_new_tokens} if serving.generates else None
    payload = {"dataframe_records": [row], **({"params": params} if params else {})}

    frame = pd.DataFrame([row])
    model.predict(frame, params=params)
    local = []
    for _ in range(args.requests):
        start = time.perf_counter()
        model.predict(frame, params=params)
        local.append(time.perf_counter() - start)
    local_p50 = statistics.median(local) * 1e3

    with (
        tempfile.TemporaryDirectory() as tmp,
        serve(model_uri, uri, Path(tmp) / "serve.log") as url,
    ):
        report = sequential_latency(url, payload, args.requests)
    print(f"{model_uri} ({task}), {args.requests} sequential single-row requests")
    print(f"  in-process pyfunc  p50 {local_p50:8.2f} ms")
    print(f"  HTTP (mlflow serve) p50 {report.p50_ms:8.2f} ms   p95 {report.p95_ms:8.2f} ms   "
          f"errors {report.errors}")  # fmt: skip
    print(f"  HTTP / in-process p50: {report.p50_ms / local_p50:.2f}x")


if __name__ == "__main__":
    main()
