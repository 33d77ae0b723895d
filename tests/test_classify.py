"""finetune=classify: WordNet data, stratified splits, the classifier in the shared loop, and
metrics from saved predictions checked against scikit-learn."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as sk

from lmpipe.evaluation.scoring import classification_report, confusion_matrix, predict_classes
from lmpipe.runs.config import HardwareConfig, OptimConfig, TrainConfig
from lmpipe.taskdata import labelled, wordnet
from lmpipe.tasks.classify import Classify
from lmpipe.training.loop import seed_everything, train
from lmpipe.training.model import load_classifier, save_model
from tests.test_train import NullLogger

CLASSIFY = Classify()

CPU = torch.device("cpu")
CATEGORIES = ["noun.animal", "noun.food", "noun.plant"]


@pytest.fixture(scope="module")
def glosses() -> list[labelled.LabelledText]:
    return wordnet.load_wordnet_glosses(CATEGORIES, max_per_class=60)


def test_wordnet_glosses_carry_their_lexicographer_category(glosses) -> None:
    counts = Counter(item.label for item in glosses)
    assert counts == {name: 60 for name in CATEGORIES}
    assert len({item.text for item in glosses}) == len(glosses)  # no duplicate text
    tiger = wordnet.load_wordnet_glosses(["noun.animal"])
    assert len(tiger) > 7000  # the whole category without a cap
    assert any("feline" in t.text or "cat" in t.text for t in tiger)


def test_unknown_category_is_named() -> None:
    with pytest.raises(ValueError, match=r"noun\.dragons"):
        wordnet.load_wordnet_glosses(["noun.animal", "noun.dragons"])


def test_split_is_stratified_disjoint_and_stable(glosses) -> None:
    splits = labelled.stratified_split(glosses, 0.1, 0.2)
    for name in CATEGORIES:
        per_split = {s: sum(t.label == name for t in items) for s, items in splits.items()}
        assert per_split == {"train": 42, "val": 6, "test": 12}
    ids = [{t.id for t in items} for items in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # Another sample of the data leaves every kept text in the same split.
    again = labelled.stratified_split(list(reversed(glosses)), 0.1, 0.2)
    assert {t.id for t in again["test"]} == {t.id for t in splits["test"]}


def random_labels(n: int, names: list[str], seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    actual = rng.choice(names, n).tolist()
    # Mostly right, sometimes wrong, and one class never predicted.
    predicted = [a if rng.random() < 0.6 else rng.choice(names[:-1]) for a in actual]
    return actual, predicted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_report_matches_scikit_learn(seed: int) -> None:
    names = ["a", "b", "c", "d"]
    actual, predicted = random_labels(200, names, seed)
    report = classification_report(actual, predicted, names)
    assert report["accuracy"] == pytest.approx(sk.accuracy_score(actual, predicted))
    assert report["macro_f1"] == pytest.approx(
        sk.f1_score(actual, predicted, labels=names, average="macro", zero_division=0)
    )
    f1 = sk.f1_score(actual, predicted, labels=names, average=None, zero_division=0)
    precision = sk.precision_score(actual, predicted, labels=names, average=None, zero_division=0)
    recall = sk.recall_score(actual, predicted, labels=names, average=None, zero_division=0)
    for i, name in enumerate(names):
        assert report[f"f1.{name}"] == pytest.approx(f1[i])
        assert report[f"precision.{name}"] == pytest.approx(precision[i])
        assert report[f"recall.{name}"] == pytest.approx(recall[i])
    assert (
        confusion_matrix(actual, predicted, names)
        == sk.confusion_matrix(actual, predicted, labels=names)
    ).all()


def test_scores_come_from_the_predictions_table_with_both_baselines() -> None:
    names = ["x", "y", "z"]
    actual, predicted = random_labels(90, names, 5)
    _, tfidf = random_labels(90, names, 6)
    frame = pd.DataFrame(
        {"actual": actual, "finetuned_predicted": predicted, "tfidf_predicted": tfidf}
    )
    train = [labelled.LabelledText(str(i), "t", label) for i, label in enumerate("xyyz")]
    metrics = CLASSIFY.score(frame, ["finetuned"], {"train": train})
    assert metrics["finetuned_accuracy"] == pytest.approx(sk.accuracy_score(actual, predicted))
    baseline = ["y"] * len(actual)  # the training split's majority
    assert metrics["baseline_accuracy"] == pytest.approx(sk.accuracy_score(actual, baseline))
    assert metrics["baseline_macro_f1"] == pytest.approx(
        sk.f1_score(actual, baseline, labels=names, average="macro", zero_division=0)
    )
    assert metrics["tfidf_macro_f1"] == pytest.approx(
        sk.f1_score(actual, tfidf, labels=names, average="macro", zero_division=0)
    )
    assert metrics["finetuned_macro_f1_vs_tfidf"] == pytest.approx(
        metrics["finetuned_macro_f1"] - metrics["tfidf_macro_f1"]
    )
    assert metrics["test_examples"] == 90
    for label in ("finetuned", "baseline", "tfidf"):
        for name in ("accuracy", "macro_f1"):
            low, high = metrics[f"{label}_{name}_low"], metrics[f"{label}_{name}_high"]
            assert low <= metrics[f"{label}_{name}"] <= high, (label, name)
    # 90 random guesses among 3 classes: about ±0.1 either way, neither 0 nor the whole range
    width = metrics["finetuned_accuracy_high"] - metrics["finetuned_accuracy_low"]
    assert 0.1 < width < 0.3
    assert 0.05 < metrics["finetuned_macro_f1_high"] - metrics["finetuned_macro_f1_low"] < 0.35


def test_a_perfect_classifier_has_an_exact_accuracy_interval() -> None:
    """40 of 40 right: accuracy's exact interval is [0.025^(1/40), 1] = [0.912, 1], not a
    zero-width one; macro-F1's bootstrap resamples only perfect predictions."""
    from lmpipe.tasks.classify import headline_intervals

    labels = ["x", "y"] * 20
    intervals = headline_intervals("m", labels, labels, ["x", "y"])
    assert intervals == pytest.approx({"m_accuracy_low": 0.025 ** (1 / 40),
                                       "m_accuracy_high": 1.0, "m_macro_f1_low": 1.0,
                                       "m_macro_f1_high": 1.0})  # fmt: skip


