"""Test-only: with LMPIPE_HOLD_AFTER_CHECKPOINT=<step> and this folder on PYTHONPATH, a
training process that has just saved its `last` checkpoint at or past <step> stops there and
waits to be killed, as a long job would be mid-run; tests/test_slurm.py then cancels the
job at a known point instead of racing a fast one. Without the variable it does nothing."""

import importlib.abc
import importlib.util
import os
import sys
import time

HOLD_AT = os.environ.get("LMPIPE_HOLD_AFTER_CHECKPOINT")


def _hold_after_saving(module) -> None:
    save = module.Checkpoints.save

    def save_then_hold(self, name, *args, **kwargs):
        result = save(self, name, *args, **kwargs)
        state = self.state(module.LAST) if name == module.LAST else None
        if state is not None and state["step"] >= int(HOLD_AT):
            sys.stderr.write(f"holding after the checkpoint of step {state['step']}\n")
            sys.stderr.flush()
            while True:  # until the job is cancelled
                time.sleep(1)
        return result

    module.Checkpoints.save = save_then_hold


class _CheckpointHook(importlib.abc.MetaPathFinder):
    """Wraps Checkpoints.save right after lmpipe.training.checkpoint is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "lmpipe.training.checkpoint":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_and_hook(module) -> None:
            exec_module(module)
            _hold_after_saving(module)

        spec.loader.exec_module = exec_and_hook
        return spec


if HOLD_AT:
    sys.meta_path.insert(0, _CheckpointHook())
