"""Test-only (loaded by sitecustomize.py here): a training process stops at a chosen point and
waits to be killed, as a long job would be when killed mid-run; tests then kill it at a
known point instead of racing a run whose speed depends on the machine's load.

- LMPIPE_HOLD_AFTER_CHECKPOINT=<step>: after saving its `last` checkpoint at or past <step>;
- LMPIPE_HOLD_AFTER_STEP=<step>: after logging training step <step> (mid-interval when no
  checkpoint falls on it);
- LMPIPE_HOLD_MARKER=<file>: written with the step once it holds.

tests/conftest.py: hold_env."""

import os
import sys
import time
from pathlib import Path

AFTER_CHECKPOINT = os.environ.get("LMPIPE_HOLD_AFTER_CHECKPOINT")
AFTER_STEP = os.environ.get("LMPIPE_HOLD_AFTER_STEP")
MARKER = os.environ.get("LMPIPE_HOLD_MARKER")


def hold(what: str, step: int) -> None:
    sys.stderr.write(f"holding after the {what} of step {step}\n")
    sys.stderr.flush()
    if MARKER:
        Path(MARKER).write_text(str(step))
    while True:  # until the process is killed
        time.sleep(1)


def hold_after_checkpoint(module) -> None:
    save = module.Checkpoints.save

    def save_then_hold(self, name, *args, **kwargs):
        result = save(self, name, *args, **kwargs)
        state = self.state(module.LAST) if name == module.LAST else None
        if state is not None and state["step"] >= int(AFTER_CHECKPOINT):
            hold("checkpoint", state["step"])
        return result

    module.Checkpoints.save = save_then_hold


def hold_after_step(module) -> None:
    log = module.MetricLogger.log

    def log_then_hold(self, metrics, step, series="train"):
        log(self, metrics, step, series)
        if series == "train" and step == int(AFTER_STEP):
            hold("training", step)

    module.MetricLogger.log = log_then_hold
