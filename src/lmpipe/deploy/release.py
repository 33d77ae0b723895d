"""Deployment: the fine-tuned model as an MLflow pyfunc, gated, registered, aliased, measured.

The pyfunc is logged from code (`serving.py`), not pickled, so loading it unpickles nothing.
Every candidate is registered. It becomes `champion` only if its gate metric passes the
threshold and is not worse than the current champion's (and, with a significance level, a
paired test over the held-out examples both were scored on finds it better: McNemar's
exact test for 0/1 outcomes, lmpipe.evaluation.paired); otherwise it is the `challenger`.
A comparison that cannot be made (scores of another metric, ids repeated, too few shared
examples) fails the gate with its reason: nothing unattended promotes on a guess.
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
import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

from lmpipe.deploy import registry
from lmpipe.deploy.serving import DEFAULT_PARAMS, MESSAGES
from lmpipe.deploy.variants import (
    BY_NAME,
    compared_with,
    fastest_within,
    measure,
    own_metric,
    quality_loss,
    selected,
)
from lmpipe.evaluation.answers import is_correct
from lmpipe.evaluation.paired import ComparisonRefused, compare, read_scores, scores_of
from lmpipe.runs.config import ConfigError, DeployConfig, GateConfig
from lmpipe.tasks.base import FinetuningTask, SmokeRequest
from lmpipe.training.model import count_parameters

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    metric: str
    value: float
    mode: str
    threshold: float | None
    passed_threshold: bool
    champion_version: str | None = None
    champion_value: float | None = None
    not_worse_than_champion: bool | None = None  # None: no champion (or no check)
    baseline: str | None = None
    baseline_value: float | None = None
    margin: float = 0.0
    beat_baseline: bool | None = None  # None: no baseline asked for
    # The paired test against the champion at one-sided level `significance` (None: not
    # asked for): its method, the interval of (model - champion) on their shared held-out
    # examples, two-sided at 1 - 2 level, McNemar's p, and whether it shows the model
    # better (None: no champion to beat). `comparison_refused`: why the two could not be
    # compared.
    significance: float | None = None
    test: str | None = None
    difference_interval: tuple[float, float] | None = None
    p_value: float | None = None
    shared_examples: int | None = None
    significantly_better: bool | None = None
    comparison_refused: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.passed_threshold
            and self.beat_baseline is not False
            and self.not_worse_than_champion is not False
            and self.significantly_better is not False
        )


def better_or_equal(
    value: float, reference: float | None, mode: str, tolerance: float = 0.0
) -> bool:
    """`value` at least as good as `reference` (None: no reference, so yes) in `mode`."""
    if reference is None:
        return True
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
    examples both were scored on (`examples`, `champion_examples`: per-example score tables,
    lmpipe.evaluation.paired)."""
    if gate.mode not in ("min", "max"):
        raise ConfigError(f"deploy.gates: metric '{gate.metric}' has no mode (min or max)")
    if gate.metric not in metrics:
        raise ConfigError(
            f"deploy.gates: metric '{gate.metric}' is not an evaluate metric "
            f"(available: {', '.join(sorted(metrics))})"
        )
    value = float(metrics[gate.metric])
    result = GateResult(
        gate.metric, value, gate.mode, gate.threshold,
        better_or_equal(value, gate.threshold, gate.mode), significance=gate.significance,
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
        result.champion_version = champion.version
        if examples is None or examples[examples["metric"] == gate.metric].empty:
            raise ConfigError(
                f"deploy.gates: significance needs per-example scores of '{gate.metric}', and "
                "the task has none for it (use a metric that is a mean over examples: "
                "accuracy, exact match, loss)"
            )
        try:
            if champion_examples is None:
                raise ComparisonRefused(f"champion version {champion.version} has no "
                                        f"per-example scores ({EXAMPLES_ARTIFACT})")  # fmt: skip
            scores_of(examples, gate.metric, "the model's")  # its own table first
            paired = compare(examples, read_scores(champion_examples), gate.metric, gate.mode,
                             gate.significance)  # fmt: skip
        except ComparisonRefused as refused:
            log.warning("gate: no paired comparison with champion version %s: %s; the "
                        "champion stays", champion.version, refused)  # fmt: skip
            result.comparison_refused = str(refused)
            result.significantly_better = False
        else:
            result.test, result.difference_interval = paired.method, paired.interval
            result.p_value, result.shared_examples = paired.p_value, paired.shared
            result.significantly_better = paired.better
    return result


# Where a deploy run keeps the per-example scores of the model's metrics (each row naming
# its metric): the next challenger is compared with them, example by example.
EXAMPLES_ARTIFACT = "gate/examples.csv"


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
    example = pd.DataFrame({serving.input_column: [task.smoke_request(pd.DataFrame(), cfg).text]})
    params = ({**DEFAULT_PARAMS, "max_new_tokens": cfg.max_new_tokens} if serving.generates
              else None)  # fmt: skip
    signature = infer_signature(example, serving.output_example, params=params)
    if serving.generates:  # a row holds a prompt or chat messages
        signature = ModelSignature(chat_or_prompt_schema(serving.input_column),
                                   signature.outputs, signature.params)  # fmt: skip
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


def chat_or_prompt_schema(column: str) -> Schema:
    """A generating model's input: per row `column` (a string) or `messages` (a list of
    {role, content}), each optional (lmpipe.deploy.serving.chat_or_text picks)."""
    message = Object([Property("role", DataType.string), Property("content", DataType.string)])
    return Schema([ColSpec(DataType.string, column, required=False),
                   ColSpec(Array(message), MESSAGES, required=False)])  # fmt: skip


def recipe(quantize: str | None, cfg: DeployConfig) -> dict[str, Any]:
    """What the pyfunc needs to rebuild a quantized variant at load time (serving.py)."""
    if quantize is None:
        return {}
    q = cfg.quantize
    return {"quantize": quantize, "group_size": int(q.group_size), "symmetric": bool(q.symmetric)}


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
    # A held-out problem's answer, and whether the served model's reply gives it (None: the
    # smoke request has no checkable answer).
    smoke_answer: str | None = None
    smoke_correct: bool | None = None
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
    gate_config: GateConfig | None = None,
    smoke: SmokeRequest | None = None,
) -> Deployment:
    """Gate, register, set aliases and smoke-test the fp32 model; register its variants
    (int8, and with `pruned_dir` pruned and pruned + int8), each gated on its own held-out
    score in `metrics`; measure every variant through the registry. `examples`: the model's
    per-example scores (lmpipe.evaluation.paired), kept with the run for the paired test.
    `gate_config`: the resolved gate (default: the task's for no particular data); `smoke`:
    the request answered after registration (default: deploy.smoke_prompt, unchecked)."""
    name = cfg.registered_model_name
    champion = registry.aliased(name, registry.CHAMPION)
    champion_examples = None
    gate_config = gate_config or task.gate(cfg)
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
    smoke = smoke or task.smoke_request(pd.DataFrame(), cfg)
    start = time.perf_counter()
    output = served.predict(pd.DataFrame({task.serving.input_column: [smoke.text]}),
                            params=request_params(task, cfg))  # fmt: skip
    latency = time.perf_counter() - start
    smoke_output = output.to_dict("records")[0] if isinstance(output, pd.DataFrame) else output[0]
    smoke_correct = None if smoke.answer is None else is_correct(str(smoke_output), smoke.answer)
    log.info("smoke test through %s: %r -> %r (%.3fs)%s", uri, smoke.text, smoke_output, latency,
             "" if smoke.answer is None else f"; expected {smoke.answer}: "
             f"{'right' if smoke_correct else 'wrong'}")  # fmt: skip

    sources = {"finetuned": model_dir, "pruned": pruned_dir}
    wanted = [v for v in selected(cfg.quantize)
              if v.name != "fp32" and sources[v.source] is not None]  # fmt: skip
    builds = {v.name: (sources[v.source], v.quantize) for v in wanted}
    variants = {"fp32": {"model_name": name, "version": model_version, "alias": alias,
                         "gate_passed": gate.passed}}  # fmt: skip
    for variant, (directory, quantize) in builds.items():
        variants[variant] = register_variant(variant, directory, quantize, task, metrics, cfg,
                                             alias, f"{name}/{model_version}", tags,
                                             gate_config)  # fmt: skip
    measure_variants(variants, served, task, metrics, cfg, requests or [smoke.text], gate_config)
    fastest = fastest_within(variants, cfg.max_quality_loss, "request_p50_seconds")
    log.info("fastest variant within %.1f%% of fp32's %s: %s", 100 * cfg.max_quality_loss,
             gate.metric, fastest)  # fmt: skip
    return Deployment(
        model_name=name,
        version=model_version,
        model_uri=uri,
        alias=alias,
        gate={**asdict(gate), "passed": gate.passed},
        smoke_input=smoke.text,
        smoke_output=smoke_output,
        smoke_answer=smoke.answer,
        smoke_correct=smoke_correct,
        smoke_latency_seconds=latency,
        variants=variants,
        fastest_within_quality_budget=fastest,
    )


