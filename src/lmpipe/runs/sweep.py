"""Hydra multirun sweeps as one MLflow parent run with a child run per job.

`prepare_cli` adds `SweepCallback` to a user's `-m` run. At sweep start it creates the store
and the experiment once (parallel first writers race in MLflow's schema migration) and a
parent run, whose id the jobs inherit through the environment: any launcher's job process
(in-process, joblib workers, submitit) starts its stage run with `parent_run_id=`. At sweep
end the parent gets the best objective of its children and a plot of the objective against
each swept value.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from lmpipe.runs import tracking

log = logging.getLogger(__name__)

PARENT_ENV = tracking.SWEEP_PARENT_ENV
TAG_SWEEP = "lmpipe.sweep"
# The value each stage's main() returns (the sweep objective), as logged in its run.
OBJECTIVES = {"finetune": ("best_val_loss", "min"), "pretrain": ("val_loss", "min")}


class SweepCallback(Callback):
    def __init__(self, stage: str = "") -> None:
        self.stage = stage
        self.parent: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking.configure()
        experiment_id = tracking.ensure_experiment(config.tracking.experiment)
        overrides = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        run = MlflowClient().create_run(
            experiment_id,
            run_name=f"{self.stage} sweep",
            tags={TAG_SWEEP: self.stage, "lmpipe.sweep.overrides": " ".join(overrides)},
        )
        self.parent = run.info.run_id
        os.environ[PARENT_ENV] = self.parent
        log.info("sweep: parent MLflow run %s", self.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        os.environ.pop(PARENT_ENV, None)
        client = MlflowClient()
        parent = client.get_run(self.parent)
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent}'",
        )
        metric, mode = OBJECTIVES.get(self.stage, ("val_loss", "min"))
        scored = [(r.data.metrics[metric], r) for r in children if metric in r.data.metrics]
        failed = sum(r.info.status != "FINISHED" for r in children)
        client.log_metric(self.parent, "children", len(children))
        client.log_metric(self.parent, "failed_children", failed)
        if scored:
            best_value, best = (min if mode == "min" else max)(scored, key=lambda item: item[0])
            client.log_metric(self.parent, f"best_{metric}", best_value)
            client.set_tag(self.parent, "lmpipe.sweep.best_run", best.info.run_id)
            swept = _swept_keys(config)
            for key in swept:
                figure = _objective_figure(scored, key, metric)
                if figure is not None:
                    client.log_figure(self.parent, figure, f"sweep_{key}.png")
                    plt.close(figure)
            log.info("sweep: best %s=%.4f (run %s) of %d jobs", metric, best_value,
                     best.info.run_id, len(children))  # fmt: skip
        client.set_terminated(self.parent, "FINISHED" if not failed else "FAILED")


def _swept_keys(config: DictConfig) -> list[str]:
    """Config keys given several values: on the command line (a,b,c or a sweep function) or
    in a sweeper's search space (hydra.sweeper.params, e.g. Optuna's)."""
    keys = list(OmegaConf.select(config, "hydra.sweeper.params") or {})
    for override in OmegaConf.select(config, "hydra.overrides.task") or []:
        key, _, value = str(override).partition("=")
        sweep_function = value.startswith(("range(", "choice(", "interval(", "tag("))
        if ("," in value or sweep_function) and key.lstrip("+~") not in keys:
            keys.append(key.lstrip("+~"))
    return keys


def _objective_figure(scored: list, key: str, metric: str) -> Any:
    points = []
    for value, run in scored:
        raw = run.data.params.get(key)
        try:
            points.append((float(raw), value))
        except (TypeError, ValueError):
            continue
    if not points:
        return None
    points.sort()
    figure, axis = plt.subplots(figsize=(6, 4), layout="constrained")
    axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    if all(p[0] > 0 for p in points):
        axis.set_xscale("log")
    axis.set_xlabel(key)
    axis.set_ylabel(metric)
    axis.set_title(f"sweep: {metric} against {key}")
    return figure
