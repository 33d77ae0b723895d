"""Resumable training state, written atomically: `<dir>/last` and `<dir>/best`.

Each checkpoint is a directory:
    config.json, model.safetensors   the weights (loadable with `from_pretrained`)
    trainer.pt                       optimizer, scheduler, RNG states, data position,
                                     logged metric rows (`last` only)
    state.json                       step, MLflow run id, fingerprint, finished, val loss

A directory is written under a temporary name and renamed into place; the previous one is
moved aside first and deleted last, so a kill at any instant leaves one complete `last`.
The fingerprint (config + inputs + process count) decides whether `last` may be resumed: a
checkpoint of another config is never continued.

With several processes every rank takes part in gathering the full state (FSDP shards it);
rank 0 writes and every rank reads.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import PreTrainedModel

from lmpipe.runs import atomic
from lmpipe.training import distributed
from lmpipe.training.distributed import DistEnv

log = logging.getLogger(__name__)

LAST, BEST = "last", "best"
STATE_FILE = "state.json"
TRAINER_FILE = "trainer.pt"
WEIGHTS_FILE = "model.safetensors"


# --- RNG states ----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """python, numpy, torch and this process's CUDA generator, in types
    `torch.load(weights_only=True)` reads.

    Only the current CUDA device's state: each process trains on one GPU, and a run resumed
    where fewer GPUs are visible (a requeued job, another CUDA_VISIBLE_DEVICES) must still
    restore it.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list | tuple):  # written before lmpipe saved one device's state
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


# --- checkpoints ---------------------------------------------------------------------------


class Checkpoints:
    """The `last` and `best` checkpoints of one training stage."""

    def __init__(self, directory: Path, fingerprint: str, env: DistEnv | None = None) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.env = env or DistEnv()
        # state.json of an unfinished `last` that `resumable` found of another config or
        # input: it will be replaced, so its MLflow run can be ended
        self.discarded: dict[str, Any] | None = None

    def state(self, name: str = LAST) -> dict[str, Any] | None:
        path = self.directory / name / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def resumable(self) -> dict[str, Any] | None:
        """state.json of an unfinished `last` of this same config, else None."""
        if self.env.is_main:
            atomic.recover(self.directory)
        state = self.state(LAST)
        if state is None or state.get("finished"):
            return None
        if state.get("fingerprint") != self.fingerprint:
            self.discarded = state
            log.warning(
                "%s holds a checkpoint of another config or input (step %s): starting afresh",
                self.directory / LAST,
                state.get("step"),
            )
            return None
        return state

    def save(
        self,
        name: str,
        model: torch.nn.Module,
        state: Mapping[str, Any],
        optimizer: torch.optim.Optimizer | None = None,
        trainer: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write `<dir>/<name>` atomically. Collective: every rank must call it."""
        model_sd, optim_sd = get_state_dict(
            model,
            [optimizer] if optimizer is not None else [],
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        # Each rank's RNG state; rank 0 keeps them all.
        rng_states = distributed.all_gather_object(rng_state())
        final = self.directory / name
        if self.env.is_main:
            tmp = atomic.temp_path(final)
            tmp.mkdir(parents=True)
            distributed.unwrap(model).save_pretrained(
                tmp, state_dict=model_sd, safe_serialization=True
            )
            if trainer is not None:
                payload = {**trainer, "rng": rng_states}
                if optimizer is not None:
                    payload["optimizer"] = optim_sd
                torch.save(payload, tmp / TRAINER_FILE)
            record = {**state, "fingerprint": self.fingerprint, "world_size": self.env.world_size}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            atomic.replace(final, tmp)
        distributed.barrier()
        return final

    def load(
        self,
        name: str,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> dict[str, Any]:
        """Restore weights (and optimizer, this rank's RNG); returns the trainer payload.

        Collective with several processes: rank 0 alone reads the files and broadcasts
        them, so host memory holds one full copy per machine, not one per process.
        """
        path = self.directory / name
        weights: dict[str, torch.Tensor] = {}
        trainer: dict[str, Any] = {}
        problem = None
        if self.env.is_main:
            try:
                weights = load_file(str(path / WEIGHTS_FILE))
                _check_only_tied_missing(distributed.unwrap(model), weights, path)
                if (path / TRAINER_FILE).is_file():
                    # weights_only: tensors and plain containers, nothing arbitrary unpickled.
                    trainer = torch.load(path / TRAINER_FILE, weights_only=True, map_location="cpu")
            except Exception as error:
                if not self.env.enabled:
                    raise
                problem = f"{type(error).__name__}: {error}"
        # Every rank learns of rank 0's failure instead of waiting in a broadcast for ever.
        problem = distributed.broadcast_object(problem)
        if problem:
            raise RuntimeError(f"loading checkpoint {path} failed on rank 0: {problem}")
        optim_state = trainer.pop("optimizer", {})
        options = StateDictOptions(
            full_state_dict=True, strict=False, broadcast_from_rank0=self.env.enabled
        )
        # Model and optimizer apart: set_state_dict skips the model on a rank whose (empty)
        # model state says "optimizer only", and the ranks' broadcasts would then not pair up.
        set_model_state_dict(model, weights, options=options)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        del weights, optim_state
        trainer = distributed.broadcast_object(trainer)  # scheduler, position, RNG: small
        rng_states = trainer.pop("rng", None)
        if rng_states:
            set_rng_state(rng_states[min(self.env.rank, len(rng_states) - 1)])
        return trainer

    def mark_finished(self) -> None:
        """A finished run is never resumed; its checkpoints stay for inspection."""
        if not self.env.is_main:
            return
        path = self.directory / LAST / STATE_FILE
        if path.is_file():
            state = json.loads(path.read_text())
            state["finished"] = True
            tmp = path.with_name(f".{STATE_FILE}.tmp")
            tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            tmp.replace(path)


def _check_only_tied_missing(
    model: PreTrainedModel, weights: Mapping[str, torch.Tensor], path: Path
) -> None:
    """save_pretrained drops tied copies (lm_head = embeddings); any other gap is an error."""
    # Tied names share one Parameter object (also when FSDP has replaced it by a DTensor).
    params = dict(model.named_parameters(remove_duplicate=False))
    present = {id(params[k]) for k in weights if k in params}
    missing = [k for k, p in params.items() if k not in weights and id(p) not in present]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for {', '.join(missing[:5])}")
