"""Bootstrap intervals for headline numbers, and a paired bootstrap for "is A better than B on
the same examples" (scipy.stats.bootstrap does the resampling).

Percentile intervals: they stay defined when every value is the same (an accuracy of 0 or
1), where BCa is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def statistic_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    size: int,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile-bootstrap interval of a statistic of `size` examples that is not a mean
    (macro-F1). `statistic` takes example indices drawn with replacement, an integer array
    [..., size], and returns the statistic of each row [...]."""
    if size == 0:
        raise ValueError("no examples to bootstrap")
    whole = float(statistic(np.arange(size)))
    resampled = stats.bootstrap((np.arange(size),), lambda idx, axis=-1: statistic(idx),
                                confidence_level=confidence, n_resamples=resamples,
                                method="percentile", vectorized=True,
                                random_state=np.random.default_rng(seed))  # fmt: skip
    low, high = resampled.confidence_interval
    if np.isnan(low) or np.isnan(high):  # every resample gave the same value
        return whole, whole
    return float(low), float(high)


def macro_f1(truth: np.ndarray, guess: np.ndarray, classes: int) -> np.ndarray:
    """Macro-F1 over `classes` (class ids 0..classes-1) of each row of [..., n] arrays: per
    class 2·TP / (predicted + actual), 0 for a class neither predicted nor present
    (scikit-learn's f1_score with zero_division=0)."""
    scores = []
    for c in range(classes):
        actual, predicted = truth == c, guess == c
        hits = (actual & predicted).sum(-1)
        total = actual.sum(-1) + predicted.sum(-1)
        scores.append(np.divide(2 * hits, total, out=np.zeros(hits.shape), where=total > 0))
    return np.mean(scores, axis=0)
