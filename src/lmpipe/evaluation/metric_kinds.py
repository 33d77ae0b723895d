"""What each evaluate metric is: which direction is better, and whether its per-example
scores are 0/1 outcomes. Declared here once, by the metric's name (`<model>_<kind>`), so a
gate, an interval or a comparison never guesses it from a task default.

A gate's `mode` may only repeat its metric's direction (lmpipe.tasks.base.FinetuningTask.gate);
a metric declared nowhere here needs its mode set.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricKind:
    suffix: str  # the end of the metric's name: "<model>_exact_match"
    direction: str  # "max": higher is better; "min": lower is better
    binary: bool  # its per-example scores are 0/1 outcomes (exact statistics apply)
    description: str


# Longest suffix first where one ends another ("_reward_accuracy" before "_accuracy").
KINDS: tuple[MetricKind, ...] = (
    MetricKind("_exact_match", "max", True, "share of problems whose final answer is right"),
    MetricKind("_reward_accuracy", "max", False, "pairs whose reward ranks the chosen first"),
    MetricKind("_logp_accuracy", "max", False, "pairs whose chosen reply is more probable"),
    MetricKind("_accuracy", "max", True, "share of texts classified right"),
    MetricKind("_answered", "max", True, "share of replies with a parseable answer"),
    MetricKind("_macro_f1", "max", False, "mean over classes of F1"),
    MetricKind("_reward_margin", "max", False, "mean implicit reward margin"),
    MetricKind("_chrf", "max", False, "chrF of replies against references"),
    MetricKind("_rougeL", "max", False, "ROUGE-L F of replies against references"),
    MetricKind("_loss", "min", False, "mean cross-entropy per target token (nats)"),
    MetricKind("_perplexity", "min", False, "exp of the mean loss"),
    MetricKind("_bpb", "min", False, "bits per byte of held-out text"),
)


def metric_kind(metric: str) -> MetricKind | None:
    """The declared kind of evaluate metric `metric`; None where none is declared."""
    found = [kind for kind in KINDS if metric.endswith(kind.suffix)]
    return max(found, key=lambda kind: len(kind.suffix)) if found else None


def direction(metric: str) -> str | None:
    """ "min" or "max" for a declared metric, else None."""
    kind = metric_kind(metric)
    return kind.direction if kind else None
