"""The selection itself: finetune.selection's steps, in order, then the budget.

Every step only removes examples and records why; `ifd` also ranks what it keeps, and
`diversity` chooses up to the budget by k-center greedy. Without diversity the budget is
filled in rank order (or randomly, or longest first: the baselines). Deterministic: the
same candidates, scores, config and seed give the same selection.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from lmpipe.data.dedup import find_duplicates
from lmpipe.selection.candidates import Candidate
from lmpipe.selection.diversity import k_center_greedy, unit_rows
from lmpipe.selection.rules import rule_reason
from lmpipe.selection.scoring import ifd

log = logging.getLogger(__name__)

SELECTED, DROPPED = "selected", "dropped"
IFD_TOO_HIGH, OVER_BUDGET = "ifd_at_or_above_max", "over_budget"
# (candidates, whether losses are needed) -> conditional_loss, response_loss, embedding
Scorer = Callable[[Sequence[Candidate], bool], pd.DataFrame]


def needs_scores(s: DictConfig) -> bool:
    return "ifd" in s.steps or "diversity" in s.steps


@dataclass
class Selection:
    """One row per training example (data order): scores, status, reason, choice order."""

    table: pd.DataFrame

    @property
    def selected_ids(self) -> list[str]:
        return self.table.loc[self.table["status"] == SELECTED, "id"].tolist()

    def digest(self) -> str:
        """Of the selected ids: what the model was tuned on."""
        return hashlib.blake2b("\n".join(self.selected_ids).encode(), digest_size=16).hexdigest()

    def counts(self) -> dict[str, int]:
        dropped = self.table.loc[self.table["status"] == DROPPED, "reason"].value_counts()
        chosen = self.table["status"] == SELECTED
        return {
            "selection.examples": len(self.table),
            "selection.selected": int(chosen.sum()),
            "selection.tokens": int(self.table["tokens"].sum()),
            "selection.selected_tokens": int(self.table.loc[chosen, "tokens"].sum()),
            **{f"selection.dropped.{reason}": int(n) for reason, n in dropped.items()},
        }


def budget_limits(s: DictConfig, candidates: Sequence[Candidate]) -> tuple[int | None, int | None]:
    """(max examples, max tokens), a share taken of the whole training split."""
    b = s.budget
    if b.count is None and b.share is None:
        return None, None
    if b.unit == "examples":
        total = len(candidates)
        return (b.count if b.count is not None else max(1, int(b.share * total))), None
    total = sum(c.tokens for c in candidates)
    return None, (b.count if b.count is not None else max(1, int(b.share * total)))


def fill_budget(
    order: Sequence[int], tokens: Sequence[int], max_examples: int | None, max_tokens: int | None
) -> list[int]:
    """Take examples in `order` while they fit; one that would overflow the token budget
    is passed over for a shorter one after it."""
    taken: list[int] = []
    left = max_tokens
    for index in order:
        if max_examples is not None and len(taken) >= max_examples:
            break
        if left is not None:
            if tokens[index] > left:
                continue
            left -= tokens[index]
        taken.append(index)
    return taken


def select_examples(
    candidates: Sequence[Candidate], s: DictConfig, score: Scorer | None, seed: int
) -> Selection:
    """Apply the steps of `s` (finetune.selection) to the training candidates."""
    n = len(candidates)
    status = np.full(n, SELECTED, dtype=object)
    reason = np.full(n, "", dtype=object)
    step_of = np.full(n, "", dtype=object)
    tokens = np.array([c.tokens for c in candidates], dtype=np.int64)
    table = pd.DataFrame({"id": [c.id for c in candidates],
                          "prompt": [c.prompt for c in candidates], "tokens": tokens})  # fmt: skip

    def alive() -> np.ndarray:
        return np.flatnonzero(status == SELECTED)

    def drop(rows: Sequence[int], why: str, step: str) -> None:
        rows = list(rows)
        status[rows], reason[rows], step_of[rows] = DROPPED, why, step

    scores = None
    if needs_scores(s) and n:
        # Every training example is scored (cached), so the table and the projection
        # show the dropped ones too.
        scores = score(candidates, "ifd" in s.steps)
        table["conditional_loss"] = scores["conditional_loss"].to_numpy(dtype=float)
        table["response_loss"] = scores["response_loss"].to_numpy(dtype=float)
        table["ifd"] = ifd(table["conditional_loss"], table["response_loss"])
    max_examples, max_tokens = budget_limits(s, candidates)
    order: list[int] | None = None  # ranking, best first
    chosen_order: list[int] | None = None
    distance = np.full(n, np.nan)
    for step in s.steps:
        if not len(alive()):  # an earlier step dropped every example: the error below says why
            break
        if step == "dedup":
            for on in s.dedup.fields:
                rows = alive()
                texts = [candidates[i].prompt if on == "prompt" else candidates[i].text
                         for i in rows]  # fmt: skip
                reasons, _ = find_duplicates(texts, s.dedup)
                for row, why in zip(rows, reasons, strict=True):
                    if why:
                        drop([row], f"{why}_{on}", step)
        elif step == "quality":
            for row in alive():
                why = rule_reason(candidates[row], s.quality)
                if why:
                    drop([row], why, step)
        elif step == "ifd":
            values = table["ifd"].to_numpy()
            rows = alive()
            drop([r for r in rows if not values[r] < s.ifd.max_ifd], IFD_TOO_HIGH, step)
            rows = alive()
            order = sorted(rows.tolist(), key=lambda r: (-values[r], r))
        elif step == "diversity":
            rows = alive()
            assert scores is not None
            points = unit_rows(np.stack(scores["embedding"].to_numpy()[rows]).astype(np.float64))
            if order is not None:  # the most difficult example is the first center
                first = int(np.flatnonzero(rows == order[0])[0])
            else:  # else the one nearest the centre of all
                first = int(np.argmin(np.linalg.norm(points - points.mean(0), axis=1)))
            picked, gaps = k_center_greedy(points, first, max_examples, tokens[rows], max_tokens)
            chosen_order = [int(rows[p]) for p in picked]
            distance[chosen_order] = gaps
            drop(sorted(set(rows.tolist()) - set(chosen_order)), OVER_BUDGET, step)
    if chosen_order is None:
        rows = alive().tolist()
        if order is None:
            order = fill_order(rows, tokens, s.budget.fill, s.seed if s.seed is not None else seed)
        chosen_order = fill_budget(order, tokens, max_examples, max_tokens)
        drop(sorted(set(rows) - set(chosen_order)), OVER_BUDGET, "budget")
    rank = np.full(n, -1, dtype=np.int64)
    rank[chosen_order] = np.arange(len(chosen_order))
    table["status"], table["reason"], table["step"], table["rank"] = status, reason, step_of, rank
    if scores is not None:
        table["kcenter_distance"] = distance
        table[["pca_x", "pca_y"]] = projection(np.stack(scores["embedding"].to_numpy()))
    if not (table["status"] == SELECTED).any():
        raise ValueError(
            f"finetune.selection kept no training example of {n}: "
            f"{table['reason'].value_counts().to_dict()}"
        )
    return Selection(table)


def fill_order(rows: list[int], tokens: np.ndarray, fill: str, seed: int) -> list[int]:
    """The order a budget is filled in when nothing ranked the examples."""
    if fill == "random":
        return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    if fill == "longest":
        return sorted(rows, key=lambda r: (-tokens[r], r))
    return list(rows)  # rank without a ranking: data order


def projection(embeddings: np.ndarray) -> np.ndarray:
    """2-D PCA of the embeddings (scikit-learn), for the plot of all against selected."""
    from sklearn.decomposition import PCA

    out = np.zeros((len(embeddings), 2))
    components = min(2, *embeddings.shape) if len(embeddings) else 0
    if components and np.ptp(embeddings, axis=0).any():  # all points equal: nothing to project
        pca = PCA(n_components=components, svd_solver="full")
        out[:, :components] = pca.fit_transform(embeddings.astype(np.float64))
    return out
