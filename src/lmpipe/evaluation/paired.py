"""Two models compared on the same held-out examples: the deploy gate's "significantly better
than the champion".

Per-example scores travel as one table (`SCORE_COLUMNS`): the metric each row scores and its
direction, the example's content id, its value and weight (the metric is sum(value) /
sum(weight) over the examples), and the cluster it was drawn from ("" where examples are
independent; a template for problems generated from a few templates). A comparison pairs
rows by id within one metric, and is refused (`ComparisonRefused`, with the reason) rather
than computed where it would mislead: scores of another metric or direction, an id twice in
one table, fewer than two shared examples.

The test: McNemar's exact one-sided test for 0/1 outcomes of independent examples; otherwise
the percentile bootstrap of the difference, resampling examples or, with clusters, whole
clusters, the one-sided test at `level` being the two-sided interval at 1 - 2 level excluding 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lmpipe.evaluation.intervals import is_binary, mcnemar, paired_ratio_difference_interval
from lmpipe.evaluation.metric_kinds import metric_kind

SCORE_COLUMNS = ["metric", "direction", "id", "value", "weight", "cluster"]
MIN_SHARED = 2


class ComparisonRefused(ValueError):
    """Two score tables that cannot be compared example by example; the message says why."""


def score_table(
    metric: str,
    direction: str,
    ids: pd.Series | list[str],
    values: np.ndarray | pd.Series | list[float],
    weights: np.ndarray | pd.Series | list[float] | float = 1.0,
    clusters: pd.Series | list[str] | None = None,
) -> pd.DataFrame:
    """Per-example scores of one metric in the table's columns."""
    frame = pd.DataFrame({"id": list(ids), "value": np.asarray(values, dtype=float)})
    frame["weight"] = np.asarray(weights, dtype=float) if np.ndim(weights) else float(weights)
    frame["cluster"] = "" if clusters is None else [str(c) for c in clusters]
    frame["metric"], frame["direction"] = metric, direction
    return frame[SCORE_COLUMNS]


def read_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """A saved score table (CSV read with keep_default_na=False) in its column types; a
    table without the metric columns (saved before they existed) is refused."""
    missing = [c for c in ("metric", "direction") if c not in frame.columns]
    if missing:
        raise ComparisonRefused(f"the champion's per-example scores name no {missing[0]} "
                                "(saved by an older lmpipe): they cannot be matched to a "
                                "gate metric")  # fmt: skip
    frame = frame.copy()
    frame["id"], frame["cluster"] = frame["id"].astype(str), frame["cluster"].astype(str)
    frame["value"], frame["weight"] = frame["value"].astype(float), frame["weight"].astype(float)
    return frame[SCORE_COLUMNS]


def scores_of(frame: pd.DataFrame, metric: str, whose: str) -> pd.DataFrame:
    """`frame`'s rows of `metric`; refused, naming what it holds, if it has none."""
    rows = frame[frame["metric"] == metric]
    if rows.empty:
        held = sorted(set(frame["metric"])) or ["nothing"]
        raise ComparisonRefused(f"{whose} per-example scores are of {', '.join(held)}, not of "
                                f"the gate metric {metric}: they cannot be compared")  # fmt: skip
    duplicated = rows["id"][rows["id"].duplicated()]
    if not duplicated.empty:
        raise ComparisonRefused(
            f"{whose} per-example scores of {metric} hold {duplicated.nunique()} id(s) more "
            f"than once (e.g. {duplicated.iloc[0]!r}): ids must name one example each"
        )
    return rows


@dataclass(frozen=True)
class Comparison:
    """The model against the champion on their shared examples."""

    method: str  # mcnemar | bootstrap | cluster bootstrap
    shared: int
    model_only: int  # examples only the model was scored on
    champion_only: int
    difference: float  # model - champion on the shared examples
    interval: tuple[float, float]  # of the difference, two-sided at 1 - 2 level
    p_value: float | None  # McNemar's one-sided p (None for a bootstrap)
    better: bool  # better in the metric's direction at the one-sided level


def compare(
    model: pd.DataFrame, champion: pd.DataFrame, metric: str, mode: str, level: float
) -> Comparison:
    """Whether the model is better than the champion on `metric` (direction `mode`) at the
    one-sided `level`, over the examples both tables score; ComparisonRefused where the two
    cannot be compared."""
    ours, theirs = scores_of(model, metric, "the model's"), scores_of(champion, metric,
                                                                    "the champion's")  # fmt: skip
    for whose, table in (("the model's", ours), ("the champion's", theirs)):
        directions = set(table["direction"])
        if directions != {mode}:
            raise ComparisonRefused(f"{whose} scores of {metric} are {'/'.join(directions)} "
                                    f"is better, the gate's mode is {mode}")  # fmt: skip
    joined = ours.merge(theirs, on="id", suffixes=("", "_champion"))
    counts = (len(joined), len(ours) - len(joined), len(theirs) - len(joined))
    if len(joined) < MIN_SHARED:
        raise ComparisonRefused(
            f"the model and the champion share {len(joined)} held-out example(s) of {metric} "
            f"(the model has {len(ours)}, the champion {len(theirs)}); at least {MIN_SHARED} "
            "are needed: their test splits differ"
        )
    value, weight = joined["value"].to_numpy(float), joined["weight"].to_numpy(float)
    other, other_weight = (joined["value_champion"].to_numpy(float),
                           joined["weight_champion"].to_numpy(float))  # fmt: skip
    difference = float(value.sum() / weight.sum() - other.sum() / other_weight.sum())
    clusters = joined["cluster"].to_numpy(str)
    clustered = bool((clusters != "").any())
    kind = metric_kind(metric)
    unit_weights = bool((weight == 1).all() and (other_weight == 1).all())
    if (not clustered and unit_weights and kind is not None and kind.binary
            and is_binary(value) and is_binary(other)):  # fmt: skip
        pairs = mcnemar(value, other)
        p_value = pairs.p_first_better() if mode == "max" else pairs.p_second_better()
        interval = pairs.difference_interval(1 - 2 * level)
        return Comparison("mcnemar", *counts, difference, interval, p_value, p_value < level)
    try:
        low, high = paired_ratio_difference_interval(
            (value, weight), (other, other_weight), clusters if clustered else None, 1 - 2 * level
        )
    except ValueError as exc:  # too few clusters to resample
        raise ComparisonRefused(f"{metric}: {exc}") from None
    method = "cluster bootstrap" if clustered else "bootstrap"
    return Comparison(method, *counts, difference, (low, high), None,
                      low > 0 if mode == "max" else high < 0)  # fmt: skip
