"""Test-only (loaded by sitecustomize.py here): with LMPIPE_CONFIG_READS=<dir>, each stage process
writes the config keys its own code read (after validation) to <dir>/<stage>.<pid>.json, so
tests/test_pipeline.py can check that each is a tracked DVC param of that stage.

A read is a leaf read by attribute or item (`f.optim.lr`), or a whole node consumed at once
(converted by OmegaConf.to_object / to_container, or iterated): its key then stands for every
key under it. Reads by the bookkeeping (lmpipe/stage.py, lmpipe/runs/: the run's params logged
to MLflow, checkpoint fingerprints) and by OmegaConf itself are not the stage's.

Every Python process on the path loads it (dvc's too), so it does nothing until lmpipe.stage
is imported, then wraps its `validate` to start recording once the config is validated."""

import atexit
import functools
import json
import os
import sys
from pathlib import Path

OUT = os.environ.get("LMPIPE_CONFIG_READS")


def start_recording(stage_module) -> None:
    from omegaconf import DictConfig, OmegaConf

    # By location, not by a name in the path: a checkout in a folder called lmpipe holds the
    # venv (and OmegaConf) too.
    package = Path(stage_module.__file__).resolve().parent
    bookkeeping = (package / "stage.py", package / "runs")

    @functools.cache
    def stage_file(filename: str) -> bool:
        path = Path(filename).resolve()
        if path.parent.name == "stages":
            return True
        return path.is_relative_to(package) and not any(
            path == part or path.is_relative_to(part) for part in bookkeeping
        )

    reads: set[str] = set()
    recording = [False]

    def record(key: str) -> None:
        if recording[0] and stage_file(sys._getframe(2).f_code.co_filename):
            reads.add(key)

    def leaf_read(original):
        def read(self, key):
            value = original(self, key)
            if not isinstance(value, DictConfig) and isinstance(key, str):
                record(self._get_full_key(key))
            return value

        return read

    def node_read(original):
        def read(*args, **kwargs):
            node = args[0] if args else kwargs.get("cfg")  # OmegaConf's own calls: cfg=
            if isinstance(node, DictConfig):
                record(node._get_full_key(None))
            return original(*args, **kwargs)

        return read

    DictConfig.__getattr__ = leaf_read(DictConfig.__getattr__)
    DictConfig.__getitem__ = leaf_read(DictConfig.__getitem__)
    for name in ("items", "keys", "values", "__iter__"):
        setattr(DictConfig, name, node_read(getattr(DictConfig, name)))
    for name in ("to_object", "to_container"):
        setattr(OmegaConf, name, staticmethod(node_read(getattr(OmegaConf, name))))

    validate = stage_module.validate

    def validate_then_record(cfg):
        merged = validate(cfg)
        recording[0] = True
        return merged

    stage_module.validate = validate_then_record

    @atexit.register
    def write() -> None:
        entry = Path(sys.argv[0])  # stages/<name>.py by now (`python -m` sets it late)
        if recording[0] and entry.parent.name == "stages":
            path = Path(OUT) / f"{entry.stem}.{os.getpid()}.json"
            path.write_text(json.dumps(sorted(reads)))
