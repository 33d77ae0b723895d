"""The MLflow Model Registry as lmpipe uses it: a champion, a challenger, their metrics.

A registered version is logged by a deploy run, which also logs the evaluate metrics the
version was gated on; so "the champion's metrics" are the metrics of the run behind the
version that holds the `champion` alias.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)


def aliased(name: str, alias: str = CHAMPION) -> RegisteredVersion | None:
    """The version of registered model `name` that holds `alias`, or None."""
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    metrics = dict(client.get_run(version.run_id).data.metrics) if version.run_id else {}
    return RegisteredVersion(name, str(version.version), version.run_id or "", metrics)


def compare(
    candidate: Mapping[str, float], incumbent: RegisteredVersion | None
) -> dict[str, object]:
    """Every metric both have: candidate, champion and their difference (candidate - champion)."""
    if incumbent is None:
        return {"champion": None, "metrics": {}}
    shared = sorted(set(candidate) & set(incumbent.metrics))
    return {
        "champion": {"name": incumbent.name, "version": incumbent.version},
        "metrics": {
            key: {
                "candidate": float(candidate[key]),
                "champion": incumbent.metrics[key],
                "difference": float(candidate[key]) - incumbent.metrics[key],
            }
            for key in shared
        },
    }


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, version)


def drop_alias(name: str, alias: str) -> None:
    """Remove `alias` from registered model `name` if it is set."""
    client = MlflowClient()
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise


def run_table(run_id: str, artifact: str) -> pd.DataFrame | None:
    """A CSV artifact of a run as a table; None if the run has no such artifact."""
    if not run_id:
        return None
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")
    except (MlflowException, OSError):
        return None
    return pd.read_csv(io.StringIO(text), keep_default_na=False)