@pytest.fixture
def classifier_base(tmp_path: Path, tiny_model, tiny_tokenizer) -> Path:
    path = tmp_path / "base"
    save_model(tiny_model, tiny_tokenizer, path)
    return path


def keyword_examples(tokenizer, n: int) -> list[dict]:
    """Two classes told apart by one word: learnable in a few dozen steps."""
    texts = {0: "the quick brown fox", 1: "what is the state of the union"}
    items = [labelled.LabelledText(str(i), texts[i % 2], str(i % 2)) for i in range(n)]
    return labelled.encode_texts(tokenizer, items, ["0", "1"], 16)


def test_classifier_trains_in_the_shared_loop_and_saves(
    tmp_path: Path, classifier_base: Path, tiny_tokenizer
) -> None:
    seed_everything(0)
    model = load_classifier(classifier_base, ["0", "1"])
    examples = keyword_examples(tiny_tokenizer, 64)
    pad = model.config.pad_token_id
    cfg = TrainConfig(steps=30, batch_size=8, eval_every=30,
                      optim=OptimConfig(lr=5e-3, warmup_steps=2))  # fmt: skip

    def accuracy(m) -> dict[str, float]:
        result = predict_classes(m, labelled.ordered_batches(examples, 8, pad), CPU)
        return {"loss": result.loss, "accuracy": float((result.actual == result.predicted).mean())}

    logger = NullLogger()
    train(model, labelled.shuffled_batches(examples, 8, pad, 0), cfg, HardwareConfig(), CPU,
          logger, accuracy, objective=CLASSIFY)  # fmt: skip
    val = [row for row, _, series in logger.rows if series == "val"][-1]
    assert val["val_accuracy"] == 1.0 and val["val_loss"] < 0.2
    save_model(model, tiny_tokenizer, tmp_path / "clf")
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    base = json.loads((classifier_base / "config.json").read_text())
    assert base["architectures"] == ["LlamaForCausalLM"]
    reloaded = load_classifier(tmp_path / "clf")
    assert reloaded.config.id2label == {0: "0", 1: "1"}
    again = predict_classes(reloaded, labelled.ordered_batches(examples, 8, pad), CPU)
    assert (again.actual == again.predicted).all()


