"""What every stage shares: CLI defaults, config validation, outputs written atomically,
one MLflow run, and the run.json that links a stage's outputs to that run.

A stage reads like a recipe:

    @hydra.main(version_base="1.3", config_path="..", config_name="params")
    def main(cfg):
        with Stage("tokenize", cfg, upstream=("clean",)) as stage:
            corpus = stage.input("clean", "corpus")
            ...make files under stage.output("tokenizer")...
            stage.finish(metrics)

    if __name__ == "__main__":
        prepare_cli("tokenize")
        main()
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lmpipe import tracking
from lmpipe.config import find_project_root, stale_params_message, validate

log = logging.getLogger(__name__)


class MissingInputError(FileNotFoundError):
    """An upstream stage's output is not there."""


def prepare_cli(stage: str, argv: list[str] | None = None) -> None:
    """Run before Hydra parses the command line: check params.yaml, set Hydra's directories.

    Hydra's own settings cannot live in params.yaml (DVC composes it without the `hydra:`
    node), so their defaults are added to the command line unless the user gave them.
    """
    argv = sys.argv if argv is None else argv
    root = find_project_root()
    message = stale_params_message(root)
    if message:  # logging is not configured yet: Python's last-resort handler prints to stderr
        log.warning(message)
    defaults = {
        "hydra.run.dir": f"logs/{stage}/${{now:%Y-%m-%d_%H-%M-%S}}",
        "hydra.sweep.dir": f"multirun/{stage}/${{now:%Y-%m-%d_%H-%M-%S}}",
        "hydra.job.name": stage,
    }
    given = {arg.split("=", 1)[0].lstrip("+") for arg in argv[1:] if "=" in arg}
    argv.extend(f"{key}={value}" for key, value in defaults.items() if key not in given)


def _hydra_mode() -> RunMode | None:
    return HydraConfig.get().mode if HydraConfig.initialized() else None


class Stage:
    """Context manager around one stage execution.

    Outputs are created under temporary names and renamed into place only when the body
    finishes, so an interrupted or failing stage never leaves a half-written output or
    destroys the previous one. A multirun job writes under its Hydra job directory, never
    over the DVC-tracked outputs.
    """

    def __init__(self, name: str, cfg: DictConfig, upstream: Sequence[str] = ()) -> None:
        self.name = name
        self.cfg = validate(cfg)
        outputs = Path(self.cfg.outputs_dir)
        self.inputs_root = outputs
        if _hydra_mode() == RunMode.MULTIRUN:
            outputs = Path(HydraConfig.get().runtime.output_dir) / self.cfg.outputs_dir
        self.out_dir = outputs / name
        self.upstream = {up: self.inputs_root / up for up in upstream}
        self._pending: dict[Path, Path] = {}
        self._run_ctx: Any = None
        self.run_id: str = ""

    # -- paths -----------------------------------------------------------------------------

    def input(self, stage: str, name: str) -> Path:
        path = self.inputs_root / stage / name
        if not path.exists():
            raise MissingInputError(
                f"{self.name} needs {path}, an output of stage '{stage}': run `dvc repro {stage}`"
            )
        return path

    def upstream_run_id(self, stage: str) -> str:
        """The MLflow run that produced an upstream stage's current outputs."""
        return json.loads(self.input(stage, tracking.RUN_FILE).read_text())["run_id"]

    def output(self, name: str) -> Path:
        """A temporary path that becomes `<out_dir>/<name>` when the stage succeeds."""
        final = self.out_dir / name
        tmp = self.out_dir / f".tmp-{uuid.uuid4().hex[:8]}-{name}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._pending[final] = tmp
        return tmp

    # -- results ---------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def write_json(self, name: str, payload: Mapping[str, Any]) -> Path:
        path = self.output(name)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Stage:
        log.info("stage %s: outputs in %s", self.name, self.out_dir)
        self._recover_leftovers()
        self._run_ctx = tracking.stage_run(self.name, self.cfg, self.upstream)
        run = self._run_ctx.__enter__()
        self.run_id = run.info.run_id
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        commit_error: BaseException | None = None
        if exc_type is None:
            try:
                run_record = {
                    "run_id": self.run_id,
                    "stage": self.name,
                    "experiment": self.cfg.tracking.experiment,
                    "tracking_uri": tracking.tracking_uri(),
                }
                self.write_json(tracking.RUN_FILE, run_record)
                self._commit_outputs()
                log.info("stage %s done: MLflow run %s", self.name, self.run_id)
            except BaseException as err:  # committing failed: the run must end FAILED too
                commit_error = err
                exc_type, exc, tb = type(err), err, err.__traceback__
        if exc_type is not None:
            self._discard_outputs()
            log.error("stage %s failed: %s", self.name, exc)
        self._log_hydra_log()
        self._run_ctx.__exit__(exc_type, exc, tb)
        if commit_error is not None:
            raise commit_error
        return False  # the body's own exception propagates unchanged

    def _commit_outputs(self) -> None:
        for final, tmp in self._pending.items():
            if not tmp.exists():
                raise RuntimeError(f"stage {self.name} declared output {final} but never wrote it")
        for final, tmp in self._pending.items():
            # Move the previous output aside first: at every instant one complete version exists.
            old = None
            if final.exists() or final.is_symlink():
                old = final.with_name(f".old-{uuid.uuid4().hex[:8]}-{final.name}")
                final.rename(old)
            tmp.rename(final)
            if old is not None:
                _remove(old)
        self._pending.clear()

    def _recover_leftovers(self) -> None:
        """Tidy up after a run that was killed (SIGKILL, power loss) and could not clean up:
        temp outputs are deleted; a previous output moved aside but not yet replaced is put
        back, so the last complete version is never lost."""
        if not self.out_dir.is_dir():
            return
        for path in sorted(self.out_dir.iterdir()):
            prefix, _, rest = path.name.partition("-")
            if prefix not in (".tmp", ".old") or "-" not in rest:
                continue
            final = self.out_dir / rest.split("-", 1)[1]
            if prefix == ".old" and not (final.exists() or final.is_symlink()):
                log.warning("restoring %s from an interrupted run", final)
                path.rename(final)
            else:
                log.warning("removing %s left by an interrupted run", path)
                _remove(path)

    def _discard_outputs(self) -> None:
        for tmp in self._pending.values():
            _remove(tmp)
        self._pending.clear()

    def _log_hydra_log(self) -> None:
        """Attach the job's log file (Hydra writes one per job) to the run."""
        if not HydraConfig.initialized():
            return
        hydra_cfg = HydraConfig.get()
        log_file = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
        if log_file.is_file():
            try:
                mlflow.log_artifact(str(log_file), "logs")
            except Exception as err:  # never mask the stage's own outcome
                log.warning("could not attach %s to the MLflow run: %s", log_file, err)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
