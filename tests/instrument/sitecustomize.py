"""Test-only instruments of the stage processes, loaded by Python at start-up when this folder
is on PYTHONPATH (the processes tests start, and the jobs they launch, inherit it), each
switched on by its own environment variable and doing nothing otherwise:

- LMPIPE_CONFIG_READS=<dir>: each stage writes the config keys its code read
  (lmpipe_config_reads.py, for tests/test_pipeline.py);
- LMPIPE_HOLD_AFTER_CHECKPOINT / LMPIPE_HOLD_AFTER_STEP=<step>: training stops there and
  waits to be killed (lmpipe_hold.py, for the kill-and-resume tests).

Both wrap a module of lmpipe right after it is executed (`after_import`)."""

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `wrap(module)` right after module `name` is executed, once."""

    def __init__(self, name: str, wrap: Callable[[ModuleType], None]) -> None:
        self.name, self.wrap = name, wrap

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module) -> None:
            exec_module(module)
            self.wrap(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


def after_import(name: str, wrap: Callable[[ModuleType], None]) -> None:
    sys.meta_path.insert(0, _AfterImport(name, wrap))


if os.environ.get("LMPIPE_CONFIG_READS"):
    import lmpipe_config_reads

    after_import("lmpipe.stage", lmpipe_config_reads.start_recording)
if os.environ.get("LMPIPE_HOLD_AFTER_CHECKPOINT"):
    import lmpipe_hold

    after_import("lmpipe.training.checkpoint", lmpipe_hold.hold_after_checkpoint)
if os.environ.get("LMPIPE_HOLD_AFTER_STEP"):
    import lmpipe_hold

    after_import("lmpipe.runs.tracking", lmpipe_hold.hold_after_step)
