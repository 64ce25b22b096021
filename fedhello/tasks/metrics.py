"""Metrics shared by tasks and reports (plain numpy)."""

from __future__ import annotations

import numpy as np

LOWER_IS_BETTER = frozenset({"loss", "perplexity"})  # every other metric: higher is better


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in `y_true` or `y_pred`
    (scikit-learn's `f1_score(average="macro")`); a class never predicted and never true is left out."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return float("nan")
    classes = np.union1d(y_true, y_pred)
    scores = []
    for c in classes:
        tp = float(np.sum((y_true == c) & (y_pred == c)))
        predicted = float(np.sum(y_pred == c))
        actual = float(np.sum(y_true == c))
        scores.append(2 * tp / (predicted + actual) if predicted + actual > 0 else 0.0)
    return float(np.mean(scores))


def majority_class_metrics(labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the most frequent class of `labels`."""
    labels = np.asarray(labels)
    majority = int(np.bincount(labels).argmax())
    return {
        "accuracy": float(np.bincount(labels).max() / len(labels)),
        "macro_f1": macro_f1(labels, np.full_like(labels, majority)),
    }
