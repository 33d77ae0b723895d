"""Deployment: the fine-tuned model as an MLflow pyfunc, registered, gated, smoke-tested.

The pyfunc is logged from code (`serving.py`), not pickled, so loading it unpickles nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from lmpipe.config import ConfigError, DeployConfig, GateConfig
from lmpipe.serving import DEFAULT_PARAMS

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    metric: str
    value: float
    mode: str
    threshold: float
    passed: bool


def check_gate(metrics: Mapping[str, float], gate: GateConfig) -> GateResult:
    if gate.metric not in metrics:
        raise ConfigError(
            f"deploy.gate.metric: '{gate.metric}' is not an evaluate metric "
            f"(available: {', '.join(sorted(metrics))})"
        )
    value = float(metrics[gate.metric])
    passed = value <= gate.threshold if gate.mode == "min" else value >= gate.threshold
    return GateResult(gate.metric, value, gate.mode, gate.threshold, passed)


def requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was trained with."""
    names = [
        "omegaconf",
        "pyarrow",
        "tqdm",
        "mlflow",
        "torch",
        "transformers",
        "tokenizers",
        "numpy",
        "pandas",
        "pyyaml",
        "safetensors",
    ]
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


@dataclass
class Deployment:
    model_name: str
    version: str
    model_uri: str
    alias: str | None
    gate: dict[str, Any]
    smoke_prompt: str
    smoke_reply: str
    smoke_latency_seconds: float


def log_and_register(model_dir: Path, cfg: DeployConfig, lineage: Mapping[str, str]) -> str:
    """Log the pyfunc in the active run and register it; returns the registered version."""
    example = pd.DataFrame({"prompt": [cfg.smoke_prompt]})
    params = {**DEFAULT_PARAMS, "max_new_tokens": cfg.max_new_tokens}
    signature = infer_signature(example, ["a reply"], params=params)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("serving.py")),
        artifacts={"model": str(model_dir)},
        code_paths=[str(Path(__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=requirements(),
        registered_model_name=cfg.registered_model_name,
    )
    model_version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in lineage.items():
        client.set_model_version_tag(cfg.registered_model_name, model_version, key, value)
    return model_version


def deploy(
    model_dir: Path, metrics: Mapping[str, float], cfg: DeployConfig, lineage: Mapping[str, str]
) -> Deployment:
    """Register; set the alias if the gate passes; load back through the registry and answer."""
    gate = check_gate(metrics, cfg.gate)
    model_version = log_and_register(model_dir, cfg, lineage)
    client = MlflowClient()
    client.set_model_version_tag(
        cfg.registered_model_name, model_version, "gate_passed", str(gate.passed)
    )
    if gate.passed:
        client.set_registered_model_alias(cfg.registered_model_name, cfg.alias, model_version)
        uri = f"models:/{cfg.registered_model_name}@{cfg.alias}"
        log.info(
            "gate passed (%s=%.4f): %s -> version %s",
            gate.metric,
            gate.value,
            cfg.alias,
            model_version,
        )
    else:
        uri = f"models:/{cfg.registered_model_name}/{model_version}"
        log.warning(
            "gate failed (%s=%.4f, %s threshold %.4f): version %s registered without alias '%s'",
            gate.metric,
            gate.value,
            gate.mode,
            gate.threshold,
            model_version,
            cfg.alias,
        )
    served = mlflow.pyfunc.load_model(uri)
    start = time.perf_counter()
    reply = served.predict(
        pd.DataFrame({"prompt": [cfg.smoke_prompt]}), params={"max_new_tokens": cfg.max_new_tokens}
    )[0]
    latency = time.perf_counter() - start
    log.info("smoke test through %s: %r -> %r (%.3fs)", uri, cfg.smoke_prompt, reply, latency)
    return Deployment(
        model_name=cfg.registered_model_name,
        version=model_version,
        model_uri=uri,
        alias=cfg.alias if gate.passed else None,
        gate=asdict(gate),
        smoke_prompt=cfg.smoke_prompt,
        smoke_reply=reply,
        smoke_latency_seconds=latency,
    )