def gate_reason(gate: GateResult) -> str:
    if not gate.passed_threshold:
        return f"{gate.metric}={gate.value:.4f}, {gate.mode} threshold {gate.threshold}"
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
    if gate.comparison_refused is not None:
        return (f"{gate.metric}={gate.value:.4f}: no paired comparison with champion version "
                f"{gate.champion_version}: {gate.comparison_refused}")  # fmt: skip
    interval = gate.difference_interval
    shown = f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "unknown"
    p_value = f", McNemar p={gate.p_value:.4f}" if gate.p_value is not None else ""
    return (
        f"{gate.metric}={gate.value:.4f} is not significantly better than champion version "
        f"{gate.champion_version}'s {gate.champion_value} at level {gate.significance} "
        f"({gate.test}: difference interval {shown} over {gate.shared_examples} shared "
        f"examples{p_value})"
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
    gate: GateConfig,
) -> dict[str, Any]:
    """Register `variant` as <registered_model_name>-<variant>, gated on its own held-out
    score: passing, it takes the fp32 model's alias; failing (or unscored), the challenger."""
    name = f"{cfg.registered_model_name}-{variant}"
    model_version = log_and_register(model_dir, task, name, cfg, f"model_{variant}", quantize)
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
        log.warning("%s variant %s/%s: %s=%s fails the %s threshold %s or the baseline %s "
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
    gate: GateConfig,
) -> None:
    """Add size, latency and held-out quality (the gate metric, with its interval where
    evaluate gave one) to each registered variant (in place), each loaded from the registry
    as it is served (`served`: the fp32 model, loaded already)."""
    workload = requests[: cfg.latency_requests]
    inputs = pd.DataFrame({task.serving.input_column: workload})
    # Replies of the same length everywhere: a model that stops early is not faster.
    params = request_params(task, cfg, min_new_tokens=cfg.max_new_tokens)
    input_ids = forward_input(served.unwrap_python_model().tokenizer, workload,
                              cfg.forward_tokens)  # fmt: skip
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
        entry |= {"quality_metric": metric, "quality": value,
                  "quality_low": metrics.get(f"{metric}_low"),
                  "quality_high": metrics.get(f"{metric}_high"), "quality_change": None,
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
