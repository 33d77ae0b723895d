"""Figures logged to MLflow (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def length_histogram_figure(histogram: Mapping[str, Sequence[int]]) -> Figure:
    """Documents per power-of-two length bin, before and after cleaning."""
    starts = list(histogram["bin_start_chars"])
    labels = [f"{s:,}" if s < 1024 else f"{s // 1024:,}k" for s in starts]
    figure, axis = plt.subplots(figsize=(9, 4), layout="constrained")
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
