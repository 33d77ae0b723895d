"""Deployment: the fine-tuned model as an MLflow pyfunc, gated, registered, aliased, measured.

The pyfunc is logged from code (`serving.py`), not pickled, so loading it unpickles nothing.
Every candidate is registered. It becomes `champion` only if its gate metric passes the
threshold and is not worse than the current champion's (and, with a significance level, a
paired bootstrap over the held-out examples both were scored on finds it better);
otherwise it is the `challenger`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from lmpipe.deploy import registry
from lmpipe.deploy.serving import DEFAULT_PARAMS
from lmpipe.deploy.variants import (
    BY_NAME,
    compared_with,
    fastest_within,
    measure,
    own_metric,
    quality_loss,
    selected,
)
from lmpipe.evaluation.intervals import statistic_interval
from lmpipe.runs.config import ConfigError, DeployConfig, GateConfig
from lmpipe.tasks.base import FinetuningTask
from lmpipe.training.model import count_parameters

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
    # The paired bootstrap against the champion (deploy.gates.<task>.significance): the
    # interval of (model - champion) on their shared held-out examples, and whether it
    # shows the model better. None: not asked for, or no champion to beat.
    significance: float | None = None
    difference_interval: tuple[float, float] | None = None
    shared_examples: int | None = None
    significantly_better: bool | None = None

    @property
    def passed(self) -> bool:
        return (
            self.passed_threshold
            and self.beat_baseline is not False
            and self.not_worse_than_champion is not False
            and self.significantly_better is not False
        )


def better_or_equal(value: float, reference: float, mode: str, tolerance: float = 0.0) -> bool:
    return value <= reference + tolerance if mode == "min" else value >= reference - tolerance


def check_gate(
    metrics: Mapping[str, float],
    gate: GateConfig,
    champion: registry.RegisteredVersion | None = None,
    tolerance: float | None = 0.0,
    examples: pd.DataFrame | None = None,
    champion_examples: pd.DataFrame | None = None,
) -> GateResult:
    """Threshold on `gate.metric`, beating `gate.baseline` by `gate.margin` (if set), then
    (with a champion and a tolerance) not worse than the champion, then (with
    `gate.significance` and a champion) significantly better than it on the held-out
    examples both were scored on (`examples`, `champion_examples`: id, value, weight)."""
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
    if champion is not None and gate.metric in champion.metrics:
        result.champion_version = champion.version
        result.champion_value = champion.metrics[gate.metric]
        if tolerance is not None:
            result.not_worse_than_champion = better_or_equal(
                value, result.champion_value, gate.mode, tolerance
            )
    if gate.significance is not None and champion is not None:
        result.significance = gate.significance
        if examples is None:
            raise ConfigError(
                f"deploy.gates: significance needs per-example scores of '{gate.metric}', and "
                "the task has none for it (use a metric that is a mean over examples: "
                "accuracy, exact match, loss)"
            )
        if champion_examples is None:
            log.warning(
                "gate: champion version %s has no per-example scores (%s): it cannot be shown "
                "worse, so it stays", champion.version, EXAMPLES_ARTIFACT,
            )  # fmt: skip
            result.significantly_better = False
        else:
            low, high, shared = paired_difference(examples, champion_examples, gate.significance)
            result.difference_interval, result.shared_examples = (low, high), shared
            # One-sided at `significance`: the two-sided interval at 1 - 2 * level excludes 0.
            result.significantly_better = low > 0 if gate.mode == "max" else high < 0
    return result


# Where a deploy run keeps the per-example scores of its gate metric: the next challenger
# is compared with them, example by example.
EXAMPLES_ARTIFACT = "gate/examples.csv"


def paired_difference(
    examples: pd.DataFrame, champion_examples: pd.DataFrame, level: float = 0.05, seed: int = 0
) -> tuple[float, float, int]:
    """The (1 - 2 * level) percentile-bootstrap interval of the metric's difference, model
    minus champion, over the examples both were scored on (resampled together; the metric
    is the weighted mean sum(value) / sum(weight)), and how many examples that is."""
    joined = examples.merge(champion_examples, on="id", suffixes=("", "_champion"))
    if joined.empty:
        raise ValueError(
            "the model and the champion share no held-out example: their test splits "
            "differ, so they cannot be compared example by example"
        )
    value, weight = joined["value"].to_numpy(float), joined["weight"].to_numpy(float)
    other = joined["value_champion"].to_numpy(float)
    other_weight = joined["weight_champion"].to_numpy(float)

    def difference(idx: np.ndarray) -> np.ndarray:
        return (value[idx].sum(-1) / weight[idx].sum(-1)
                - other[idx].sum(-1) / other_weight[idx].sum(-1))  # fmt: skip

    low, high = statistic_interval(difference, len(joined), confidence=1 - 2 * level, seed=seed)
    return low, high, len(joined)


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
    task: FinetuningTask,
    name: str,
    cfg: DeployConfig,
    artifact: str = "model",
    quantize: str | None = None,
) -> str:
    """Log the pyfunc in the active run and register it as `name`; returns the version."""
    serving = task.serving
    example = pd.DataFrame({serving.input_column: [smoke_input(task, cfg)]})
    params = ({**DEFAULT_PARAMS, "max_new_tokens": cfg.max_new_tokens} if serving.generates
              else None)  # fmt: skip
    signature = infer_signature(example, serving.output_example, params=params)
    info = mlflow.pyfunc.log_model(
        name=artifact,
        python_model=str(Path(__file__).with_name("serving.py")),
        artifacts={"model": str(model_dir)},
        code_paths=[str(Path(__file__).parents[1])],
        model_config={"task": task.name, **recipe(quantize, cfg)},
        signature=signature,
        input_example=example,
        pip_requirements=requirements(),
        registered_model_name=name,
    )
    return str(info.registered_model_version)


def recipe(quantize: str | None, cfg: DeployConfig) -> dict[str, Any]:
    """What the pyfunc needs to rebuild a quantized variant at load time (serving.py)."""
    if quantize is None:
        return {}
    q = cfg.quantize
    return {"quantize": quantize, "group_size": int(q.group_size), "symmetric": bool(q.symmetric)}


def smoke_input(task: FinetuningTask, cfg: DeployConfig) -> str:
    """The one request every registered model answers after registration."""
    return cfg.smoke_prompt if task.serving.generates else cfg.smoke_text


def request_params(task: FinetuningTask, cfg: DeployConfig, **extra: int) -> dict | None:
    """The params of a request to `task`'s served model: generation settings, or none."""
    return {"max_new_tokens": cfg.max_new_tokens, **extra} if task.serving.generates else None


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
    # fp32, int8, pruned, pruned-int8 -> registered name/version/alias, own gate, params,
    # size, latency and held-out quality (lmpipe.deploy.variants)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The fastest variant (request p50) within deploy.max_quality_loss of fp32's quality.
    fastest_within_quality_budget: str | None = None