def test_classification_micro_batches_add_up_to_the_full_batch_gradient(
    classifier_base: Path, tiny_tokenizer
) -> None:
    """Each micro-batch's loss is its summed cross-entropy over the global example count, so
    two halves give the full batch's mean-loss gradient (a per-half mean would double it)."""
    seed_everything(0)
    model = load_classifier(classifier_base, ["0", "1"])
    examples = keyword_examples(tiny_tokenizer, 6)
    pad = model.config.pad_token_id
    full = labelled.collate(examples, pad)
    count = torch.tensor(float(CLASSIFY.target_count(full)))
    assert count == 6
    torch.nn.functional.cross_entropy(
        model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits,
        full["labels"],
    ).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for half in (examples[:2], examples[2:]):
        (CLASSIFY.loss_sum(model, labelled.collate(half, pad)) / count).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6)


def test_the_tfidf_baseline_is_scikit_learns_own() -> None:
    """tfidf_predictions equals scikit-learn's vectorizers + LogisticRegression called
    directly on the same split, and learns the task (texts with class words)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    from lmpipe.evaluation.baselines import TFIDF_C, tfidf_predictions

    words = {"x": "cat dog horse", "y": "bread cheese apple", "z": "oak pine fern"}
    rng = np.random.default_rng(0)

    def text(label: str) -> str:
        return " ".join(rng.choice([*words[label].split(), "the", "a", "of"], size=6))

    train_labels = [str(label) for label in rng.choice(list(words), size=60)]
    train_texts = [text(label) for label in train_labels]
    test_labels = [str(label) for label in rng.choice(list(words), size=30)]
    test_texts = [text(label) for label in test_labels]
    ours = tfidf_predictions(train_texts, train_labels, test_texts)
    direct = make_pipeline(
        make_union(TfidfVectorizer(sublinear_tf=True),
                   TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
        LogisticRegression(C=TFIDF_C, max_iter=3000, random_state=0),
    ).fit(train_texts, train_labels).predict(test_texts)  # fmt: skip
    assert ours == list(direct)
    assert sk.accuracy_score(test_labels, ours) > 0.9


@pytest.mark.parametrize(
    ("epochs", "batch_size", "grad_accum", "world_size", "steps"),
    [(3, 16, 1, 1, 381), (3, 16, 2, 1, 190), (3, 16, 1, 2, 189), (0.5, 16, 1, 1, 63),
     (1, 4096, 1, 1, 1)],
)  # fmt: skip
def test_epochs_decide_the_steps(epochs, batch_size, grad_accum, world_size, steps) -> None:
    """finetune.epochs: full global batches per pass (a partial last batch is skipped, as
    the data order skips it), times the passes, over the micro-batches per step."""
    from lmpipe.runs.config import FinetuneConfig
    from lmpipe.tasks.finetuning import steps_for_epochs

    f = FinetuneConfig(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum)
    assert steps_for_epochs(f, 2040, world_size) == steps


def test_epochs_give_a_config_copy_and_leave_the_callers_alone(
    classifier_base: Path, tiny_tokenizer
) -> None:
    """prepare_finetuning trains with a copy that counts finetune.epochs in steps; the
    config it was given keeps its own step count (a caller may reuse it)."""
    from omegaconf import OmegaConf

    from lmpipe.runs.config import FinetuneConfig
    from lmpipe.tasks.finetuning import prepare_finetuning

    f = OmegaConf.structured(FinetuneConfig(task="classify", dataset="wordnet", epochs=1,
                                            steps=7, batch_size=8, max_len=32))  # fmt: skip
    setup = prepare_finetuning(f, classifier_base, tiny_tokenizer, 0, CPU)
    per_epoch = setup.batches.num_items // 8
    assert setup.config.steps == per_epoch != 7
    assert f.steps == 7
