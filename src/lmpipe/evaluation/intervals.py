"""Bootstrap intervals for headline numbers, and a paired bootstrap for "is A better than B on
the same examples" (scipy.stats.bootstrap does the resampling).

Percentile intervals: they stay defined when every value is the same (an accuracy of 0 or
1), where BCa is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


def mean_interval(
    values: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile-bootstrap interval of the mean of per-example values."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("no values to bootstrap")
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    result = stats.bootstrap((data,), np.mean, confidence_level=confidence,
                             n_resamples=resamples, method="percentile", vectorized=True,
                             random_state=np.random.default_rng(seed))  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_difference_interval(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile-bootstrap interval of mean(a) - mean(b), resampling examples (the same
    indices for a and b: their scores on one example are paired)."""
    first, second = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if first.shape != second.shape or first.size == 0:
        raise ValueError(f"paired scores need equal, non-empty lengths: {first.size} and "
                         f"{second.size}")  # fmt: skip
    return mean_interval(first - second, confidence, resamples, seed)
