"""Figures logged to MLflow (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """A figure and its axes outside pyplot: no display needed, no global registry that
    keeps every figure alive, and no pyplot import (0.25 s of every stage's start-up)."""
    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.subplots(*grid, **kwargs)


def length_histogram_figure(histogram: Mapping[str, Sequence[int]]) -> Figure:
    """Documents per power-of-two length bin, before and after cleaning."""
    starts = list(histogram["bin_start_chars"])
    labels = [f"{s:,}" if s < 1024 else f"{s // 1024:,}k" for s in starts]
    figure, axis = _subplots(figsize=(9, 4))
    positions = range(len(starts))
    width = 0.42
    axis.bar([p - width / 2 for p in positions], histogram["before"], width, label="before clean")
    axis.bar([p + width / 2 for p in positions], histogram["after"], width, label="after clean")
    axis.set_xticks(list(positions), labels, rotation=60, fontsize=8)
    axis.set_xlabel("document length (characters, bin start)")
    axis.set_ylabel("documents")
    axis.set_yscale("symlog")
    axis.legend()
    axis.set_title("Document length before and after clean")
    return figure


def confusion_matrix_figure(counts: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """Row-normalised confusion matrix (true class per row), with the counts written in."""
    totals = counts.sum(1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = max(5.0, 0.6 * len(labels) + 2.5)
    figure, axis = _subplots(figsize=(size, size * 0.85))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(labels))
    axis.set_xticks(list(ticks), labels, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(list(ticks), labels, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for i in ticks:
        for j in ticks:
            if counts[i, j]:
                axis.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                          color="white" if shares[i, j] > 0.5 else "black")  # fmt: skip
    figure.colorbar(image, ax=axis, label="share of the true class")
    axis.set_title(title)
    return figure


def loss_comparison_figure(losses: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Histograms of per-example loss, one per model, on shared bins."""
    values = [np.asarray(v, dtype=float) for v in losses.values()]
    bins = np.linspace(min(v.min() for v in values), max(v.max() for v in values), 30)
    figure, axis = _subplots(figsize=(8, 4))
    for name, series in zip(losses, values, strict=True):
        axis.hist(series, bins=bins, alpha=0.55, label=f"{name} (mean {series.mean():.3f})")
    axis.set_xlabel("mean response loss per held-out example (nats/token)")
    axis.set_ylabel("examples")
    axis.legend()
    axis.set_title(title)
    return figure


# Columns of a selection table (lmpipe.selection) shown as histograms, with their axis label.
_SELECTION_SCORES = {
    "tokens": "tokens per example",
    "ifd": "IFD (response loss given the prompt / alone)",
    "conditional_loss": "response loss given the prompt (nats/token)",
    "response_loss": "response loss alone (nats/token)",
}


def selection_figures(table: pd.DataFrame) -> dict[str, Figure]:
    """Histograms of each score over all training examples and over the selected ones,
    and, where the examples were embedded, their 2-D PCA projection."""
    selected = table["status"] == "selected"
    columns = [c for c in _SELECTION_SCORES if c in table and table[c].notna().any()]
    figure, axes = _subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6),
                             squeeze=False)  # fmt: skip
    for axis, column in zip(axes[0], columns, strict=True):
        values = table[column].to_numpy(dtype=float)
        finite = np.isfinite(values)
        bins = np.histogram_bin_edges(values[finite], bins=30)
        axis.hist(values[finite], bins=bins, alpha=0.5, label=f"all ({finite.sum()})")
        axis.hist(values[finite & selected.to_numpy()], bins=bins, alpha=0.7,
                  label=f"selected ({int((finite & selected.to_numpy()).sum())})")  # fmt: skip
        axis.set_xlabel(_SELECTION_SCORES[column])
        axis.set_ylabel("examples")
        axis.legend(fontsize=8)
    figure.suptitle("Fine-tuning data selection: scores of all and of selected examples")
    figures = {"selection_scores.png": figure}
    if "pca_x" in table:
        figure, axis = _subplots(figsize=(6.5, 5.5))
        axis.scatter(table["pca_x"], table["pca_y"], s=6, c="lightgray", label="all")
        axis.scatter(table.loc[selected, "pca_x"], table.loc[selected, "pca_y"], s=8,
                     c="tab:red", label="selected")  # fmt: skip
        axis.set_xlabel("PC 1")
        axis.set_ylabel("PC 2")
        axis.legend()
        axis.set_title("Starting model's mean-pooled states (PCA): all vs selected")
        figures["selection_projection.png"] = figure
    return figures


def preference_figure(metrics: Mapping[str, float], models: Sequence[str]) -> Figure:
    """Held-out reward accuracy beside held-out response loss, per model: a run that wins
    the preference while its replies get worse shows as a rising bar on both sides."""
    figure, (left, right) = _subplots(1, 2, figsize=(9, 3.6))
    colors = [f"C{i}" for i in range(len(models))]
    left.bar(models, [metrics[f"{m}_reward_accuracy"] for m in models], color=colors)
    left.set_ylim(0, 1)
    left.set_ylabel("held-out reward accuracy")
    right.bar(models, [metrics[f"{m}_sft_test_loss"] for m in models], color=colors)
    right.set_ylabel("held-out response loss (nats, lower is better)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=20)
    figure.suptitle("Preference gained vs. replies kept")
    return figure