def deploy(
    model_dir: Path,
    task: FinetuningTask,
    metrics: Mapping[str, float],
    cfg: DeployConfig,
    tags: Mapping[str, str],
    requests: list[str],
    pruned_dir: Path | None = None,
    examples: pd.DataFrame | None = None,
) -> Deployment:
    """Gate, register, set aliases and smoke-test the fp32 model; register its variants
    (int8, and with `pruned_dir` pruned and pruned + int8), each gated on its own held-out
    score in `metrics`; measure every variant through the registry. `examples`: the gate
    metric per held-out example (id, value, weight), kept with the run for the paired test."""
    name = cfg.registered_model_name
    champion = registry.aliased(name, registry.CHAMPION)
    champion_examples = None
    gate_config = task.gate(cfg)
    if champion is not None and gate_config.significance is not None:
        champion_examples = registry.run_table(champion.run_id, EXAMPLES_ARTIFACT)
    gate = check_gate(metrics, gate_config, champion, cfg.champion_tolerance, examples,
                      champion_examples)  # fmt: skip
    if examples is not None:  # for the next challenger's paired comparison
        mlflow.log_text(examples.to_csv(index=False), EXAMPLES_ARTIFACT)
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
    smoke = smoke_input(task, cfg)
    start = time.perf_counter()
    output = served.predict(pd.DataFrame({task.serving.input_column: [smoke]}),
                            params=request_params(task, cfg))  # fmt: skip
    latency = time.perf_counter() - start
    smoke_output = output.to_dict("records")[0] if isinstance(output, pd.DataFrame) else output[0]
    log.info("smoke test through %s: %r -> %r (%.3fs)", uri, smoke, smoke_output, latency)

    sources = {"finetuned": model_dir, "pruned": pruned_dir}
    wanted = [v for v in selected(cfg.quantize)
              if v.name != "fp32" and sources[v.source] is not None]  # fmt: skip
    builds = {v.name: (sources[v.source], v.quantize) for v in wanted}
    variants = {"fp32": {"model_name": name, "version": model_version, "alias": alias,
                         "gate_passed": gate.passed}}  # fmt: skip
    for variant, (directory, quantize) in builds.items():
        variants[variant] = register_variant(variant, directory, quantize, task, metrics, cfg,
                                             alias, f"{name}/{model_version}", tags)  # fmt: skip
    measure_variants(variants, served, task, metrics, cfg, requests or [smoke])
    fastest = fastest_within(variants, cfg.max_quality_loss, "request_p50_seconds")
    log.info("fastest variant within %.1f%% of fp32's %s: %s", 100 * cfg.max_quality_loss,
             gate.metric, fastest)  # fmt: skip
    return Deployment(
        model_name=name,
        version=model_version,
        model_uri=uri,
        alias=alias,
        gate={**asdict(gate), "passed": gate.passed},
        smoke_input=smoke,
        smoke_output=smoke_output,
        smoke_latency_seconds=latency,
        variants=variants,
        fastest_within_quality_budget=fastest,
    )


