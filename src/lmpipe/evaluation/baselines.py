"""Cheap baselines a skeptic would try first, fitted on the same training split and scored
on the same held-out split as the model they stand beside: TF-IDF + logistic regression
for a classifier, TF-IDF retrieval of a training reply for a chat model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

# scikit-learn is imported where a baseline is fitted: at module level it cost every
# training stage's process 0.5 s (this module comes in through the classify task).
if TYPE_CHECKING:
    from sklearn.pipeline import FeatureUnion, Pipeline

# TF-IDF of word unigrams and of character 2-5-grams within words (sublinear term
# frequency), then an L2-regularised logistic regression: the strong classical text
# classifier. Chosen on the classify task's validation split, never its test split
# (macro-F1: words alone 0.77-0.80 over C in 1..30, word bigrams added 0.73-0.77, characters
# alone 0.83, words + characters 0.84 at C=10 and C=30).
TFIDF_C = 30.0


def tfidf_features() -> FeatureUnion:
    """Word unigrams and character 2-5-grams within words, both TF-IDF (unfitted)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    return make_union(
        TfidfVectorizer(sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
    )


def tfidf_logistic_regression(seed: int = 0) -> Pipeline:
    """An unfitted TF-IDF + logistic-regression text classifier (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        tfidf_features(), LogisticRegression(C=TFIDF_C, max_iter=3000, random_state=seed)
    )


def tfidf_predictions(
    train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str], seed: int = 0
) -> list[str]:
    """Fit on the training texts, predict the labels of `texts`."""
    model = tfidf_logistic_regression(seed).fit(list(train_texts), list(train_labels))
    return [str(label) for label in model.predict(list(texts))]


def retrieval_replies(
    train_prompts: Sequence[str], train_replies: Sequence[str], prompts: Sequence[str]
) -> list[str]:
    """Answer each prompt with the reply to the most similar training prompt (the summed
    cosines of word and character TF-IDF vectors; ties go to the earlier example)."""
    from sklearn.metrics.pairwise import linear_kernel

    features = tfidf_features().fit(list(train_prompts))
    similarity = linear_kernel(features.transform(list(prompts)),
                               features.transform(list(train_prompts)))  # fmt: skip
    return [train_replies[int(i)] for i in similarity.argmax(1)]
