"""What every stage shares: CLI defaults, config validation, outputs written atomically,
one MLflow run, and the run.json that links a stage's outputs to that run.

A stage reads like a recipe:

    @hydra.main(version_base="1.3", config_path="..", config_name="params")
    def main(cfg):
        with Stage("tokenize", cfg, upstream=("clean",)) as stage:
            corpus = stage.input("clean", "corpus")
            ...make files under stage.output("tokenizer")...
            stage.write_json("stats.json", stats)  # a DVC metric
            stage.log_metrics(stats)

    if __name__ == "__main__":
        prepare_cli("tokenize")
        main()
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lmpipe.runs import atomic, lineage, tracking
from lmpipe.runs.config import (
    CONF_DIR,
    CONF_NAME,
    LORA_MOVED,
    PARAMS_FILE,
    ConfigError,
    find_project_root,
    register_resolvers,
    stale_params_message,
    validate,
)
from lmpipe.runs.keys import key_of
from lmpipe.runs.processes import process_env

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from lmpipe.training.checkpoint import Checkpoints

log = logging.getLogger(__name__)

# Set (through hydra.job.env_set) when a launcher runs a single job, not a sweep: the job
# then writes the DVC-tracked outputs like a plain run.
SINGLE_JOB_ENV = "LMPIPE_SINGLE_JOB"
# Stages whose runs carry MLflow's system metrics (tracking.system_metrics).
TRAINING_STAGES = ("pretrain", "finetune")


class MissingInputError(FileNotFoundError):
    """An upstream stage's output is not there."""


# Hydra's flags that take a value (argparse): kept in front of the overrides, with it.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                     "--config-name", "-cn", "--config-dir", "-cd",
                     "--experimental-rerun", "--shell-completion", "-sc"}  # fmt: skip
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# How this process's config was based (for the stage's log): params.yaml or conf/.
CONFIG_BASE_ENV = "LMPIPE_CONFIG_BASE"


