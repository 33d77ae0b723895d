"""Intervals for headline numbers and paired tests of "is A better than B on the same examples".

Which statistic a number gets depends on what it is:
- a share of 0/1 outcomes (accuracy, exact match): exact Clopper–Pearson intervals
  (`proportion_interval`), and McNemar's exact test for two models on the same examples
  (`mcnemar`), with the exact interval of their difference conditional on the examples where
  they disagree (`paired_binary_difference_interval`);
- anything else that is a (weighted) mean, like a token-weighted loss, and statistics that
  are no mean (macro-F1): the percentile bootstrap (scipy.stats.bootstrap), resampling
  examples, or whole clusters of examples where they are not independent (problems drawn
  from a handful of templates: `ratio_interval(..., clusters=...)`).

Percentile bootstrap intervals stay defined when every value is the same, where BCa is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
# A cluster bootstrap over fewer clusters than this is refused: its resamples are too few
# distinct sets to show the spread.
MIN_CLUSTERS = 5


def is_binary(values: Sequence[float] | np.ndarray) -> bool:
    """Whether every value is 0 or 1."""
    data = np.asarray(values, dtype=float)
    return bool(np.isin(data, (0.0, 1.0)).all())


def _binary(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError(f"no {what} to score")
    if not is_binary(data):
        others = sorted(set(data[~np.isin(data, (0.0, 1.0))].tolist()))[:3]
        raise ValueError(f"{what} must be 0/1 outcomes; got values such as {others}")
    return data


def proportion_interval(
    hits: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of the share of 1s among 0/1 outcomes: 0 of 400
    gives [0, 0.009], never a zero-width interval."""
    data = _binary(hits, "outcomes")
    interval = stats.binomtest(int(data.sum()), data.size).proportion_ci(confidence, "exact")
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class PairedOutcomes:
    """Two models' 0/1 outcomes on the same examples, as McNemar's test sees them."""

    examples: int
    first_only: int  # right by the first model alone
    second_only: int  # right by the second model alone

    @property
    def discordant(self) -> int:
        return self.first_only + self.second_only

    def p_first_better(self) -> float:
        """McNemar's exact one-sided p of "the first is right more often": the chance of at
        least `first_only` of the discordant examples going its way if each were a coin flip."""
        if self.discordant == 0:
            return 1.0
        return float(stats.binomtest(self.first_only, self.discordant, 0.5, "greater").pvalue)

    def p_second_better(self) -> float:
        return PairedOutcomes(self.examples, self.second_only, self.first_only).p_first_better()

    def difference_interval(self, confidence: float = CONFIDENCE) -> tuple[float, float]:
        """The exact interval of accuracy(first) - accuracy(second) given the discordant
        count: (d / n) (2 q - 1) at the Clopper–Pearson ends of q, the share of discordant
        examples the first gets right. It excludes 0 (at 1 - 2 level) exactly where the
        one-sided McNemar test rejects at level: both invert one binomial test."""
        if self.discordant == 0:
            return 0.0, 0.0
        share = stats.binomtest(self.first_only, self.discordant)
        interval = share.proportion_ci(confidence, "exact")
        scale = self.discordant / self.examples
        return float(scale * (2 * interval.low - 1)), float(scale * (2 * interval.high - 1))


def mcnemar(
    first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray
) -> PairedOutcomes:
    """The 0/1 outcomes of two models on the same examples, in the same order."""
    a, b = _binary(first, "paired outcomes"), _binary(second, "paired outcomes")
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need equal lengths: {a.size} and {b.size}")
    first_only, second_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    return PairedOutcomes(a.size, first_only, second_only)


def paired_binary_difference_interval(
    first: Sequence[float] | np.ndarray,
    second: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The exact interval of accuracy(first) - accuracy(second) on the same examples."""
    return mcnemar(first, second).difference_interval(confidence)


def paired_binary_summary(
    first: Sequence[float] | np.ndarray,
    second: Sequence[float] | np.ndarray,
    name: str,
    confidence: float = CONFIDENCE,
) -> dict[str, float]:
    """first - second on the same examples as report columns `<name>`, `_low`, `_high`
    (the exact interval), `_p_better` and `_p_worse` (McNemar's one-sided p each way) and
    the discordant counts `_first_only`, `_second_only`."""
    pairs = mcnemar(first, second)
    low, high = pairs.difference_interval(confidence)
    difference = (pairs.first_only - pairs.second_only) / pairs.examples
    return {
        name: difference, f"{name}_low": low, f"{name}_high": high,
        f"{name}_p_better": pairs.p_first_better(), f"{name}_p_worse": pairs.p_second_better(),
        f"{name}_first_only": pairs.first_only, f"{name}_second_only": pairs.second_only,
    }  # fmt: skip


def mean_interval(
    values: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile-bootstrap interval of the mean of per-example values (not 0/1
    outcomes: those take `proportion_interval`)."""
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


def cluster_sums(
    columns: Sequence[np.ndarray], clusters: Sequence[str] | np.ndarray | None
) -> list[np.ndarray]:
    """Each column summed per cluster (the resampling units); per example without clusters.
    Fewer than MIN_CLUSTERS clusters is refused."""
    if clusters is None:
        return [np.asarray(c, dtype=float) for c in columns]
    codes = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)[1]
    count = int(codes.max()) + 1 if codes.size else 0
    if count < MIN_CLUSTERS:
        raise ValueError(f"a cluster bootstrap needs at least {MIN_CLUSTERS} clusters; these "
                         f"examples come from {count}")  # fmt: skip
    return [np.bincount(codes, weights=np.asarray(c, dtype=float), minlength=count)
            for c in columns]  # fmt: skip


def ratio_interval(
    values: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    clusters: Sequence[str] | np.ndarray | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile-bootstrap interval of sum(values) / sum(weights) (a token-weighted loss,
    or with unit weights a mean), resampling examples, or whole `clusters` of them."""
    value, weight = cluster_sums([values, weights], clusters)
    return statistic_interval(lambda idx: value[idx].sum(-1) / weight[idx].sum(-1), len(value),
                              confidence, resamples, seed)  # fmt: skip


def paired_ratio_difference_interval(
    first: tuple[np.ndarray, np.ndarray],
    second: tuple[np.ndarray, np.ndarray],
    clusters: Sequence[str] | np.ndarray | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile-bootstrap interval of first - second, each a (values, weights) pair on
    the same examples whose metric is sum(values) / sum(weights); examples (or `clusters`)
    resampled together for both."""
    value, weight, other, other_weight = cluster_sums([*first, *second], clusters)

    def difference(idx: np.ndarray) -> np.ndarray:
        return (value[idx].sum(-1) / weight[idx].sum(-1)
                - other[idx].sum(-1) / other_weight[idx].sum(-1))  # fmt: skip

    return statistic_interval(difference, len(value), confidence, resamples, seed)


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