def gate_reason(gate: GateResult) -> str:
    if not gate.passed_threshold:
        return f"{gate.metric}={gate.value:.4f}, {gate.mode} threshold {gate.threshold:.4f}"
    if gate.beat_baseline is False:
        return (
            f"{gate.metric}={gate.value:.4f} does not beat {gate.baseline}="
            f"{gate.baseline_value:.4f} by the margin {gate.margin:.4f}"
        )
    if gate.not_worse_than_champion is False:
        return (
            f"{gate.metric}={gate.value:.4f} is worse than champion version "
            f"{gate.champion_version}'s {gate.champion_value:.4f}"
        )
    interval = gate.difference_interval
    shown = f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "unknown"
    return (
        f"{gate.metric}={gate.value:.4f} is not significantly better than champion version "
        f"{gate.champion_version}'s {gate.champion_value:.4f} at level {gate.significance} "
        f"(difference interval {shown} over {gate.shared_examples} shared examples)"
    )


def register_variant(
    variant: str,
    model_dir: Path,
    quantize: str | None,
    task: FinetuningTask,
    metrics: Mapping[str, float],
    cfg: DeployConfig,
    alias: str,
    source: str,
    tags: Mapping[str, str],
) -> dict[str, Any]:
    """Register `variant` as <registered_model_name>-<variant>, gated on its own held-out
    score: passing, it takes the fp32 model's alias; failing (or unscored), the challenger."""
    name = f"{cfg.registered_model_name}-{variant}"
    model_version = log_and_register(model_dir, task, name, cfg, f"model_{variant}", quantize)
    gate = task.gate(cfg)
    metric = own_metric(variant, gate.metric)
    value = metrics.get(metric)
    # The fp32 gate (threshold, baseline) on the variant's own score; no champion check.
    own_gate = GateConfig(metric, gate.mode, gate.threshold, gate.baseline, gate.margin)
    passed = value is not None and check_gate(metrics, own_gate, tolerance=None).passed
    variant_alias = alias if passed else registry.CHALLENGER
    client = MlflowClient()
    for key, tag in {**tags, "variant_of": source, "gate_passed": str(passed)}.items():
        client.set_model_version_tag(name, model_version, key, tag)
    registry.set_alias(name, variant_alias, model_version)
    if variant_alias == registry.CHAMPION:
        registry.drop_alias(name, registry.CHALLENGER)
    elif not passed:
        log.warning("%s variant %s/%s: %s=%s fails the %s threshold %.4f or the baseline %s "
                    "(or has no held-out score): registered as the challenger", variant, name,
                    model_version, metric, value, gate.mode, gate.threshold,
                    gate.baseline)  # fmt: skip
    return {"model_name": name, "version": model_version, "alias": variant_alias,
            "gate_passed": passed}  # fmt: skip