def split_argv(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides), each in its order. argparse takes
    the overrides as one positional list, so a flag after them (`model=x --cfg job`) fails
    unless the flags are moved in front."""
    flags, overrides = [], []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        flags.append(arg)
        takes_value = arg in _FLAGS_WITH_VALUE or (
            arg in ("--info", "-i") and index < len(args) and args[index] in _INFO_TOPICS
        )
        if takes_value and index < len(args):
            flags.append(args[index])
            index += 1
    return flags, overrides


_SWEEP_FUNCTIONS = ("range(", "choice(", "interval(", "glob(", "tag(", "sort(", "shuffle(")


def is_sweep(value: str) -> bool:
    """Whether an override's value sweeps (Hydra's `a,b`, range(), choice(), ...): a comma
    outside brackets and quotes, or a sweep function."""
    if value.startswith(_SWEEP_FUNCTIONS):
        return True
    depth, quote = 0, ""
    for char in value:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            return True
    return False


def config_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that change lmpipe's config (not Hydra's own settings)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def prepare_cli(stage: str, argv: list[str] | None = None, distributed: bool = False) -> None:
    """Run before Hydra parses the command line: choose the config's base, put the flags
    before the overrides, set Hydra's directories.

    With no config overrides (how DVC runs a stage) the config is params.yaml. With some,
    it is composed from conf/ with them, as `dvc exp run -S` composes params.yaml, so group
    switches work (`model=bert-tiny`, `-m model=tiny,bert-tiny`, `data=local ...`).

    Hydra's own settings cannot live in params.yaml (DVC composes it without the `hydra:`
    node), so their defaults are added to the command line unless the user gave them.

    `hardware.launcher=slurm|submitit_local` (params.yaml or the command line) sends the
    stage through hydra-submitit-launcher: Hydra's multirun mode with the launcher config
    from conf/hydra/launcher/, which reads its settings from `hardware.slurm`. Only a
    `distributed` stage (one that trains) runs as its nodes x tasks_per_node processes;
    any other runs as one task on one node, with at most one GPU, whatever they say.
    """
    argv = sys.argv if argv is None else argv
    root = find_project_root()
    flags, overrides = split_argv(argv[1:])
    if any(o.lstrip("+~").startswith("finetune.lora") for o in overrides):
        raise ConfigError(LORA_MOVED)  # before Hydra says only that the key is unknown
    # Help lists the config groups of the config's directory: conf/'s, never the project
    # root's (params.yaml's), whose .venv and .git Hydra would walk as groups for minutes.
    asks_help = any(arg in ("--help", "-h", "--hydra-help") for arg in flags)
    if config_overrides(overrides) or asks_help:
        register_resolvers()  # ${lmpipe_conf_digest:} in conf/config.yaml
        flags += ["--config-path", str(root / CONF_DIR), "--config-name", CONF_NAME]
        os.environ[CONFIG_BASE_ENV] = f"{CONF_DIR}/ (as `dvc exp run -S` composes it)"
    else:
        message = stale_params_message(root)
        if message:  # logging is not configured yet: the last-resort handler prints it
            log.warning(message)
        os.environ[CONFIG_BASE_ENV] = PARAMS_FILE
    run_dir = f"logs/{stage}/${{now:%Y-%m-%d_%H-%M-%S}}"
    if os.environ.get("RANK", "0") != "0":  # each torchrun process logs to its own directory
        run_dir += f"/rank{os.environ['RANK']}"
    defaults = {
        "hydra.run.dir": run_dir,
        "hydra.sweep.dir": f"multirun/{stage}/${{now:%Y-%m-%d_%H-%M-%S}}",
        "hydra.job.name": stage,
    }
    given = {arg.split("=", 1)[0].lstrip("+") for arg in overrides if "=" in arg}
    overrides.extend(f"{key}={value}" for key, value in defaults.items() if key not in given)
    # conf/hydra/ (launcher and sweeper configs) is not in params.yaml's search path.
    searchpath = f"hydra.searchpath=[file://{root / CONF_DIR}]"
    multirun = any(arg in ("-m", "--multirun") for arg in flags)
    if multirun:
        # A user's sweep: one MLflow parent run, a child per job (lmpipe.runs.sweep), each
        # child named by its swept values only (not by the overrides every job shares).
        fixed = sorted({o.split("=", 1)[0].lstrip("+~") for o in config_overrides(overrides)
                        if "=" in o and not is_sweep(o.split("=", 1)[1])})  # fmt: skip
        if fixed and "hydra.job.config.override_dirname.exclude_keys" not in given:
            overrides.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(fixed)}]")
        overrides.extend([
            "+hydra.callbacks.lmpipe_sweep._target_=lmpipe.runs.sweep.SweepCallback",
            f"+hydra.callbacks.lmpipe_sweep.stage={stage}",
            searchpath,
        ])  # fmt: skip
    launcher = _config_value(root, overrides, "hardware.launcher")
    if launcher and launcher != "none":
        # --cfg/--info show the composed config (launcher included) instead of running.
        inspecting = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help"}
        if not any(arg.split("=", 1)[0] in ("-m", "--multirun", *inspecting) for arg in flags):
            flags.insert(0, "--multirun")
            overrides.append(f"+hydra.job.env_set.{SINGLE_JOB_ENV}=1")
        overrides.extend([*([searchpath] if searchpath not in overrides else []),
                          f"hydra/launcher=lmpipe_{launcher}"])  # fmt: skip
        if not distributed:
            # Each task would run the whole stage on the same GPU; the tasks but the first
            # have no MLflow run (after the first may have registered model versions).
            overrides.extend(["hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=1"])
            # (submitit_local asks for no GPU; composing conf/ again costs a second)
            if launcher == "slurm":
                gpus = _config_value(root, overrides, "hardware.slurm.gpus_per_node")
                if gpus is not None and int(gpus) > 1:
                    overrides.append("hydra.launcher.gpus_per_node=1")
    argv[1:] = [*flags, *overrides]


def _config_value(root: Path, overrides: Sequence[str], key: str) -> Any:
    """`key` as this command sets it: on its command line, else composed from conf/ with
    its config overrides, else in params.yaml."""
    value = _cli_value(overrides, key)
    if value is not None:
        return value
    if config_overrides(overrides):
        return _composed_value(root, overrides, key)
    return _params_value(root, key)


def _cli_value(overrides: Sequence[str], key: str) -> str | None:
    for arg in overrides:
        name, _, value = arg.partition("=")
        if name.lstrip("+") == key:
            return value
    return None


def _composed_value(root: Path, overrides: Sequence[str], key: str) -> Any:
    """`key` in conf/ composed with the config overrides (a group switch such as
    hardware=slurm sets it); None where they are a sweep (a,b), which composes per job."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(root / CONF_DIR), version_base="1.3"):
            return OmegaConf.select(compose(CONF_NAME, list(config_overrides(overrides))), key)
    except (HydraException, ValueError):
        return None


