"""The deployment variants side by side: size, latency and held-out quality, and the frontier.

Every variant is measured the same way on the serving CPU, through the model the registry
serves: parameter count, serialized size, p50/p95 latency of one forward pass over a fixed
number of tokens, and of one request (for a chat model a reply of exactly max_new_tokens:
a model that stops early is not faster). Quality is the gate metric on the held-out split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig

from lmpipe.deploy.quantize import quantizer, state_size_bytes
from lmpipe.runs.config import QUANTIZATIONS, QuantizeConfig


@dataclass(frozen=True)
class Variant:
    """One way to serve the fine-tuned model: registered as <registered_model_name>-<name>
    (fp32 as the name itself), made from a saved `source` model (finetune's `finetuned`, or
    deploy's `pruned`) by `quantize` (rebuilt at load time by the pyfunc), scored on the
    held-out split under `label` (its metrics `<label>_...`), and counted with the
    parameters of its `float_twin` (a quantized model's packed weights are no parameters)."""

    name: str
    source: str  # finetuned | pruned
    quantize: str | None = None  # one of lmpipe.deploy.quantize's methods; None: float
    float_twin: str | None = None

    @property
    def label(self) -> str:
        """The model's column prefix in the predictions and the prefix of its metrics."""
        return "finetuned" if self.name == "fp32" else self.name.replace("-", "_")

    def build(self, model: torch.nn.Module, q: QuantizeConfig | DictConfig) -> torch.nn.Module:
        """The served model made from the saved float model."""
        if self.quantize is None:
            return model
        return quantizer(self.quantize, q.group_size, q.symmetric)(model)


def _variants() -> tuple[Variant, ...]:
    found = []
    for source, float_name, prefix in (("finetuned", "fp32", ""), ("pruned", "pruned", "pruned-")):
        found.append(Variant(float_name, source))
        found += [Variant(f"{prefix}{method}", source, method, float_name)
                  for method in QUANTIZATIONS]  # fmt: skip
    return tuple(found)


# Every variant, in the order the frontier lists them: fp32, int8, int8-dynamic, int4,
# pruned, pruned-int8, ...
VARIANTS = _variants()
BY_NAME = {variant.name: variant for variant in VARIANTS}


def selected(q: QuantizeConfig | DictConfig) -> list[Variant]:
    """The variants deploy.quantize asks for: the float ones and its quantizations."""
    return [v for v in VARIANTS if v.quantize is None or v.quantize in q.variants]


# The fine-tuned model scored in fp32 on the serving CPU, beside its score on a GPU (in
# bf16 there): the quantized variants run on the CPU, and are compared with it, so that
# their change is quantization's alone, not also bf16's and the GPU kernels'.
CPU_TWIN = "finetuned_cpu"


def variant_models(
    load: Callable[[], torch.nn.Module],
    source: str,
    device: torch.device,
    q: QuantizeConfig | DictConfig,
) -> dict[str, torch.nn.Module]:
    """The selected variants of the saved `source` model (`load` reads it), by label, ready
    to be scored: float ones on `device`, quantized ones on the CPU, where they are served;
    and, where `device` is not the CPU, the fine-tuned model on the CPU too (`CPU_TWIN`)."""
    chosen = [v for v in selected(q) if v.source == source]
    models = {v.label: v.build(load(), q) if v.quantize else load().to(device) for v in chosen}
    if source == "finetuned" and device.type != "cpu" and any(v.quantize for v in chosen):
        models[CPU_TWIN] = load()
    return models


def compared_with(metric: str, metrics: Mapping[str, float]) -> str:
    """The fp32 metric a quantized variant's score is compared with: the fine-tuned model's
    `metric` (finetuned_...) on the CPU where it was scored there apart, else `metric`."""
    on_cpu = f"{CPU_TWIN}_{metric.removeprefix('finetuned_')}"
    return on_cpu if on_cpu in metrics else metric


def quantization_changes(metrics: Mapping[str, float]) -> dict[str, float]:
    """What quantization costs: `<variant>_<metric>_change`, each quantized variant of the
    fine-tuned model minus the fp32 model on the same device, per headline metric."""
    changes = {}
    quantized = [v.label for v in VARIANTS if v.source == "finetuned" and v.quantize]
    for key in metrics:
        if not key.startswith("finetuned_") or key.startswith(f"{CPU_TWIN}_") or "." in key:
            continue
        for label in quantized:
            twin = f"{label}_" + key.removeprefix("finetuned_")
            if twin in metrics:
                changes[f"{twin}_change"] = metrics[twin] - metrics[compared_with(key, metrics)]
    return changes


def own_metric(variant: str, gate_metric: str) -> str:
    """The variant's own held-out score behind the gate's (fp32) metric."""
    if variant == "fp32":
        return gate_metric
    return f"{BY_NAME[variant].label}_{gate_metric.removeprefix('finetuned_')}"


def percentiles(seconds: Sequence[float]) -> tuple[float, float]:
    """p50 and p95 (linear interpolation, numpy's default)."""
    return float(np.percentile(seconds, 50)), float(np.percentile(seconds, 95))


@torch.no_grad()
def forward_seconds(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int) -> list[float]:
    """Seconds per forward pass over `input_ids` (batch 1, no cache), after two warm-ups."""
    model.eval()
    for _ in range(2):
        model(input_ids=input_ids, use_cache=False)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        seconds.append(time.perf_counter() - start)
    return seconds


def request_seconds(served: Any, inputs: pd.DataFrame, params: dict | None) -> list[float]:
    """Seconds per single-row request through the pyfunc, after one warm-up request."""
    served.predict(inputs.iloc[:1], params=params)
    seconds = []
    for row in range(len(inputs)):
        start = time.perf_counter()
        served.predict(inputs.iloc[row : row + 1], params=params)
        seconds.append(time.perf_counter() - start)
    return seconds


@dataclass
class Measured:
    params: int
    size_bytes: int
    forward_p50_seconds: float
    forward_p95_seconds: float
    request_p50_seconds: float
    request_p95_seconds: float


def measure(
    served: Any,
    params: int,
    input_ids: torch.Tensor,
    forward_repeats: int,
    requests: pd.DataFrame,
    request_params: dict | None,
) -> Measured:
    """Size and latency of a served pyfunc's model (`params`: its weights, counted on the
    float model it was built from: an int8 model's packed weights are no parameters)."""
    model = served.unwrap_python_model().model
    forward = percentiles(forward_seconds(model, input_ids, forward_repeats))
    request = percentiles(request_seconds(served, requests, request_params))
    return Measured(params, state_size_bytes(model), *forward, *request)


def quality_loss(value: float, reference: float, mode: str) -> float:
    """How much worse `value` is than `reference`, as a share of it (negative: better)."""
    worse = value - reference if mode == "min" else reference - value
    if reference == 0:
        return 0.0 if worse <= 0 else float("inf")
    return worse / abs(reference)


def fastest_within(
    variants: Mapping[str, Mapping[str, Any]], max_loss: float, latency: str
) -> str | None:
    """The variant with the lowest `latency` among those losing at most `max_loss` of the
    fp32 quality (None: none has a held-out score that qualifies)."""
    eligible = {
        name: v[latency] for name, v in variants.items()
        if v.get("quality_loss") is not None and v["quality_loss"] <= max_loss
    }  # fmt: skip
    return min(eligible, key=eligible.get) if eligible else None


def frontier_figure(
    variants: Mapping[str, Mapping[str, Any]], metric: str, mode: str, best: str | None
) -> Figure:
    """Held-out quality against size and against request latency, one point per variant
    (with its 95% interval where evaluate gave one)."""
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    scored = {n: v for n, v in variants.items() if v.get("quality") is not None}
    for ax, (key, label, scale) in zip(
        axes,
        [("size_bytes", "size (MB)", 1e-6),
         ("request_p50_seconds", "request latency p50 (ms)", 1e3)],
        strict=True,
    ):  # fmt: skip
        for name, v in scored.items():
            x = v[key] * scale
            ax.scatter(x, v["quality"], s=60 if name == best else 30,
                       marker="*" if name == best else "o")  # fmt: skip
            if v.get("quality_low") is not None and v.get("quality_high") is not None:
                below, above = v["quality"] - v["quality_low"], v["quality_high"] - v["quality"]
                ax.errorbar(x, v["quality"], yerr=[[below], [above]], capsize=3, alpha=0.5,
                            color="gray")  # fmt: skip
            ax.annotate(name, (x, v["quality"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
        ax.grid(alpha=0.3)
    figure.suptitle(
        "Deployment variants: held-out quality against size and latency"
        + (f" (* fastest within the quality budget: {best})" if best else "")
    )
    figure.tight_layout()
    return figure


def frontier_table(variants: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    rows = [{"variant": name, **{k: v for k, v in values.items() if not isinstance(v, dict)}}
            for name, values in variants.items()]  # fmt: skip
    return pd.DataFrame(rows)
