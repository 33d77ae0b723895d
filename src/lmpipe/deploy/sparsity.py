"""Unstructured sparsity: how much held-out loss each share of zeroed weights costs.

Two ways to choose the zeros in every linear of the transformer blocks:
  magnitude  the smallest |W| of each matrix (torch.nn.utils.prune.l1_unstructured);
  wanda      the smallest |W_ij| * ||X_j|| within each output row (Wanda's comparison group),
             from the same calibration norms as structured pruning.
The zeros stay in dense matrices, so this is an analysis of what the weights tolerate, not a
deployment variant: dense kernels run no faster on zeros (it takes sparse kernels or 2:4
hardware to turn them into speed).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure
from torch.nn.utils import prune as torch_prune
from transformers import PreTrainedModel

from lmpipe.deploy.prune import prunable_linears, wanda_scores
from lmpipe.runs.config import SPARSITY_METHODS

log = logging.getLogger(__name__)

METHODS = SPARSITY_METHODS


@torch.no_grad()
def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is zeroed: the int(in * sparsity) lowest Wanda scores of each row
    (ties: the lower column first, as a stable sort)."""
    scores = wanda_scores(weight, norms)
    count = int(weight.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        lowest = torch.sort(scores, dim=-1, stable=True).indices[:, :count]
        mask.scatter_(1, lowest, True)
    return mask


@torch.no_grad()
def sparsify(
    model: PreTrainedModel, method: str, sparsity: float, norms: dict[str, torch.Tensor]
) -> PreTrainedModel:
    """A copy of `model` with `sparsity` of every block linear's weights set to zero."""
    if method not in METHODS:
        raise ValueError(f"unknown sparsity method {method!r} (allowed: {METHODS})")
    sparse = copy.deepcopy(model)
    for name, linear in prunable_linears(sparse).items():
        if method == "magnitude":
            torch_prune.l1_unstructured(linear, "weight", amount=sparsity)
            torch_prune.remove(linear, "weight")
        else:
            linear.weight[wanda_mask(linear.weight, norms[name], sparsity)] = 0
    return sparse


def zero_share(model: PreTrainedModel) -> float:
    """The share of block-linear weights that are exactly zero."""
    weights = [m.weight for m in prunable_linears(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@dataclass
class SparsityPoint:
    method: str
    sparsity: float  # asked for
    zeros: float  # measured share of zero weights
    loss: float


def sparsity_curve(
    model: PreTrainedModel,
    norms: dict[str, torch.Tensor],
    levels: Sequence[float],
    held_out_loss: Callable[[PreTrainedModel], float],
    methods: Sequence[str] = METHODS,
) -> list[SparsityPoint]:
    """Held-out loss of the dense model (sparsity 0) and of each method at each level."""
    dense = held_out_loss(model)
    points = [SparsityPoint(m, 0.0, zero_share(model), dense) for m in methods]
    for method in methods:
        for level in levels:
            sparse = sparsify(model, method, level, norms)
            point = SparsityPoint(method, level, zero_share(sparse), held_out_loss(sparse))
            log.info("sparsity: %s %.0f%% -> held-out loss %.4f (dense %.4f)", method,
                     100 * level, point.loss, dense)  # fmt: skip
            points.append(point)
            del sparse
    return points


def sparsity_figure(points: Sequence[SparsityPoint], metric: str) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for method in dict.fromkeys(p.method for p in points):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.sparsity)
        axes.plot([100 * p.sparsity for p in mine], [p.loss for p in mine], marker="o",
                  label=method)  # fmt: skip
    axes.set_xlabel("unstructured sparsity of the block linears (%)")
    axes.set_ylabel(metric)
    axes.set_title("Held-out loss against sparsity (zeros in dense matrices)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure
