"""Scores from the starting model, batched and without gradients, cached on disk.

One forward pass over each example gives its mean-pooled last hidden state (diversity)
and, through the LM head, its response loss given the prompt; a second pass over the
responses alone gives the loss without the prompt. IFD is their ratio (Cherry LLM).

The cache holds one Parquet file per (starting model, scoring version) and one row per
example, keyed by a digest of the example's tokens: changing anything else (lr, steps, the
selection's budget) reuses the scores, and only examples never seen are scored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from lmpipe.evaluation.lm_metrics import eval_mode, next_token_losses
from lmpipe.runs import atomic
from lmpipe.runs.keys import directory_digest, keyed_path
from lmpipe.selection.candidates import Candidate
from lmpipe.taskdata.conversations import collate
from lmpipe.training import distributed
from lmpipe.training.loop import device_numerics

log = logging.getLogger(__name__)

# Bump when what a score means changes: old cache files are then never read.
# The numbers also depend on how the device computes (ScoreCache's `numerics`: TF32 or not).
SCORING_VERSION = {"version": 1, "pooling": "mean", "layer": "last", "loss": "mean nats",
                   "dtype": "float32"}  # fmt: skip
# Candidates per share of the scoring work (lmpipe.training.distributed.map_batches), in
# model batches: the processes exchange their status once per share.
SHARE_BATCHES = 8
COLUMNS = ("conditional_loss", "response_loss", "embedding")


def ifd(conditional_loss: np.ndarray, response_loss: np.ndarray) -> np.ndarray:
    """Instruction-Following Difficulty: the response's loss given its prompt over its loss
    alone. Below 1 the prompt helps the model predict the response."""
    return np.asarray(conditional_loss) / np.asarray(response_loss)


def example_key(candidate: Candidate) -> str:
    payload = json.dumps([candidate.example, candidate.responses_alone], sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def length_batches(
    examples: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(rows, padded batch), examples of similar length together (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]["input_ids"]), i))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, collate([examples[i] for i in rows], pad_id)


def _pass(
    model: PreTrainedModel,
    examples: Sequence[dict[str, list[int]]],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    losses: bool,
    embeddings: bool,
    desc: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean loss per example over its labelled tokens, and its mean-pooled hidden state."""
    backbone = model.base_model  # the model itself when it has no head
    head = model.get_output_embeddings() if losses else None
    mean_loss = np.full(len(examples), np.nan)
    pooled = None
    with tqdm(total=len(examples), desc=desc, unit="ex", mininterval=2) as bar:
        for rows, batch in length_batches(examples, batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = backbone(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
            if embeddings:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                means = ((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy()
                if pooled is None:
                    pooled = np.zeros((len(examples), means.shape[1]), dtype=np.float32)
                pooled[rows] = means
            if head is not None:
                token_loss, labelled = next_token_losses(head(hidden), batch["labels"])
                counts = labelled.sum(1)
                mean_loss[rows] = (token_loss.sum(1) / counts.clamp(min=1)).cpu().numpy()
            bar.update(len(rows))
    return mean_loss, pooled


def score_candidates(
    model: PreTrainedModel,
    candidates: Sequence[Candidate],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    losses: bool,
) -> pd.DataFrame:
    """Per candidate: the conditional and response-alone losses (with `losses`; NaN
    otherwise) and the embedding. Under several processes each scores its shares of
    `SHARE_BATCHES` batches (lmpipe.training.distributed.map_batches) and all return every
    row, in order; the shares are the same for any number of processes, and so are the
    scores."""

    def share(_: int, chosen: Sequence[Candidate]) -> list[dict]:
        return _scores(model, chosen, batch_size, pad_id, device, losses).to_dict("records")

    rows = distributed.map_batches(share, candidates, batch_size * SHARE_BATCHES,
                                   "selection: scoring")  # fmt: skip
    return pd.DataFrame(rows, columns=list(COLUMNS))


@torch.no_grad()
def _scores(
    model: PreTrainedModel,
    candidates: Sequence[Candidate],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    losses: bool,
) -> pd.DataFrame:
    with eval_mode(model):
        examples = [c.example for c in candidates]
        conditional, pooled = _pass(model, examples, batch_size, pad_id, device, losses, True,
                                    "selection: scoring examples")  # fmt: skip
        response = np.full(len(candidates), np.nan)
        if losses:
            alone = [c.responses_alone for c in candidates]
            if any(a is None for a in alone):
                raise ValueError("IFD needs responses: some examples have none")
            response, _ = _pass(model, alone, batch_size, pad_id, device, True, False,
                                "selection: scoring responses alone")  # fmt: skip
    assert pooled is not None or not candidates
    return pd.DataFrame(
        {
            "conditional_loss": conditional,
            "response_loss": response,
            "embedding": list(pooled) if pooled is not None else [],
        }
    )


class ScoreCache:
    """Scores of one starting model computed one way (`numerics`: the device, and whether
    its fp32 matmuls run as TF32), by example key, in `<directory>/<digest>.parquet`."""

    def __init__(
        self, directory: Path, model_dir: Path, numerics: Mapping[str, object] | None = None
    ) -> None:
        numerics = dict(numerics or device_numerics(torch.device("cpu")))
        identity = {"model": directory_digest(model_dir), "scoring": SCORING_VERSION,
                    "numerics": numerics}  # fmt: skip
        self.path = keyed_path(directory, identity, ".parquet")

    def load(self) -> pd.DataFrame:
        if not self.path.is_file():
            return pd.DataFrame(columns=["key", *COLUMNS]).set_index("key")
        return pd.read_parquet(self.path).set_index("key")

    def save(self, table: pd.DataFrame) -> None:
        """Replace the file atomically: a reader sees the old table or the new one."""
        atomic.write_file(self.path, lambda tmp: table.reset_index().to_parquet(tmp, index=False))


def cached_scores(
    candidates: Sequence[Candidate],
    losses: bool,
    cache: ScoreCache,
    score: Callable[[Sequence[Candidate], bool], pd.DataFrame],
    is_main: bool = True,
) -> pd.DataFrame:
    """The candidates' scores (rows in their order), computing only what the cache lacks.

    Under several processes every one reads the cache and they score what it lacks
    together (`score` shares its batches out: `score_candidates`); the main one writes, and
    every process reads the same file back, so all of them select exactly the same
    examples.
    """
    keys = [example_key(c) for c in candidates]
    table = cache.load()
    known = table.reindex(keys)
    missing = known["embedding"].isna()
    if losses:
        missing |= known["response_loss"].isna()
    first = {k: c for k, c in zip(keys, candidates, strict=True)}
    # Similar lengths together: the shares, then their batches, carry less padding.
    todo = sorted({k for k, m in zip(keys, missing, strict=True) if m},
                  key=lambda k: (len(first[k].example["input_ids"]), k))  # fmt: skip
    if is_main:
        log.info("selection: %d of %d examples scored before (%s), %d to score",
                 len(set(keys)) - len(todo), len(set(keys)), cache.path, len(todo))  # fmt: skip
    if todo:
        fresh = score([first[k] for k in todo], losses)
        fresh.index = pd.Index(todo, name="key")
        if is_main:
            cache.save(pd.concat([table.drop(index=todo, errors="ignore"), fresh]))
    distributed.barrier()
    result = cache.load().reindex(keys)
    return result.reset_index(drop=True)
