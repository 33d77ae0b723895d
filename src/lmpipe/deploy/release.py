"""Deployment: the fine-tuned model as an MLflow pyfunc, gated, registered, aliased, measured.

The pyfunc is logged from code (`serving.py`), not pickled, so loading it unpickles nothing.
Every candidate is registered. It becomes `champion` only if its gate metric passes the
threshold and is not worse than the current champion's; otherwise it is the `challenger`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from lmpipe.deploy import registry
from lmpipe.deploy.serving import DEFAULT_PARAMS, INPUT_COLUMN
from lmpipe.runs.config import ConfigError, DeployConfig, GateConfig

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    metric: str
    value: float
    mode: str
    threshold: float
    passed_threshold: bool
    champion_version: str | None = None
    champion_value: float | None = None
    not_worse_than_champion: bool | None = None  # None: no champion (or no check)
    baseline: str | None = None
    baseline_value: float | None = None
    margin: float = 0.0
    beat_baseline: bool | None = None  # None: no baseline asked for

    @property
    def passed(self) -> bool:
        return (
            self.passed_threshold
            and self.beat_baseline is not False
            and self.not_worse_than_champion is not False
        )


def better_or_equal(value: float, reference: float, mode: str, tolerance: float = 0.0) -> bool:
    return value <= reference + tolerance if mode == "min" else value >= reference - tolerance


def check_gate(
    metrics: Mapping[str, float],
    gate: GateConfig,
    champion: registry.RegisteredVersion | None = None,
    tolerance: float | None = 0.0,
) -> GateResult:
    """Threshold on `gate.metric`, beating `gate.baseline` by `gate.margin` (if set), then
    (with a champion and a tolerance) not worse than the champion."""
    if gate.metric not in metrics:
        raise ConfigError(
            f"deploy.gates: metric '{gate.metric}' is not an evaluate metric "
            f"(available: {', '.join(sorted(metrics))})"
        )
    value = float(metrics[gate.metric])
    result = GateResult(
        gate.metric, value, gate.mode, gate.threshold,
        better_or_equal(value, gate.threshold, gate.mode),
    )  # fmt: skip
    if gate.baseline is not None:
        result.baseline, result.margin = gate.baseline, gate.margin
        result.baseline_value = baseline_value(metrics, gate)
        result.beat_baseline = beats_baseline(value, result.baseline_value, gate)
    if champion is not None and tolerance is not None and gate.metric in champion.metrics:
        result.champion_version = champion.version
        result.champion_value = champion.metrics[gate.metric]
        result.not_worse_than_champion = better_or_equal(
            value, result.champion_value, gate.mode, tolerance
        )
    return result


def baseline_value(metrics: Mapping[str, float], gate: GateConfig) -> float:
    if gate.baseline not in metrics:
        raise ConfigError(
            f"deploy.gates: baseline '{gate.baseline}' is not an evaluate metric "
            f"(available: {', '.join(sorted(metrics))})"
        )
    return float(metrics[gate.baseline])


def beats_baseline(value: float, baseline: float, gate: GateConfig) -> bool:
    """Better than the baseline by at least the margin, in the gate's direction."""
    if gate.mode == "max":
        return value >= baseline + gate.margin
    return value <= baseline - gate.margin


def requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was trained with."""
    names = [
        "omegaconf", "pyarrow", "tqdm", "mlflow", "torch", "transformers", "tokenizers",
        "numpy", "pandas", "pyyaml", "safetensors", "peft",
    ]  # fmt: skip
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def log_and_register(
    model_dir: Path,
    task: str,
    name: str,
    cfg: DeployConfig,
    artifact: str = "model",
    quantize: str | None = None,
) -> str:
    """Log the pyfunc in the active run and register it as `name`; returns the version."""
    column = INPUT_COLUMN[task]
    if task == "classify":
        example = pd.DataFrame({column: [cfg.smoke_text]})
        signature = infer_signature(example, pd.DataFrame({"label": ["x"], "confidence": [0.5]}))
    else:
        example = pd.DataFrame({column: [cfg.smoke_prompt]})
        params = {**DEFAULT_PARAMS, "max_new_tokens": cfg.max_new_tokens}
        signature = infer_signature(example, ["a reply"], params=params)
    info = mlflow.pyfunc.log_model(
        name=artifact,
        python_model=str(Path(__file__).with_name("serving.py")),
        artifacts={"model": str(model_dir)},
        code_paths=[str(Path(__file__).parents[1])],
        model_config={"task": task, **({"quantize": quantize} if quantize else {})},
        signature=signature,
        input_example=example,
        pip_requirements=requirements(),
        registered_model_name=name,
    )
    return str(info.registered_model_version)


@dataclass
class Deployment:
    model_name: str
    version: str
    model_uri: str
    alias: str
    gate: dict[str, Any]
    smoke_input: str
    smoke_output: Any
    smoke_latency_seconds: float
    quantized: dict[str, Any] | None = field(default=None)


def timed_predictions(model: Any, inputs: pd.DataFrame, params: dict | None) -> list[float]:
    """Seconds per single-row request, one request per row, after one warm-up request."""
    model.predict(inputs.iloc[:1], params=params)
    seconds = []
    for row in range(len(inputs)):
        start = time.perf_counter()
        model.predict(inputs.iloc[row : row + 1], params=params)
        seconds.append(time.perf_counter() - start)
    return seconds


def deploy(
    model_dir: Path,
    task: str,
    metrics: Mapping[str, float],
    cfg: DeployConfig,
    tags: Mapping[str, str],
    requests: list[str],
) -> Deployment:
    """Gate, register (+ the int8 variant), set aliases, and measure through the registry."""
    name = cfg.registered_model_name
    champion = registry.aliased(name, registry.CHAMPION)
    gate = check_gate(metrics, cfg.gates[task], champion, cfg.champion_tolerance)
    model_version = log_and_register(model_dir, task, name, cfg)
    client = MlflowClient()
    for key, value in {**tags, "gate_passed": str(gate.passed)}.items():
        client.set_model_version_tag(name, model_version, key, value)
    alias = registry.CHAMPION if gate.passed else registry.CHALLENGER
    registry.set_alias(name, alias, model_version)
    if gate.passed:
        registry.drop_alias(name, registry.CHALLENGER)  # the challenger, if any, lost
        log.info("gate passed (%s=%.4f): %s version %s is the champion", gate.metric, gate.value,
                 name, model_version)  # fmt: skip
    else:
        log.warning("gate failed (%s): %s version %s registered as the challenger",
                    gate_reason(gate), name, model_version)  # fmt: skip

    uri = f"models:/{name}@{alias}"
    served = mlflow.pyfunc.load_model(uri)
    column = INPUT_COLUMN[task]
    smoke_input = cfg.smoke_text if task == "classify" else cfg.smoke_prompt
    params = None if task == "classify" else {"max_new_tokens": cfg.max_new_tokens}
    start = time.perf_counter()
    output = served.predict(pd.DataFrame({column: [smoke_input]}), params=params)
    latency = time.perf_counter() - start
    smoke_output = output.to_dict("records")[0] if isinstance(output, pd.DataFrame) else output[0]
    log.info("smoke test through %s: %r -> %r (%.3fs)", uri, smoke_input, smoke_output, latency)

    quantized = None
    if cfg.quantized_variant:
        quantized = deploy_quantized(model_dir, task, metrics, cfg, served, requests, alias,
                                     model_version, tags)  # fmt: skip
    return Deployment(
        model_name=name,
        version=model_version,
        model_uri=uri,
        alias=alias,
        gate={**asdict(gate), "passed": gate.passed},
        smoke_input=smoke_input,
        smoke_output=smoke_output,
        smoke_latency_seconds=latency,
        quantized=quantized,
    )


def gate_reason(gate: GateResult) -> str:
    if not gate.passed_threshold:
        return f"{gate.metric}={gate.value:.4f}, {gate.mode} threshold {gate.threshold:.4f}"
    if gate.beat_baseline is False:
        return (
            f"{gate.metric}={gate.value:.4f} does not beat {gate.baseline}="
            f"{gate.baseline_value:.4f} by the margin {gate.margin:.4f}"
        )
    return (
        f"{gate.metric}={gate.value:.4f} is worse than champion version "
        f"{gate.champion_version}'s {gate.champion_value:.4f}"
    )


def deploy_quantized(
    model_dir: Path,
    task: str,
    metrics: Mapping[str, float],
    cfg: DeployConfig,
    served: Any,
    requests: list[str],
    alias: str,
    source_version: str,
    tags: Mapping[str, str],
) -> dict[str, Any]:
    """Register the int8 variant beside the fp32 model, with its size, latency and quality."""
    from lmpipe.deploy.quantize import state_size_bytes

    name = f"{cfg.registered_model_name}-int8"
    model_version = log_and_register(model_dir, task, name, cfg, "model_int8", "int8")
    # The variant must pass the same threshold on its own score (evaluate's int8_* metrics).
    gate = cfg.gates[task]
    own_metric = "int8_" + gate.metric.removeprefix("finetuned_")
    own_value = metrics.get(own_metric)
    passed = own_value is None or (
        better_or_equal(float(own_value), gate.threshold, gate.mode)
        and (
            gate.baseline is None
            or beats_baseline(float(own_value), baseline_value(metrics, gate), gate)
        )
    )
    variant_alias = alias if passed else registry.CHALLENGER
    client = MlflowClient()
    source = f"{cfg.registered_model_name}/{source_version}"
    for key, value in {**tags, "quantized_from": source, "gate_passed": str(passed)}.items():
        client.set_model_version_tag(name, model_version, key, value)
    registry.set_alias(name, variant_alias, model_version)
    if variant_alias == registry.CHAMPION:
        registry.drop_alias(name, registry.CHALLENGER)
    elif not passed:
        log.warning("int8 variant %s/%s: %s=%.4f fails the %s threshold %.4f or the baseline "
                    "%s: registered as the challenger", name, model_version, own_metric,
                    float(own_value), gate.mode, gate.threshold, gate.baseline)  # fmt: skip
    quantized = mlflow.pyfunc.load_model(f"models:/{name}/{model_version}")

    inputs = pd.DataFrame({INPUT_COLUMN[task]: requests[: cfg.latency_requests]})
    # Replies of the same length on both sides: a model that stops early is not faster.
    params = None if task == "classify" else {"max_new_tokens": cfg.max_new_tokens,
                                              "min_new_tokens": cfg.max_new_tokens}  # fmt: skip
    fp32_seconds = timed_predictions(served, inputs, params)
    int8_seconds = timed_predictions(quantized, inputs, params)
    fp32_model = served.unwrap_python_model().model
    int8_model = quantized.unwrap_python_model().model
    report = {
        "model_name": name,
        "version": model_version,
        "alias": variant_alias,
        "fp32_bytes": state_size_bytes(fp32_model),
        "int8_bytes": state_size_bytes(int8_model),
        "fp32_latency_p50_seconds": statistics.median(fp32_seconds),
        "int8_latency_p50_seconds": statistics.median(int8_seconds),
        "requests": len(inputs),
    }
    report["size_ratio"] = report["int8_bytes"] / report["fp32_bytes"]
    report["latency_ratio"] = report["int8_latency_p50_seconds"] / report[
        "fp32_latency_p50_seconds"]  # fmt: skip
    # Quality: evaluate scored the same int8 recipe on the held-out set.
    for key, value in metrics.items():
        if key.startswith("int8_"):
            report[f"quality.{key}"] = float(value)
    log.info("int8 variant %s/%s: %.1f MB -> %.1f MB, p50 %.1f ms -> %.1f ms", name,
             model_version, report["fp32_bytes"] / 1e6, report["int8_bytes"] / 1e6,
             report["fp32_latency_p50_seconds"] * 1e3,
             report["int8_latency_p50_seconds"] * 1e3)  # fmt: skip
    return report
