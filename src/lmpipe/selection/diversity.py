"""Diversity: k-center greedy (Sener & Savarese, 2018) over example embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def unit_rows(points: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so that distances follow cosine similarity."""
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    return points / np.where(norms > 0, norms, 1.0)


def k_center_greedy(
    points: np.ndarray,
    first: int,
    max_points: int | None,
    costs: Sequence[int] | None = None,
    max_cost: int | None = None,
) -> tuple[list[int], list[float]]:
    """Greedy k-center: start from `first`, then repeatedly add the point farthest from
    everything chosen, until `max_points` are chosen or no point fits in `max_cost` (the
    summed `costs`, e.g. tokens; a point that would overflow it is passed over).

    Returns the chosen rows in the order chosen and each one's distance to the points
    chosen before it (inf for the first). The greedy choice is within twice the optimal
    covering radius.
    """
    n = len(points)
    if n == 0 or max_points == 0:
        return [], []
    cost = np.zeros(n, dtype=np.int64) if costs is None else np.asarray(costs, dtype=np.int64)
    left = np.iinfo(np.int64).max if max_cost is None else int(max_cost)
    limit = n if max_points is None else min(max_points, n)
    points = np.asarray(points, dtype=np.float64)
    nearest = np.full(n, np.inf)  # distance from each point to the chosen set
    open_ = np.ones(n, dtype=bool)  # neither chosen nor passed over
    chosen: list[int] = []
    distances: list[float] = []
    candidate = first if cost[first] <= left else None
    while len(chosen) < limit:
        if candidate is None:
            fits = open_ & (cost <= left)
            open_ &= cost <= left  # the budget only shrinks: what overflows now always will
            if not fits.any():
                break
            # argmax over the open points; ties go to the earliest row (deterministic)
            candidate = int(np.flatnonzero(fits)[np.argmax(nearest[fits])])
        chosen.append(candidate)
        distances.append(float(nearest[candidate]))
        open_[candidate] = False
        left -= int(cost[candidate])
        step = np.linalg.norm(points - points[candidate], axis=1)
        np.minimum(nearest, step, out=nearest)
        candidate = None
    return chosen, distances
