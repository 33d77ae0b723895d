"""Work shared by processes (lmpipe.training.distributed.map_batches); alone or under torchrun.

    torchrun --nproc_per_node 2 tests/sharded_worker.py OUT [--fail-rank 1] [--scores|--rollouts]

Squares 0..N-1 in batches, recording which process computed each batch, or (`--scores`)
scores selection candidates with a small random model (`score_candidates`); with
`--rollouts` it also samples 3 replies to each of 7 prompts from a small random chat model
(lmpipe.feedback.rollouts.sample, in batches of 4 rows that split groups) into
OUT/rollouts-<rank>.json. With
`--fail-rank R` the work raises on process R at its second batch; every process then
writes the error it ended with to OUT/error-<rank>.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lmpipe.training import distributed


def squares(args: argparse.Namespace, rank: int) -> list:
    calls: list[int] = []

    def square(index: int, batch: list[int]) -> list[dict]:
        calls.append(index)
        if args.fail_rank == rank and len(calls) == 2:
            raise ValueError(f"scorer broke on batch {index}")
        time.sleep(args.delay)
        return [{"value": x * x, "rank": rank, "batch": index} for x in batch]

    try:
        return distributed.map_batches(square, list(range(args.items)), 3, "squaring")
    finally:
        (args.out / f"calls-{rank}.json").write_text(json.dumps(calls))


def scores() -> list:
    return json.loads(scores_of(torch.device("cpu")).to_json(orient="records"))


def scores_of(device: torch.device):
    """Selection scores of 37 random candidates by a small random model on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmpipe.selection.candidates import Candidate
    from lmpipe.selection.scoring import score_candidates

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64))  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    candidates = []
    for i in range(37):
        ids = torch.randint(1, 64, (int(torch.randint(4, 20, (1,), generator=generator)),),
                            generator=generator).tolist()  # fmt: skip
        labels = [-100] * 2 + ids[2:]
        candidates.append(Candidate(str(i), (), (), {"input_ids": ids, "labels": labels},
                                    {"input_ids": ids[2:], "labels": ids[2:]}))  # fmt: skip
    return score_candidates(model.to(device), candidates, 2, 0, device, losses=True)


def rollouts(out: Path) -> list:
    from lmpipe.data.tokenizer import load_tokenizer, train_tokenizer
    from lmpipe.feedback.rollouts import Sampling, sample
    from lmpipe.runs.config import ModelConfig
    from lmpipe.training.model import build_model

    texts = ["What is two plus three? It is five.", "Hello, how are you today?"] * 40
    path = out / f"tokenizer-{os.environ.get('RANK', '0')}"
    train_tokenizer(texts, vocab_size=300).save_pretrained(path)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="test", hidden_size=32, num_layers=2, num_heads=2,
                                    num_kv_heads=2, intermediate_size=64, max_seq_len=64),
                        tokenizer)  # fmt: skip
    prompts = [f"What is {i} plus {i + 1}?" for i in range(7)]
    groups = sample(model, tokenizer, prompts, 3, Sampling(6, temperature=1.0), 5, 4,
                    torch.device("cpu"))  # fmt: skip
    return [[[c.text, list(c.token_ids), c.finished] for c in group] for group in groups]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--scores", action="store_true")
    parser.add_argument("--rollouts", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = distributed.init("cpu")
    try:
        result = scores() if args.scores else squares(args, env.rank)
        if args.rollouts:
            (args.out / f"rollouts-{env.rank}.json").write_text(json.dumps(rollouts(args.out)))
    except Exception as exc:
        (args.out / f"error-{env.rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        raise
    (args.out / f"result-{env.rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main()