def forward_input(tokenizer: Any, requests: list[str], tokens: int) -> torch.Tensor:
    """`tokens` token ids of the held-out requests' text (repeated if it is shorter)."""
    ids = tokenizer(" ".join(requests), add_special_tokens=False)["input_ids"] or [0]
    ids = (ids * (tokens // max(len(ids), 1) + 1))[:tokens]
    return torch.tensor([ids])


def measure_variants(
    variants: dict[str, dict[str, Any]],
    served: Any,
    task: FinetuningTask,
    metrics: Mapping[str, float],
    cfg: DeployConfig,
    requests: list[str],
) -> None:
    """Add size, latency and held-out quality to each registered variant (in place), each
    loaded from the registry as it is served (`served`: the fp32 model, loaded already)."""
    workload = requests[: cfg.latency_requests]
    inputs = pd.DataFrame({task.serving.input_column: workload})
    # Replies of the same length everywhere: a model that stops early is not faster.
    params = request_params(task, cfg, min_new_tokens=cfg.max_new_tokens)
    input_ids = forward_input(served.unwrap_python_model().tokenizer, workload,
                              cfg.forward_tokens)  # fmt: skip
    gate = task.gate(cfg)
    reference = metrics.get(gate.metric)
    float_params: dict[str, int] = {}  # an int8 model's packed weights are no parameters
    for variant, entry in variants.items():
        loaded = (
            served
            if variant == "fp32"
            else mlflow.pyfunc.load_model(f"models:/{entry['model_name']}/{entry['version']}")
        )
        model = loaded.unwrap_python_model().model
        float_twin = BY_NAME[variant].float_twin
        count = float_params[float_twin] if float_twin in float_params else count_parameters(model)
        float_params[variant] = count
        entry |= asdict(measure(loaded, count, input_ids, cfg.forward_repeats, inputs, params))
        metric = own_metric(variant, gate.metric)
        value = metrics.get(metric)
        entry |= {"quality_metric": metric, "quality": value, "quality_change": None,
                  "quality_loss": None}  # fmt: skip
        base = reference
        if BY_NAME[variant].quantize:  # it runs on the CPU: compared with fp32 there
            base = metrics.get(compared_with(gate.metric, metrics))
        if value is not None and base is not None:
            entry["quality_change"] = float(value) - float(base)
            entry["quality_loss"] = quality_loss(float(value), float(base), gate.mode)
        log.info("%s: %.2fM params, %.1f MB, forward(%d) p50 %.1f ms, request p50 %.1f ms, "
                 "%s=%s", variant, entry["params"] / 1e6, entry["size_bytes"] / 1e6,
                 cfg.forward_tokens, entry["forward_p50_seconds"] * 1e3,
                 entry["request_p50_seconds"] * 1e3, metric, value)  # fmt: skip
