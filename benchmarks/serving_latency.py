"""Latency and generated tokens/s of a served model over HTTP, against the same model
called in-process, measured in one run on the same requests.

For a generating model: `lmpipe serve` (the OpenAI API, LitServe) driven by the `openai`
client, and, for a registered MLflow model, `mlflow models serve` (/invocations); the
baseline is the loaded model answering the same chat request in-process (the same
`generate` call the server makes). Requests go one after another, greedy, each reply up to
`--max-tokens`; tokens/s is the replies' tokens over the time to get them. For a classifier:
/v1/classify and /invocations against in-process.

    python benchmarks/serving_latency.py                              # the demo's champion
    python benchmarks/serving_latency.py --source benchmarks/.data/smollm2-135m
    python benchmarks/serving_latency.py --source models:/lmpipe-classify@champion
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openai

from lmpipe.deploy.openai_server import load_served, resolve_source
from lmpipe.feedback.rollouts import Sampling, complete
from lmpipe.runs import tracking

# The server harness is shared with the serving tests (not library code).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import lmpipe_serve, post, serve

QUESTION = "State the final answer to the following arithmetic problem: 12 + 7 - 5 ="
TEXT = "a large wild animal of the cat family"


def timed(call: Callable[[], int], requests: int) -> dict[str, float]:
    """p50/p95 ms of `requests` calls (after one warm-up) and tokens/s of what they return."""
    call()
    seconds, tokens = [], 0
    for _ in range(requests):
        start = time.perf_counter()
        tokens += call()
        seconds.append(time.perf_counter() - start)
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1e3, "p95_ms": cuts[94] * 1e3,
            "tokens_per_s": tokens / sum(seconds)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        default="models:/lmpipe-sft@champion",
        help="what `lmpipe serve` takes: a model URI, run id or directory",
    )
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    uri = tracking.configure()
    source = resolve_source(args.source)
    loaded = load_served(source)
    generates = loaded.task.serving.generates
    messages = [{"role": "user", "content": QUESTION}]
    rows: dict[str, dict[str, float]] = {}

    if generates:
        sampling = Sampling(args.max_tokens)

        def in_process() -> int:
            (reply,) = complete(loaded.model, loaded.tokenizer, [messages], sampling)
            return len(reply.token_ids)

        rows["in-process (generate)"] = timed(in_process, args.requests)
    else:
        rows["in-process"] = timed(lambda: len(loaded.task.serve(loaded.model,
                                   loaded.tokenizer, [TEXT], {})), args.requests)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        with lmpipe_serve(
            args.source, Path(tmp) / "lmpipe.log", {"MLFLOW_TRACKING_URI": uri}
        ) as url:
            if generates:
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

                def chat() -> int:
                    reply = client.chat.completions.create(
                        model=source.name, messages=messages, max_tokens=args.max_tokens,
                        temperature=0)  # fmt: skip
                    return reply.usage.completion_tokens

                rows["HTTP: lmpipe serve /v1/chat/completions"] = timed(chat, args.requests)
            else:

                def classify() -> int:
                    answer = post(f"{url}/v1/classify", {"input": [TEXT]})
                    assert answer.status == 200, answer.body
                    return 1

                rows["HTTP: lmpipe serve /v1/classify"] = timed(classify, args.requests)
        if source.mlflow_model and not Path(args.source).is_dir():
            column = loaded.task.serving.input_column
            # The prompt column (one user turn, as `messages` holds): versions registered
            # before /invocations took chat messages have it alone in their signature.
            record = {column: QUESTION if generates else TEXT}
            payload = {"dataframe_records": [record]}
            if generates:
                payload["params"] = {"max_new_tokens": args.max_tokens}
            with serve(args.source, uri, Path(tmp) / "mlflow.log") as url:

                def invocations() -> int:
                    answer = post(f"{url}/invocations", payload)
                    assert answer.status == 200, answer.body
                    reply = answer.body["predictions"][0]
                    # the reply's tokens, read back from its text
                    return len(loaded.tokenizer(reply)["input_ids"]) if generates else 1

                rows["HTTP: mlflow models serve /invocations"] = timed(invocations, args.requests)

    base = next(iter(rows.values()))
    print(f"{args.source} ({source.name}), {args.requests} sequential requests"
          + (f", greedy replies up to {args.max_tokens} tokens" if generates else ""))  # fmt: skip
    print("| path | p50 ms | p95 ms | tokens/s | p50 / in-process |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} | "
              f"{row['tokens_per_s']:.1f} | {row['p50_ms'] / base['p50_ms']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