def _params_value(root: Path, key: str) -> Any:
    params = root / "params.yaml"
    return OmegaConf.select(OmegaConf.load(params), key) if params.is_file() else None


def _plain(node: Any) -> Any:
    """A config value as plain Python (dicts, lists, scalars), e.g. for hashing."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _hydra_mode() -> RunMode | None:
    return HydraConfig.get().mode if HydraConfig.initialized() else None


class Stage:
    """Context manager around one stage execution.

    Outputs are created under temporary names and renamed into place only when the body
    finishes, so an interrupted or failing stage never leaves a half-written output or
    destroys the previous one. A multirun job writes under its Hydra job directory, never
    over the DVC-tracked outputs.

    A training stage names the config keys that determine its result (`resume_keys`): its
    `checkpoints` (`<out_dir>/checkpoints`, outside DVC's outs so `dvc repro` keeps them)
    are resumed only by a run of the same keys and inputs, which continues the same MLflow
    run. Under several processes only the main one tracks and writes outputs; the others
    get scratch paths that are thrown away.
    """

    def __init__(
        self,
        name: str,
        cfg: DictConfig,
        upstream: Sequence[str] = (),
        resume_keys: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.cfg = validate(cfg)
        self.env = process_env()
        outputs = Path(self.cfg.outputs_dir)
        self.inputs_root = outputs
        # A job of a user's sweep (a launcher's single job is an ordinary run).
        self.sweep_job = _hydra_mode() == RunMode.MULTIRUN and not os.environ.get(SINGLE_JOB_ENV)
        if self.sweep_job:
            outputs = Path(HydraConfig.get().runtime.output_dir) / self.cfg.outputs_dir
        self.out_dir = outputs / name
        self.upstream = {up: self.inputs_root / up for up in upstream}
        self.checkpoints: Checkpoints | None = None
        self.dvc_inputs: list[lineage.Input] | None = None
        if resume_keys:
            identity = {key: _plain(OmegaConf.select(self.cfg, key)) for key in resume_keys}
            # only the main process reads and writes checkpoint states
            identity["inputs"] = self._input_digests() if self.env.is_main else None
            identity["processes"] = self.env.world_size
            # imported here: torch is for training stages only (clean and tokenize start faster)
            from lmpipe.training.checkpoint import Checkpoints

            self.checkpoints = Checkpoints(self.out_dir / "checkpoints", key_of(identity), self.env)
        self._pending: dict[Path, Path] = {}
        self._scratch: Path | None = None
        self._run_ctx: Any = None
        self.run_id: str = ""

    def _input_digests(self) -> dict[str, Any]:
        """What a checkpoint's inputs are, by content: the md5s DVC gives the stage's data
        deps (recorded as the run's lineage too), so rerunning upstream stages that
        reproduce the same files keeps the checkpoint. Outside a DVC stage, the upstream
        runs stand in for their outputs."""
        self.dvc_inputs = lineage.dvc_deps(self.name, find_project_root())
        data = {i.name: i.digest for i in self.dvc_inputs if i.context != lineage.CODE}
        if data:
            return data
        return {
            "upstream_runs": {
                up: (tracking.read_run_file(path) or {}).get("run_id")
                for up, path in self.upstream.items()
            }
        }

    # -- paths -----------------------------------------------------------------------------

    def input(self, stage: str, name: str) -> Path:
        path = self.inputs_root / stage / name
        if not path.exists():
            raise MissingInputError(
                f"{self.name} needs {path}, an output of stage '{stage}': run `dvc repro {stage}`"
            )
        return path

    def output(self, name: str) -> Path:
        """A temporary path that becomes `<out_dir>/<name>` when the stage succeeds."""
        if not self.env.is_main:
            self._scratch = self._scratch or Path(tempfile.mkdtemp(prefix=f"lmpipe-{self.name}-"))
            return self._scratch / name
        final = self.out_dir / name
        tmp = atomic.temp_path(final)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._pending[final] = tmp
        return tmp

    # -- results ---------------------------------------------------------------------------

    def metric_logger(self) -> tracking.MetricLogger:
        """Step metrics to this run and to `curves/<series>.csv` (DVC plots)."""
        if not self.env.is_main:
            return tracking.MetricLogger(None)
        return tracking.MetricLogger(self.run_id, csv_dir=self.output("curves"))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.env.is_main:
            tracking.send_or_save_metrics(self.run_id, metrics, step)

    def log_inputs(self, inputs: Iterable[lineage.Input]) -> None:
        """Record inputs beyond the DVC deps (logged at start), e.g. the raw sources."""
        if self.env.is_main:
            tracking.log_inputs(self.run_id, list(inputs))

    # Artifacts go through the outbox like metrics: a store that is down never fails a stage.

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file to this run; a pending output goes under its final name, not the temp one."""
        final = next((f for f, tmp in self._pending.items() if tmp == path), path)
        self._log_written(final.name, lambda copy: shutil.copy2(path, copy), artifact_path)

    def log_figure(self, figure: Figure, name: str) -> None:
        self._log_written(name, lambda path: figure.savefig(path, dpi=110))

    def log_dict(self, payload: Any, name: str) -> None:
        self._log_written(name, lambda path: path.write_text(json.dumps(payload, indent=2)))

    def log_table(self, frame: pd.DataFrame, name: str) -> None:
        """A table the MLflow UI shows as one (mlflow.log_table); saved as its JSON if the
        store is down."""
        self._log_written(
            name,
            lambda path: path.write_text(frame.to_json(orient="split", index=False)),
            send=lambda: mlflow.log_table(frame, artifact_file=name, run_id=self.run_id),
        )

    def _log_written(
        self,
        name: str,
        write: Callable[[Path], object],
        artifact_path: str | None = None,
        send: Callable[[], None] | None = None,
    ) -> None:
        """Write `name` to a scratch file with `write`, then send it (or save it for replay)."""
        if not self.env.is_main:
            return
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / name
            write(path)
            tracking.send_or_save_artifact(self.run_id, path, artifact_path, send)

    def write_json(self, name: str, payload: Mapping[str, Any]) -> Path:
        path = self.output(name)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Stage:
        if not self.env.is_main:
            return self
        log.info("stage %s: outputs in %s", self.name, self.out_dir)
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        log.info("stage %s: config from %s%s", self.name,
                 os.environ.get(CONFIG_BASE_ENV, PARAMS_FILE),
                 f" with {' '.join(overrides)}" if overrides else "")  # fmt: skip
        atomic.recover(self.out_dir)
        resume_run = None
        state = self.checkpoints.resumable() if self.checkpoints else None
        abandoned = self.checkpoints.discarded if self.checkpoints else None
        if abandoned and abandoned.get("run_id"):
            tracking.end_abandoned_run(abandoned["run_id"])
        if state is not None:
            resume_run = state.get("run_id") or None
            if resume_run and not tracking.run_exists(resume_run):
                log.warning("MLflow run %s of the checkpoint is gone: a new run", resume_run)
                resume_run = None
            log.info("stage %s: resuming step %s of MLflow run %s", self.name, state["step"],
                     resume_run)  # fmt: skip
        run_name = self.name
        if self.sweep_job:  # named by its swept values, e.g. "finetune finetune.optim.lr=0.001"
            run_name = f"{self.name} {HydraConfig.get().job.override_dirname}".strip()
        self._run_ctx = tracking.stage_run(
            self.name,
            self.cfg,
            self.upstream,
            run_id=resume_run,
            run_name=run_name,
            inputs=self.dvc_inputs,
            system_metrics=self.name in TRAINING_STAGES and self.cfg.tracking.system_metrics,
        )
        run = self._run_ctx.__enter__()
        self.run_id = run.info.run_id
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return self._finish(exc_type, exc, tb)
        finally:
            if "lmpipe.training.distributed" in sys.modules:  # a process group may be up
                sys.modules["lmpipe.training.distributed"].shutdown()

    def _finish(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if not self.env.is_main:
            if self._scratch is not None:
                atomic.remove(self._scratch)
            return False
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
            atomic.replace(final, tmp)
        self._pending.clear()

    def _discard_outputs(self) -> None:
        for tmp in self._pending.values():
            atomic.remove(tmp)
        self._pending.clear()

    def _log_hydra_log(self) -> None:
        """Attach the job's log file (Hydra writes one per job) to the run."""
        if not HydraConfig.initialized():
            return
        hydra_cfg = HydraConfig.get()
        log_file = Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log"
        if log_file.is_file():
            self.log_artifact(log_file, "logs")
